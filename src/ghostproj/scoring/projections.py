"""A run's vectors, indices, losses and token counts in memory (or memory-mapped)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..store.manifest import LayerInfo, Manifest
from ..store.reader import open_run
from .columns import column_index, relative_blocks, selected_layers


@dataclass
class Projections:
    """Vectors of a run as returned by :func:`load_projections`."""

    grads: torch.Tensor | list[torch.Tensor]  # [N, D'] float32, or per-shard store-dtype views with mmap=True
    index: torch.Tensor  # [N] dataset rows
    loss: torch.Tensor
    tokens: torch.Tensor
    layers: list[LayerInfo]  # the selected layers, offsets relative to the selected columns
    manifest: Manifest


def load_projections(path, layers: list[str] | None = None, mmap: bool = False, verify: bool = True) -> Projections:
    """Vectors, dataset indices, losses and token counts of a run directory or shard file.

    ``layers`` restricts to those projected layers (patterns as in ``--layers``). With
    ``mmap=True`` the vectors stay on disk: ``grads`` is a list of per-shard memory-mapped
    tensors in the store dtype (all layers; select columns yourself with ``layers``'
    offsets); otherwise ``grads`` is one float32 tensor in memory. ``verify`` checks every
    shard's sha256 against the manifest (while reading; with ``mmap``, in one pass first).
    """
    run = open_run(path)
    selected = selected_layers(run.layers, layers)
    cols = column_index(selected, run.dim)
    index = run.read_column("index")
    loss = run.read_column("loss")
    tokens = run.read_column("tokens")
    if mmap:
        if verify:
            run.verify_hashes()
        views = []
        for h in run.shards:
            dtype, shape, begin, _ = h.tensors["grads"]
            raw_dtype = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32}[dtype]
            arr = np.memmap(h.path, dtype=raw_dtype, mode="c", offset=h.data_start + begin, shape=shape)
            t = torch.from_numpy(arr)  # copy-on-write map: writes never reach the file
            views.append(t.view(torch.bfloat16) if dtype == torch.bfloat16 else t)
        return Projections(views, index, loss, tokens, run.layers, run.manifest)
    parts = []
    for _, chunk in run.iter_chunks(verify=verify):
        chunk = chunk.float()
        parts.append(chunk if cols is None else chunk[:, cols])
    grads = torch.cat(parts) if parts else torch.empty(0, sum(i.size for i in selected))
    return Projections(grads, index, loss, tokens, relative_blocks(selected), run.manifest)
