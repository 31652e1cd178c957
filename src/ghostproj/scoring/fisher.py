"""The Fisher sums of a training run's vectors (what influence scores precondition with),
for `score`, `fisher` and `index` alike."""

from __future__ import annotations

import torch

from ..errors import GhostprojError
from ..store.reader import Run
from .columns import column_index, relative_blocks, selected_layers
from .feed import check_chunk_rows, chunk_rows_for
from .influence import FisherSums, check_full_size, fisher_sums, is_eigenbasis
from .transform import NORMALIZATIONS, Transform


def compute_fisher(run: Run, *, layers: list[str] | None, normalize: str, full: bool, part: tuple[int, int] | None,
                   chunk_rows: int | None, device: torch.device) -> FisherSums:
    """The Fisher sums of ``run`` (or of its ``part`` (i, K)) for the selected layers."""
    check_chunk_rows(chunk_rows)
    if normalize not in NORMALIZATIONS:
        raise GhostprojError(f"Unknown --normalize '{normalize}'; choose one of {', '.join(NORMALIZATIONS)}.")
    if is_eigenbasis(run):
        normalize = "none"  # EK-FAC weighs an eigenbasis run's raw coordinates by their mean squares
    selected = selected_layers(run.layers, layers)
    blocks = relative_blocks(selected)
    width = sum(b.size for b in blocks)
    if full:
        check_full_size(width)
    piece = run.part(*part) if part is not None else run
    rows = chunk_rows_for(device, chunk_rows, width, run.store_dtype, run.rows)
    sums, count = fisher_sums(piece, column_index(selected, run.dim), Transform(blocks, normalize=normalize),
                              blocks, full, rows, device)
    return FisherSums(sums, count, full, normalize, [b.name for b in blocks], run.manifest.fingerprint, part)
