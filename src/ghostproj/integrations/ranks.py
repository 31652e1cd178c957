"""The training-loop integrations under torchrun (DDP): which rank this process is, work
that rank 0 does once while every rank learns its outcome, and the ranks' rows joined
into one run, as `project`'s ranks are."""

from __future__ import annotations

from pathlib import Path

import torch

from ..distributed import rank_manifests
from ..errors import GhostprojError
from ..store.manifest import MANIFEST, rank_manifest_name, write_manifest
from ..store.merge import merge_manifests
from ..store.shards import read_rows, read_shard_header


def process_ranks() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torch.distributed."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        return td.get_rank(), td.get_world_size()
    return 0, 1


def on_rank_zero(world: int, work) -> None:
    """``work()`` on rank 0 alone, after every rank got here; a refusal there is raised on
    every rank, so no rank waits for one that stopped. Object collectives: they work over
    gloo and nccl alike."""
    if world == 1:
        work()
        return
    import torch.distributed as td

    td.barrier()
    refusal = [None]
    if td.get_rank() == 0:
        try:
            work()
        except GhostprojError as exc:
            refusal[0] = str(exc)
    td.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise GhostprojError(refusal[0])


def over_ranks(value, world: int) -> list:
    """Every rank's ``value``, in rank order (an object collective)."""
    if world == 1:
        return [value]
    import torch.distributed as td

    values = [None] * world
    td.all_gather_object(values, value)
    return values


def total_over_ranks(n: int, world: int) -> int:
    return sum(over_ranks(n, world))


def join_rank_runs(out: Path, dataset_rows: int) -> None:
    """Every rank's finished part of a window joined into its manifest.json; each stored row
    must be there once, and the window counts as the whole dataset when all rows are."""
    ranks = rank_manifests(out)
    merged = merge_manifests([ranks[r] for r in sorted(ranks)], by_shard_id=False)
    index = [read_rows(read_shard_header(out / s.file), "index", 0, s.rows) for s in merged.shards]
    index = torch.cat(index) if index else torch.empty(0, dtype=torch.long)
    if index.unique().numel() != index.numel():
        raise GhostprojError(f"The ranks stored some training row twice in {out}; the ranks did not draw disjoint "
                             "rows (give the Trainer its distributed sampler).")
    everything = index.numel() == dataset_rows
    merged.data = {"format": "trainer", "count": dataset_rows if everything else None, "rows": index.numel()}
    merged.steps = None  # where each step's rows end is a per-rank record, for resuming a rank's stream
    write_manifest(out, merged, MANIFEST)
    for r in ranks:
        (out / rank_manifest_name(r)).unlink(missing_ok=True)
