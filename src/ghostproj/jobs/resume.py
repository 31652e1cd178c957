"""Continuing a run: what an existing output directory holds, the plan a clean run
follows, and the shards still to write."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.batching import Example, fixed_size_batches, token_budget_batches
from ..errors import GhostprojError
from ..store.fingerprint import differing_part
from ..store.manifest import (
    MANIFEST,
    PROJECTOR_FILE,
    Manifest,
    ShardEntry,
    read_manifest,
)
from ..store.reader import damaged_shards, shard_index_digest
from ..store.writer import ShardSpan, plan_shards

# Settings a resumed run must share with the interrupted one, beyond the fingerprint.
RESUME_SETTINGS = ("max_length", "data_spec", "store_dtype", "shard_size", "batch_size", "token_budget", "dtype")


def prepare_out_dir(out: Path, manifest: Manifest, resume: bool, manifest_name: str = MANIFEST,
                     shared: bool = False) -> Manifest | None:
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
        if old.fingerprint == manifest.fingerprint and old.complete:
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
    if old.data.get("sha256") != manifest.data["sha256"]:
        raise GhostprojError(f"{out} holds a run over different data; choose another --out.")
    for key in RESUME_SETTINGS:
        if old.settings.get(key) != manifest.settings.get(key):
            flag = "--" + key.replace("_", "-")
            raise GhostprojError(
                f"{out} holds a run made with {flag} {old.settings.get(key)}; rerun with the same value or choose another --out."
            )
    if not shared:
        old_part = {k: v for k, v in (old.part or {}).items() if k != "rows"}
        new_part = {k: v for k, v in (manifest.part or {}).items() if k != "rows"}
        if old_part != new_part:
            was = f"part {old_part['shard_id']} of {old_part['num_shards']}" if old_part else "a whole run"
            raise GhostprojError(f"{out} holds {was}; rerun with the same --num-shards/--shard-id or choose another --out.")
    if not resume and not old.complete:
        raise GhostprojError(f"{out} holds an unfinished run and --no-resume was given; choose another --out.")
    return old


class RunPlan:
    """What a clean run writes: its batches in a deterministic order, and the shards that
    cut their row stream every ``shard_size`` rows. A resume keeps the shards that hold
    exactly their planned examples and recomputes the others in the very batches a clean
    run computes them in, so the finished run is the clean run, byte for byte."""

    def __init__(self, subset: list[Example], batch_size: int, token_budget: int | None, shard_size: int,
                 rank: int, first_seq: int = 0):
        if token_budget is not None:  # length buckets remove most padding
            self.batches = list(token_budget_batches(subset, token_budget))
        else:
            self.batches = list(fixed_size_batches(subset, batch_size))
        order = np.fromiter((e.index for b in self.batches for e in b), dtype=np.int64, count=len(subset))
        self.spans = plan_shards(order, shard_size, rank, first_seq)
        self._order = order

    def indices(self, span: ShardSpan) -> np.ndarray:
        return self._order[span.lo:span.hi]

    def batches_for(self, spans: list[ShardSpan]) -> list[tuple[int, list[Example]]]:
        """(position in the row stream, batch) of every batch holding a row of ``spans``."""
        needed = np.zeros(len(self._order) + 1, dtype=np.int64)
        for span in spans:
            needed[span.lo] += 1
            needed[span.hi] -= 1
        needed = np.cumsum(needed)[:-1] > 0
        chosen, at = [], 0
        for batch in self.batches:
            if needed[at:at + len(batch)].any():
                chosen.append((at, batch))
            at += len(batch)
        return chosen


@dataclass
class ResumeState:
    """What an existing run directory contributes: the shard entries kept as they are, the
    planned shards still to write, and what was found."""

    kept: list[ShardEntry]
    todo: list[ShardSpan]
    notes: list[str] = field(default_factory=list)
    recomputed: int = 0  # listed shards that are written again (damaged, or holding other examples)


def resume_state(out: Path, old: Manifest | None, plan: RunPlan, verify: bool, keep_all: bool = False) -> ResumeState:
    """Match the shards ``old`` lists against ``plan``. A listed shard is kept when its file
    is intact (size, header; sha256 for the last one written, or every one with
    ``verify``) and holds exactly the examples the plan puts there; any other planned
    shard is written (again). ``keep_all``: a torchrun restarted with another number of
    ranks, whose earlier shards follow an earlier plan and are kept whole."""
    if old is None:
        return ResumeState([], list(plan.spans))
    entries = old.shards
    damaged = dict(damaged_shards(out, old, verify))
    if keep_all:
        if damaged:
            pos, why = next(iter(damaged.items()))
            raise GhostprojError(f"Shard {out / entries[pos].file} is damaged ({why}); rerun this project "
                                 "command without torchrun to recompute it.")
        return ResumeState(list(entries), list(plan.spans))
    spans = {span.file: span for span in plan.spans}
    state = ResumeState([], [])
    for pos, entry in enumerate(entries):
        span = spans.get(entry.file)
        if span is None:
            raise GhostprojError(f"{out} lists shard {entry.file}, which a run with these settings never writes; "
                                 "it cannot be resumed in place: project into a new --out.")
        if pos in damaged:
            state.notes.append(f"Shard {entry.file} was damaged ({damaged[pos]}); recomputing its "
                               f"{span.rows} examples.")
        elif entry.rows != span.rows or _digest(out, old, entry) != span.digest:
            state.notes.append(f"Shard {entry.file} holds other examples than this run puts there (it was "
                               f"written by an earlier resume); recomputing its {span.rows} examples.")
        else:
            state.kept.append(dataclasses.replace(entry, index_digest=span.digest))  # recorded from now on, if it was not
            continue
        state.recomputed += 1
    kept = {entry.file for entry in state.kept}
    state.todo = [span for span in plan.spans if span.file not in kept]
    return state


def _digest(out: Path, manifest: Manifest, entry: ShardEntry) -> str:
    """A listed shard's index digest: as recorded, or from its index column for a shard
    written before digests were recorded."""
    if entry.index_digest is not None:
        return entry.index_digest
    return shard_index_digest(out / entry.file, entry.rows)
