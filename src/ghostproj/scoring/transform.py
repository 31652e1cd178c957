"""Centering and normalization, applied identically to training and query vectors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..store.manifest import LayerInfo

NORMALIZATIONS = ("none", "unit", "layer")


@dataclass
class Transform:
    """Centering, a per-column scale and normalization, applied identically to training and
    query vectors, in that order."""

    blocks: list[LayerInfo]
    normalize: str = "none"
    unit_last: bool = False  # cosine: unit-normalize after everything else
    mean: torch.Tensor | None = None
    scale: torch.Tensor | None = None  # EK-FAC: (Lambda + lambda)^(-1/2) per eigenbasis coordinate

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The transformed rows; ``x`` (a fresh float32 chunk) may be changed in place."""
        if self.mean is not None:
            x = x.sub_(self.mean.to(x.device))
        if self.scale is not None:
            x = x.mul_(self.scale.to(x.device))
        if self.normalize == "layer":
            unit_blocks_(x, self.blocks)
        if self.normalize == "unit" or self.unit_last:
            unit_rows_(x)
        return x


def unit_rows_(x: torch.Tensor) -> torch.Tensor:
    """Scale each row of ``x`` (a matrix or a view of one) to unit norm in place; zero rows
    (no label positions) stay zero, so they score 0, never NaN."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x.mul_(torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm)))


def unit_blocks_(x: torch.Tensor, blocks: list[LayerInfo]) -> None:
    """Each layer's block of every row to unit norm, in place: one pass over a [n, L, s]
    view when the blocks are of equal size (the usual case), else block by block."""
    sizes = {b.size for b in blocks}
    if len(sizes) == 1 and x.is_contiguous():
        unit_rows_(x.view(x.shape[0], len(blocks), sizes.pop()))
        return
    for b in blocks:
        unit_rows_(x[:, b.offset : b.offset + b.size])
