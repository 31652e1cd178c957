"""The `inspect` job: what a run holds, checked shard by shard."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from ..progress import human_bytes
from ..store.reader import verify_run


def describe_run(path: str, console, hash_shards: bool = True) -> bool:
    """Print a run directory (or a lone shard file) after verifying it; True when the run
    is complete. A damaged run raises GhostprojError naming the shard and the fix."""
    report = verify_run(path, hash_shards=hash_shards)
    m = report.manifest
    checked = "verified (sha256)" if hash_shards else "checked (sizes and headers)"
    if Path(path).is_file() and "model" not in m:
        console.print(f"[bold]{escape(path)}[/bold]: a shard file outside its run directory: {report.rows} rows, "
                      f"D={m['dim']}, store {m['store_dtype']}, fingerprint {m['fingerprint'][:16] or 'none'}; "
                      "its header was checked (no manifest beside it records a sha256).")
        return True
    model, data = m.get("model", {}), m.get("data", {})
    console.print(f"[bold]{escape(path)}[/bold]: model {escape(str(model.get('path', '?')))} "
                  f"({model.get('class', '?')}, {model.get('dtype', '?')}), data {escape(str(data.get('path', '?')))} "
                  f"({data.get('count', '?')} examples)")
    projector = m.get("projector", {})
    console.print(f"D={m['dim']}, store {m['store_dtype']}, projector {projector.get('kind', '?')} seed "
                  f"{projector.get('seed', '?')}, loss {m.get('loss_reduction', '?')}, bias {m.get('bias', '?')}, "
                  f"fingerprint {m['fingerprint'][:16]}")
    table = Table()
    for col in ("layer", "type", "n_in", "n_out", "k_in", "k_out", "offset"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for layer in m["layers"]:
        table.add_row(*(escape(str(layer[c])) for c in ("name", "type", "n_in", "n_out", "k_in", "k_out", "offset")))
    console.print(table)
    complete = bool(m.get("complete"))
    state = "complete" if complete else "INCOMPLETE (rerun the same project command to resume; exit code 3)"
    console.print(f"{report.rows} rows in {len(m['shards'])} shards, {human_bytes(report.bytes)}, {state}; "
                  f"shards {checked}.")
    return complete
