"""Many processes, one run: torchrun ranks (each on its own GPU, or on the CPU with gloo)
and their rank manifests, merged by rank 0."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch

from .data.batching import Example
from .errors import GhostprojError
from .store.fingerprint import (
    differing_part,
)
from .store.manifest import (
    MANIFEST,
    Manifest,
    rank_manifest_name,
    read_manifest,
    write_manifest,
)
from .store.merge import merge_manifests
from .store.shards import read_rows, read_shard_header


def device_for_this_process(device: str) -> str:
    """``--device`` for this process. Under torchrun each rank takes the GPU of its
    LOCAL_RANK and makes it current, so ranks never share GPU 0 and nccl, CUDA events
    and pinned copies all act on the rank's own device."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device  # the CPU, or a GPU the user named explicitly
    index, visible = int(local), torch.cuda.device_count()
    if index >= visible:
        raise GhostprojError(f"torchrun started local rank {index}, but only {visible} GPU(s) are visible; "
                             f"use --nproc-per-node {visible} or fewer.")
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def distributed_rank(device: torch.device) -> tuple[int, int] | None:
    """(rank, world size) under torchrun with more than one process, else None; sets up
    the process group once: nccl when this rank runs on a GPU, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as td

    if not td.is_initialized():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return td.get_rank(), td.get_world_size()


def shard_model(model, device: torch.device) -> int:
    """FSDP2 (``fully_shard``) over this torchrun's ranks: each decoder layer its own unit,
    and the root for what is left (embeddings, head, final norm). Weights are gathered for
    one unit's forward and again for its backward; the engine reads each layer's weight at
    call time, so it sees the gathered one. Returns the number of decoder layers sharded."""
    import torch.distributed as td
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise GhostprojError(f"{type(model).__name__} has no decoder layers FSDP could shard one by one; "
                             "drop --fsdp.")
    mesh = init_device_mesh(device.type, (td.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(layers)


def load_sharded(model, path: str, dtype: str, revision: str | None, device: torch.device) -> int:
    """Fill ``model``, built on the meta device, with the checkpoint's weights, sharded
    (:func:`shard_model`): each rank allocates only its shard on ``device``; rank 0 reads
    the checkpoint into host memory (transformers' own loader, so renamed and fused keys
    load as they always do) and sends one weight at a time, from which every rank keeps
    its shard. No other rank ever holds more than its shards and one weight. Returns the
    number of decoder layers sharded."""
    import torch.distributed as td

    from .models import load_model

    if distributed_rank(device) is None:
        raise GhostprojError("--fsdp shards the model across torchrun's ranks; start the command with "
                             "torchrun --nproc-per-node N.")
    layers = shard_model(model, device)
    model.to_empty(device=device)
    rank, world = td.get_rank(), td.get_world_size()
    whole = load_model(path, dtype, "cpu", revision)[0] if rank == 0 else None
    source = dict(whole.named_parameters()) | dict(whole.named_buffers()) if whole is not None else {}
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # FSDP2: a Shard(0) DTensor
            full = (source[name].to(device) if rank == 0
                    else torch.empty(tensor.shape, dtype=tensor.dtype, device=device))
            td.broadcast(full, 0)
            if local is tensor:  # buffers are not sharded: rotary frequencies, masks
                local.copy_(full)
            else:  # a rank's rows are torch.chunk's, as FSDP2 cuts them
                chunks = torch.chunk(full, world, dim=0)
                if rank < len(chunks) and local.numel():
                    local.copy_(chunks[rank])
            del full
    return layers


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def each_unsharded(model, names: list[str]) -> Iterator[str]:
    """Each of ``names`` (modules, or parts of them) in turn, with the FSDP unit that holds
    it gathered whole while the caller reads its weights: one unit at a time, as in the
    forward pass. Every rank must ask for the same names in the same order; a gathered
    weight is freed when its unit is resharded, so a caller that keeps it (or hands its
    memory to numpy) copies it first. Without FSDP, just the names."""
    from torch.distributed.fsdp import FSDPModule

    units = {n: m for n, m in model.named_modules() if isinstance(m, FSDPModule)}
    current = None
    try:
        for name in names:
            owners = [u for u in units if u == "" or name == u or name.startswith(u + ".")]
            unit = max(owners, key=len) if owners else None
            if unit != current:
                if current is not None:
                    units[current].reshard()
                if unit is not None:
                    units[unit].unshard()
                current = unit
            yield name
    finally:
        if current is not None:
            units[current].reshard()


def whole_weights(model, names: list[str], read) -> Iterator[tuple[str, torch.Tensor]]:
    """The (key, tensor) pairs ``read(name)`` gives for each name, each tensor whole: under
    FSDP its unit is gathered while it is read and the tensor copied out of it."""
    sharded = is_sharded(model)
    for name in each_unsharded(model, names):
        for key, t in read(name):
            yield key, t.detach().clone() if sharded else t


def fillers_after(n: int) -> int:
    """How many filler batches this rank, with ``n`` batches of its own, runs after them so
    that it joins every gather of a sharded model: the most any rank has, less ``n``. Every
    rank must ask before its first batch (an object collective: gloo and nccl alike)."""
    import torch.distributed as td

    counts = [None] * td.get_world_size()
    td.all_gather_object(counts, n)
    return max(counts) - n


def sync_start(out: Path, rank: int) -> None:
    """Rank 0 creates the shared directory before any rank looks at it."""
    import torch.distributed as td

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    td.barrier()


def rank_manifests(out: Path) -> dict[int, Manifest]:
    found = {}
    for path in out.glob("manifest-r[0-9][0-9][0-9].json"):
        found[int(path.name[10:13])] = read_manifest(out, path.name)
    return found


def regroup_after_rank_change(out: Path, manifest: Manifest, examples: list[Example], rank: int, world: int,
                               subset: list[Example]) -> tuple[bool, list[Example]]:
    """A torchrun restarted with a different number of ranks: every rank reads what all
    earlier ranks wrote and takes its share of the rows still missing. Returns (regrouped,
    this rank's examples)."""
    import torch.distributed as td

    existing = rank_manifests(out)
    # once regrouped, always: the shards written then follow no rank's own plan
    regroup = any((m.part or {}).get("num_shards") != world or (m.part or {}).get("regrouped")
                  for m in existing.values())
    if regroup:
        done: set[int] = set()
        for m in existing.values():
            part = differing_part(m, manifest)
            if part is not None:
                raise GhostprojError(f"{out} holds rank manifests of a different run (their {part} differ).")
            for s in m.shards:
                done.update(read_rows(read_shard_header(out / s.file), "index", 0, s.rows).tolist())
        remaining = [e for e in examples if e.index not in done]
        subset = remaining[rank::world]
        manifest.part["rows"] = len(subset)
        manifest.part["regrouped"] = True
        if rank == 0:  # ranks of the earlier run that this one lacks: their shards are final as they are
            for r, m in existing.items():
                if r >= world and not m.complete:
                    m.complete = True
                    write_manifest(out, m, rank_manifest_name(r))
    td.barrier()  # every rank decided before any rank rewrites its manifest
    return regroup, subset


def finish_distributed(out: Path, rank: int, world: int) -> None:
    """After every rank finished its part, rank 0 merges the rank manifests into manifest.json
    (all of them, also those of ranks from an earlier run with more ranks) after checking that
    every example is there exactly once."""
    import torch.distributed as td

    td.barrier()
    if rank == 0 and not (out / MANIFEST).exists():
        ranks = rank_manifests(out)
        merged = merge_manifests([ranks[r] for r in sorted(ranks)], by_shard_id=False)
        index = torch.cat([read_rows(read_shard_header(out / s.file), "index", 0, s.rows)
                           for s in merged.shards]) if merged.shards else torch.empty(0, dtype=torch.long)
        count = merged.data["count"]
        if index.numel() != count or index.unique().numel() != index.numel():
            raise GhostprojError(f"The ranks wrote {index.numel()} rows for {count} examples; rerun to repair.")
        write_manifest(out, merged)
        for r in ranks:
            (out / rank_manifest_name(r)).unlink(missing_ok=True)
    td.barrier()
