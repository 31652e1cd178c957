"""Joining the parts of a run written by job arrays or torchrun ranks."""

from __future__ import annotations

import os

from ..errors import GhostprojError
from .fingerprint import differing_part
from .manifest import PROJECTOR_FILE, Manifest, write_manifest
from .outputs import check_output_dir
from .reader import open_run


def merge_manifests(parts: list[Manifest], by_shard_id: bool = True) -> Manifest:
    """One complete manifest from the manifests of disjoint parts of one run (job-array
    shards or torchrun ranks). Refuses parts that are incomparable, incomplete, overlapping
    or missing. ``by_shard_id=False`` (torchrun ranks, possibly from runs with different
    numbers of ranks) skips the shard-id bookkeeping; the caller checks row coverage."""
    if not parts:
        raise GhostprojError("There is nothing to merge.")
    first = parts[0]
    k = (first.part or {}).get("num_shards", 1)
    seen: dict[int, int] = {}
    for n, m in enumerate(parts):
        part = differing_part(first, m)
        if part is not None:
            raise GhostprojError(f"Part {n + 1} is not comparable with part 1: their {part} differ.")
        if m.data.get("sha256") != first.data.get("sha256"):
            raise GhostprojError(f"Part {n + 1} was projected from different data than part 1.")
        info = m.part or {"shard_id": 0, "num_shards": 1}
        if not by_shard_id:
            if not m.complete:
                raise GhostprojError(f"Part {n + 1} is unfinished; rerun it first.")
            continue
        if info["num_shards"] != k:
            raise GhostprojError(f"Part {n + 1} splits the data into {info['num_shards']} shards, part 1 into {k}.")
        if info["shard_id"] in seen:
            raise GhostprojError(f"Parts {seen[info['shard_id']] + 1} and {n + 1} both hold shard {info['shard_id']}; "
                                 "they overlap.")
        seen[info["shard_id"]] = n
        if not m.complete:
            raise GhostprojError(f"Part {n + 1} (shard {info['shard_id']}) is unfinished; rerun it first.")
    missing = sorted(set(range(k)) - set(seen)) if by_shard_id else []
    if missing:
        raise GhostprojError(f"Shards {', '.join(map(str, missing))} of {k} are missing from the merge.")
    shards = sorted((s for m in parts for s in m.shards), key=lambda s: s.file)
    names = [s.file for s in shards]
    if len(set(names)) != len(names):
        raise GhostprojError("Two parts hold shard files of the same name; they were written with the same rank.")
    summary = dict(first.summary or {})
    for key in ("examples", "tokens", "no_label", "truncated", "prompt_too_long", "bytes"):
        summary[key] = sum((m.summary or {}).get(key, 0) for m in parts)
    return Manifest.from_json(dict(first.to_json(), part=None, shards=[s.to_json() for s in shards],
                                   summary=summary, complete=True))


def merge_runs(out: str | os.PathLike, parts: list[str]) -> dict:
    """Join job-array parts into one run directory ``out``: shards are hard-linked (copied
    across file systems), every part is validated first, and nothing in the parts changes."""
    import shutil

    out = check_output_dir(out, "OUT", parts)
    runs = [open_run(p) for p in parts]
    merged = merge_manifests([r.manifest for r in runs])
    seen: set[int] = set()
    for r in runs:
        idx = set(r.read_column("index").tolist())
        if seen & idx:
            raise GhostprojError(f"{r.path} holds examples that another part holds too.")
        seen |= idx
    if out.exists() and any(out.iterdir()):
        raise GhostprojError(f"{out} is not empty; merge into a new directory.")
    out.mkdir(parents=True, exist_ok=True)
    sources = [(runs[0].path / PROJECTOR_FILE, out / PROJECTOR_FILE)]
    for r in runs:
        sources += [(h.path, out / h.path.name) for h in r.shards]
    for src, dst in sources:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    write_manifest(out, merged)
    return merged
