"""The score job: open two runs, score them, write the requested files, print tables."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.table import Table

from ..data.records import example_text, record_field, records_for_run
from ..errors import GhostprojError
from ..progress import RateProgress, shorten
from ..scoring.score import ScoreResult, score
from ..store.files import atomic_write
from ..store.reader import open_run
from ..store.shards import encode_safetensors


def check_outputs(outputs: list[tuple[str | None, str]], inputs: list[str], overwrite: bool) -> None:
    """Refuse, before any work, an output that would land on an input, inside a projection
    run directory, on another output, or (without ``overwrite``) on an existing file."""
    from ..store.manifest import MANIFEST

    taken: dict[Path, str] = {}
    protected = {Path(p).resolve() for p in inputs}
    for path, flag in outputs:
        if path is None:
            continue
        target = Path(path).resolve()
        parent = target.parent
        if not parent.is_dir():
            raise GhostprojError(f"{flag} {path}: the directory {parent} does not exist.")
        if target.is_dir():
            raise GhostprojError(f"{flag} {path} is a directory; give a file name.")
        if target in protected:
            raise GhostprojError(f"{flag} {path} is one of the inputs; write the output elsewhere.")
        if any(target.is_relative_to(p) for p in protected if p.is_dir()) or (parent / MANIFEST).exists():
            raise GhostprojError(f"{flag} {path} is inside a projection run directory; write outputs elsewhere "
                                 "so the run stays as `project` wrote it.")
        if target in taken:
            raise GhostprojError(f"{flag} and {taken[target]} name the same file {path}.")
        taken[target] = flag
        if target.exists() and not overwrite:
            raise GhostprojError(f"{flag} {path} already exists; pass --overwrite to replace it.")


def write_scores(path: str, result: ScoreResult) -> None:
    tensors = {"scores": result.scores, "train_index": result.train_index, "query_index": result.query_index}
    atomic_write(Path(path), encode_safetensors(tensors))


def write_topk(path: str, result: ScoreResult) -> None:
    lines = []
    for j in range(result.topk_train.shape[0]):
        lines.append(json.dumps({
            "query": int(result.query_index[j]),
            "train": [int(i) for i in result.topk_train[j]],
            "scores": [float(v) for v in result.topk_scores[j]],
        }))
    atomic_write(Path(path), ("\n".join(lines) + "\n").encode())


def write_selection(path: str, result: ScoreResult) -> None:
    if path.endswith(".safetensors"):
        atomic_write(Path(path), encode_safetensors({"index": result.train_index, "score": result.selection}))
        return
    lines = [json.dumps({"index": int(i), "score": float(v)}) for i, v in zip(result.train_index, result.selection)]
    atomic_write(Path(path), ("\n".join(lines) + "\n").encode())


def run_score_command(train: str, query: str, *, metric: str, normalize: str | None, center: bool, damping: float,
                      layers: list[str] | None, top_k: int, show: int, out: str | None, topk_out: str | None,
                      reduce: str | None, group_field: str | None, select_out: str | None, chunk_rows: int,
                      console, status, overwrite: bool = False, fisher: str | None = None) -> ScoreResult:
    check_outputs([(out, "--out"), (topk_out, "--topk-out"), (select_out, "--select-out")], [train, query],
                  overwrite)
    if select_out and not reduce:
        raise GhostprojError("--select-out needs --reduce mean or --reduce max.")
    if group_field and reduce != "max":
        raise GhostprojError("--group-field only applies with --reduce max.")
    if chunk_rows < 1:
        raise GhostprojError(f"--chunk-rows must be at least 1, got {chunk_rows}.")
    if fisher and not metric.startswith("influence"):
        raise GhostprojError("--fisher only applies to --metric influence and influence-full.")
    train_run, query_run = open_run(train), open_run(query)
    groups = _groups(query_run, group_field) if group_field else None
    with RateProgress("scoring", total=train_run.rows, unit="rows", extra_unit=None, lazy=True) as bar:
        result = score(train_run, query_run, metric=metric, normalize=normalize, center=center, damping=damping,
                       layers=layers, top_k=top_k, reduce=reduce, query_groups=groups, keep_matrix=out is not None,
                       chunk_rows=chunk_rows, progress=bar, fisher=fisher)
    for note in result.notes:
        status.print(f"[yellow]note:[/yellow] {note}")
    if out:
        write_scores(out, result)
    if topk_out:
        write_topk(topk_out, result)
    if select_out:
        write_selection(select_out, result)
    if show > 0:
        _show(console, status, train_run, query_run, result, metric, reduce, show)
    status.print(f"[green]scored[/green] {train_run.rows} x {query_run.rows} ({metric}) in {result.seconds:.1f} s"
                 + "".join(f"; wrote {p}" for p in (out, topk_out, select_out) if p))
    return result


def _groups(query_run, group_field: str) -> list[str]:
    """The ``group_field`` value of every query row, read from the query run's data."""
    query_records, why = records_for_run(query_run.manifest)
    if query_records is None:
        raise GhostprojError(f"--group-field needs the query data, but {why}.")
    groups = [record_field(query_records, i, group_field) for i in query_run.read_column("index").tolist()]
    if any(g is None for g in groups):
        raise GhostprojError(f"Some query rows have no field '{group_field}'.")
    return [str(g) for g in groups]


def _show(console, status, train_run, query_run, result: ScoreResult, metric: str, reduce: str | None,
          show: int) -> None:
    """The top-k table of the first ``show`` queries, and the best and worst selection scores."""
    train_records, train_why = records_for_run(train_run.manifest)
    query_records, _ = records_for_run(query_run.manifest)
    train_data, query_data = train_run.manifest.get("data", {}), query_run.manifest.get("data", {})
    if train_records is None:
        status.print(f"[dim]texts not shown: {train_why}[/dim]")

    def text(tidx: int) -> list[str]:
        return [shorten(example_text(train_records, tidx, train_data), 90)] if train_records is not None else []

    for j in range(min(show, result.topk_train.shape[0])):
        qidx = int(result.query_index[j])
        title = f"query {qidx}"
        if query_records is not None:
            title += ": " + shorten(example_text(query_records, qidx, query_data), 80)
        table = Table(title=title, title_justify="left")
        for col in ("rank", "train", metric) + (("text",) if train_records is not None else ()):
            table.add_column(col, justify="left" if col == "text" else "right")
        for r in range(result.topk_train.shape[1]):
            tidx = int(result.topk_train[j, r])
            table.add_row(str(r + 1), str(tidx), f"{float(result.topk_scores[j, r]):.4g}", *text(tidx))
        console.print(table)
    if reduce:
        order = torch.argsort(result.selection, descending=True)
        table = Table(title=f"selection scores (--reduce {reduce}): best and worst", title_justify="left")
        for col in ("", "train", "score") + (("text",) if train_records is not None else ()):
            table.add_column(col, justify="right" if col in ("train", "score") else "left")
        n = min(5, len(order))
        for label, rows in (("best", order[:n]), ("worst", order[-n:].flip(0))):
            for pos in rows.tolist():
                tidx = int(result.train_index[pos])
                table.add_row(label, str(tidx), f"{float(result.selection[pos]):.4g}", *text(tidx))
        console.print(table)
