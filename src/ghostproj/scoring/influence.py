"""Influence scores: the damped per-layer (or full) Fisher of the training vectors,
applied to the query side."""

from __future__ import annotations

import torch

from ..errors import GhostprojError
from ..store.manifest import LayerInfo
from ..store.reader import Run
from .columns import chunks
from .transform import Transform


def fisher_blocks(train_run: Run, cols, transform: Transform, blocks: list[LayerInfo], full: bool,
                  chunk_rows: int, n_train: int) -> list[torch.Tensor]:
    """F = (1/N) sum_i g_i g_i^T per layer block (or one D' x D' block), float64."""
    spans = [(0, sum(b.size for b in blocks))] if full else [(b.offset, b.offset + b.size) for b in blocks]
    sums = [torch.zeros(e - s, e - s, dtype=torch.float64) for s, e in spans]
    for _, x in chunks(train_run, cols, chunk_rows):
        x = transform(x)
        for acc, (s, e) in zip(sums, spans):
            block = x[:, s:e]
            acc += (block.t() @ block).double()
    return [acc / n_train for acc in sums]


MAX_FULL_FISHER_DIM = 16384  # a D x D float64 Fisher of 2 GiB


def precondition(train_run, cols, transform, blocks, q, damping, full, chunk_rows, n_train) -> torch.Tensor:
    """(F_l + lambda_l I)^{-1} applied to each query block; lambda_l = damping * mean diag F_l."""
    if full and q.shape[1] > MAX_FULL_FISHER_DIM:
        d = q.shape[1]
        raise GhostprojError(
            f"influence-full needs a {d} x {d} Fisher matrix ({d * d * 8 / 2**30:.1f} GiB); use --metric influence "
            "(one block per layer) or score fewer --layers."
        )
    fishers = fisher_blocks(train_run, cols, transform, blocks, full, chunk_rows, n_train)
    spans = [(0, q.shape[1])] if full else [(b.offset, b.offset + b.size) for b in blocks]
    out = torch.empty_like(q)
    for f, (s, e) in zip(fishers, spans):
        lam = damping * float(f.diagonal().mean())
        if lam <= 0:
            lam = 1e-12  # an all-zero block: any damping keeps the solve defined
        a = f + lam * torch.eye(f.shape[0], dtype=torch.float64)
        try:
            out[:, s:e] = torch.linalg.solve(a, q[:, s:e].double().t()).t().float()
        except torch.linalg.LinAlgError:
            raise GhostprojError("The damped Fisher matrix is singular; use a positive --damping.") from None
    return out
