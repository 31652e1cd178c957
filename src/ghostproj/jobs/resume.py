"""Continuing a run: what an existing output directory holds, the batches still to run,
and where a damaged shard's examples are found again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.batching import Example, fixed_size_batches, token_budget_batches
from ..errors import GhostprojError
from ..store.fingerprint import (
    differing_part,
)
from ..store.manifest import (
    MANIFEST,
    PROJECTOR_FILE,
    read_manifest,
)

# Settings a resumed run must share with the interrupted one, beyond the fingerprint.
RESUME_SETTINGS = ("max_length", "data_spec", "store_dtype", "shard_size", "batch_size", "token_budget", "dtype")


def prepare_out_dir(out: Path, manifest: dict, resume: bool, manifest_name: str = MANIFEST,
                     shared: bool = False) -> dict | None:
    """The existing manifest when this run resumes it, None for a fresh run. Refuses a
    directory that holds something else, naming what differs. ``shared``: torchrun ranks
    write one directory, each with its own manifest."""
    if out.exists() and not out.is_dir():
        raise GhostprojError(f"Output path {out} exists and is not a directory.")
    if not out.exists():
        out.mkdir(parents=True, exist_ok=True)
        return None
    if shared and (out / MANIFEST).exists():
        old = read_manifest(out)  # an earlier torchrun already merged this run
        if old.get("fingerprint") == manifest["fingerprint"] and old.get("complete"):
            return old
        raise GhostprojError(f"{out} holds a different run; choose another --out.")
    if not (out / manifest_name).exists():
        # what may already be there: the projector of a run that stopped before its first
        # manifest, a killed writer's temporary file (swept once the lock is taken), and
        # (torchrun) what sibling ranks wrote
        def ours(name: str) -> bool:
            if name in (PROJECTOR_FILE, ".lock") or ".tmp-" in name:
                return True
            return shared and name.startswith((".lock-r", "manifest-r", "grads-r"))
        if any(not ours(p.name) for p in out.iterdir()):
            raise GhostprojError(f"Output directory {out} is not empty and holds no ghostproj run; choose another --out.")
        return None
    old = read_manifest(out, manifest_name)
    part = differing_part(old, manifest)
    if part is not None:
        raise GhostprojError(f"{out} holds a different run (its {part} differ); choose another --out.")
    if old.get("data", {}).get("sha256") != manifest["data"]["sha256"]:
        raise GhostprojError(f"{out} holds a run over different data; choose another --out.")
    for key in RESUME_SETTINGS:
        if old.get("settings", {}).get(key) != manifest["settings"].get(key):
            flag = "--" + key.replace("_", "-")
            raise GhostprojError(
                f"{out} holds a run made with {flag} {old.get('settings', {}).get(key)}; rerun with the same value or choose another --out."
            )
    if not shared:
        old_part = {k: v for k, v in (old.get("part") or {}).items() if k != "rows"}
        new_part = {k: v for k, v in (manifest.get("part") or {}).items() if k != "rows"}
        if old_part != new_part:
            was = f"part {old_part['shard_id']} of {old_part['num_shards']}" if old_part else "a whole run"
            raise GhostprojError(f"{out} holds {was}; rerun with the same --num-shards/--shard-id or choose another --out.")
    if not resume and not old.get("complete"):
        raise GhostprojError(f"{out} holds an unfinished run and --no-resume was given; choose another --out.")
    return old


def planned_batches(subset: list[Example], batch_size: int, token_budget: int | None) -> list[list[Example]]:
    """Every batch of the run, in the order their rows are written. The order is
    deterministic, so a resumed run skips exactly the examples already written and a
    damaged shard's examples can be found again."""
    if token_budget is not None:
        # length buckets remove most padding
        return list(token_budget_batches(subset, token_budget))
    return list(fixed_size_batches(subset, batch_size))


def batches_after(batches: list[list[Example]], start: int, out: Path) -> list[list[Example]]:
    """The batches still to run when ``start`` rows are already written."""
    todo, skipped = [], 0
    for batch in batches:
        if skipped + len(batch) <= start:
            skipped += len(batch)
        else:
            todo.append(batch)
    if skipped != start:
        raise GhostprojError(f"{out} ends inside a batch; it was not written by this version of ghostproj.")
    return todo


@dataclass
class Repair:
    """A damaged shard (its position in the manifest) and how to recompute it: these
    batches, whose concatenated rows [begin, end) are the shard's rows. Whole batches are
    run, so each example is computed in the very batch it was computed in before."""

    pos: int
    batches: list[list[Example]]
    begin: int
    end: int


def repair_plan(batches: list[list[Example]], shards: list[dict], damaged: list[tuple[int, str]],
                 out: Path) -> list[Repair]:
    starts, row = [], 0
    for entry in shards:
        starts.append(row)
        row += int(entry["rows"])
    plan = []
    for pos, _ in damaged:
        lo, hi = starts[pos], starts[pos] + int(shards[pos]["rows"])
        chosen, first, at = [], None, 0
        for batch in batches:
            if at + len(batch) > lo and at < hi:
                first = at if first is None else first
                chosen.append(batch)
            at += len(batch)
        if hi > at or first is None:
            raise GhostprojError(f"{out} lists more rows than its data has; it cannot be repaired in place.")
        plan.append(Repair(pos, chosen, lo - first, hi - first))
    return plan
