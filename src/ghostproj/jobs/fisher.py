"""The fisher job: the training vectors' Fisher sums for influence scores, computed once
(or in parts by separate processes, then merged) and reused by every ``score --fisher``."""

from __future__ import annotations

import torch

from ..errors import GhostprojError
from ..models import resolve_device
from ..scoring.columns import column_index, relative_blocks, selected_layers
from ..scoring.feed import chunk_rows_for
from ..scoring.influence import FisherSums, check_full_size, fisher_sums, is_eigenbasis, merge_fisher
from ..scoring.transform import NORMALIZATIONS, Transform
from ..store.outputs import check_outputs
from ..store.reader import Run, open_run


def run_fisher(train: str, out: str, *, layers: list[str] | None, normalize: str, full: bool, num_parts: int,
               part: int, chunk_rows: int | None, overwrite: bool, device: str = "auto") -> FisherSums:
    check_outputs([(out, "--out")], [train], overwrite)
    if chunk_rows is not None and chunk_rows < 1:
        raise GhostprojError(f"--chunk-rows must be at least 1, got {chunk_rows}.")
    result = compute_fisher(open_run(train), layers=layers, normalize=normalize, full=full,
                            part=(part, num_parts) if num_parts > 1 else None, chunk_rows=chunk_rows,
                            device=resolve_device(device))
    result.save(out)
    return result


def compute_fisher(run: Run, *, layers: list[str] | None, normalize: str, full: bool, part: tuple[int, int] | None,
                   chunk_rows: int | None, device: torch.device) -> FisherSums:
    """The Fisher sums of ``run`` (or of its ``part`` (i, K)) for the selected layers."""
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
    return FisherSums(sums, count, full, normalize, [b.name for b in blocks], run.manifest["fingerprint"], part)


def run_fisher_merge(out: str, parts: list[str], overwrite: bool) -> FisherSums:
    check_outputs([(out, "OUT")], parts, overwrite)
    merged = merge_fisher([FisherSums.load(p) for p in parts])
    merged.save(out)
    return merged
