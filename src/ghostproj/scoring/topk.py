"""The k best training rows per query over a stream of score chunks."""

from __future__ import annotations

import torch


class StreamingTopK:
    """The k best training rows per query over a stream of score chunks, in O(M k) memory:
    each chunk's best k first, then a merge with the running best, so the merge stays
    [M, 2k] however large the chunk."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.values: torch.Tensor | None = None  # [M, <=k] best first
        self.ids: torch.Tensor | None = None  # [M, <=k] dataset indices

    def add(self, scores: torch.Tensor, index: torch.Tensor) -> None:
        """``scores`` [n, M] of the training rows whose dataset indices are ``index`` [n]."""
        vals, pos = scores.topk(min(self.k, scores.shape[0]), dim=0)
        vals, ids = vals.t(), index[pos.t()]
        if self.values is not None:
            vals = torch.cat([self.values, vals], dim=1)
            ids = torch.cat([self.ids, ids], dim=1)
            vals, pos = vals.topk(min(self.k, vals.shape[1]), dim=1)
            ids = ids.gather(1, pos)
        self.values, self.ids = vals, ids

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.values, self.ids
