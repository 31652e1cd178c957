"""The k best training rows per query over a stream of score chunks."""

from __future__ import annotations

import torch

_NONE = torch.iinfo(torch.int64).max  # the dataset index of "no candidate"


def ranked(vals: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of each row of candidates [M, c] in the order (score desc, index asc)."""
    by_index = ids.argsort(dim=1, stable=True)
    vals, ids = vals.gather(1, by_index), ids.gather(1, by_index)
    by_score = vals.argsort(dim=1, descending=True, stable=True)[:, :k]
    return vals.gather(1, by_score), ids.gather(1, by_score)


class StreamingTopK:
    """The k best training rows per query over a stream of score chunks, in O(M k) memory:
    each chunk's best k first, then a merge with the running best, so the merge stays
    [M, 2k] however large the chunk.

    Ties are broken by the smaller dataset index, so the answer is one and the same however
    the rows are split into chunks, shards or processes (duplicate texts tie exactly)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.values: torch.Tensor | None = None  # [M, <=k] best first
        self.ids: torch.Tensor | None = None  # [M, <=k] dataset indices

    def add(self, scores: torch.Tensor, index: torch.Tensor) -> None:
        """``scores`` [n, M] of the training rows whose dataset indices are ``index`` [n]."""
        vals, ids = _chunk_best(scores, index, min(self.k, scores.shape[0]))
        self.merge(vals, ids)

    def merge(self, vals: torch.Tensor, ids: torch.Tensor) -> None:
        """Candidates [M, c] (scores, dataset indices), e.g. another process's best k."""
        if self.values is not None:
            vals, ids = torch.cat([self.values, vals], dim=1), torch.cat([self.ids, ids], dim=1)
        self.values, self.ids = ranked(vals, ids, min(self.k, vals.shape[1]))

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scores, dataset indices) [M, <=k], best first; -1 where no row was found, so no
        answer ever names a row that does not exist."""
        if self.ids is None:
            return self.values, self.ids
        return self.values, torch.where(self.ids == _NONE, torch.full_like(self.ids, -1), self.ids)


def _chunk_best(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's k best rows of a chunk in the order (score desc, index asc), as [M, k]."""
    # one more than k: the set of the k best is settled unless the (k+1)-th score equals the k-th
    vals, pos = scores.topk(min(k + 1, scores.shape[0]), dim=0)
    kth = vals[k - 1]
    if vals.shape[0] == k or bool((vals[k] < kth).all()):
        return ranked(vals[:k].t(), index[pos[:k].t()], k)
    # a tie at the boundary: every row above the k-th score, and the tied rows of smallest index
    rows = index.unsqueeze(1)
    above = torch.where(scores > kth, rows, _NONE).topk(k, dim=0, largest=False).values
    tied = torch.where(scores == kth, rows, _NONE).topk(k, dim=0, largest=False).values
    ids = torch.cat([above, tied]).t()  # [M, 2k]
    found = ids != _NONE
    order = index.argsort()  # dataset index -> row of the chunk, by binary search
    pos = order[torch.searchsorted(index[order], torch.where(found, ids, index[order[0]]).contiguous())]
    cand = scores.t().gather(1, pos)
    cand = torch.where(found, cand, torch.full_like(cand, float("-inf")))
    return ranked(cand, ids, k)
