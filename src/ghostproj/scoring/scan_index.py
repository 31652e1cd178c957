"""The indexes that need nothing beyond torch: the scan index (approximate top-k for
gradient-like vectors in under a quarter of their float32 memory) and the exact flat one.

Projected gradients are close to isotropic (hundreds of directions share the variance,
and a query's best rows lie all over the space), so partitioning indexes such as IVF
must probe most of their lists for high recall. What does pay on a CPU is the fastest
exhaustive product there is, over a few dimensions, followed by an accurate re-ranking
of a few rows per query:

1. the head: each row's coordinates on the principal directions of the training rows
   that hold HEAD_VARIANCE of their variance, as int8 codes with one scale per direction. Every query scores every
   row with one int8 matrix product (``torch._int_mm``) and keeps the rows above a
   per-query threshold, set so that about ``candidates`` rows pass (estimated on every
   16th row).
2. the residual: what the dequantized head leaves of each row, as 6-bit codes with one
   scale per column, packed three bytes per four values, and one factor per row that
   widens the scales for a row they would clip (an outlier row keeps its size, coarser).
   The candidates are re-scored as head + residual, which is within the codes' rounding
   of the exact inner product.

A row whose head coordinates exceed the codes' range (the scales come from a sample) is
kept aside with its exact head coordinates: its head score is computed in float for
every query, since clipped codes would understate it, and such rows (the largest, under
dot products) are the ones most often in a top-k. Its residual carries what its codes
lost, so its re-ranked score is as exact as any other row's.

The head product runs over BLOCK rows at a time so that its scores stay in the cache; a
block's scores are reduced to their maxima over groups of GROUP rows before the
threshold compares them, which is what keeps the selection from costing more than the
product itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch

from ..errors import GhostprojError
from .topk import StreamingTopK, ranked

BLOCK = 8192  # rows per head product
GROUP = 16  # rows per maximum in the threshold pass
SAMPLE_STRIDE = 16  # every 16th row sets each query's threshold
HEAD_LEVELS = 127  # int8 head codes in [-127, 127]
HEAD_HEADROOM = 1.5  # the head scales cover 1.5x the sample's range: rows beyond it are rare
RESIDUAL_LEVELS = 31  # 6-bit residual codes in [-31, 31], stored +31
DEFAULT_CANDIDATES = 256
# The head holds this share of the rows' variance: chosen by recall on gradient-like vectors
# (benchmarks/README.md, "The index on gradient-like vectors"); a smaller share lost recall.
HEAD_VARIANCE = 0.7
MAX_HEAD_DIMS = 1024
FACTORY = re.compile(r"^Scan(\d+)?$")


def parse_factory(factory: str) -> int | None:
    """The head width of a ``Scan`` or ``Scan<d>`` factory string (0: chosen from the
    variance), or None when the string names another index."""
    m = FACTORY.match(factory)
    if m is None:
        return None
    return int(m.group(1) or 0)


def pack6(codes: torch.Tensor) -> torch.Tensor:
    """Codes [n, 4m] in [0, 63] as uint8 planes [n, 3m]: columns m..4m in the low six
    bits of the three planes, the first m columns two bits in the top of each plane."""
    n, width = codes.shape
    m = width // 4
    c = codes.to(torch.uint8)
    low, first = c[:, m:].reshape(n, 3, m), c[:, :m]
    shifts = torch.tensor([0, 2, 4], dtype=torch.uint8).view(1, 3, 1)
    top = ((first.unsqueeze(1) >> shifts) & 3) << 6
    return (low | top).reshape(n, 3 * m)


def unpack6(planes: torch.Tensor) -> torch.Tensor:
    """The inverse of pack6: uint8 [n, 3m] -> uint8 codes [n, 4m]."""
    n, three_m = planes.shape
    m = three_m // 3
    out = torch.empty(n, 4 * m, dtype=torch.uint8)
    torch.bitwise_and(planes, 63, out=out[:, m:])
    top = planes >> 6
    out[:, :m] = top[:, :m] | (top[:, m:2 * m] << 2) | (top[:, 2 * m:] << 4)
    return out


class ScanIndex:
    """Head codes, residual codes and dataset indices of N rows; ``search`` gives the
    approximate top-k by inner product."""

    def __init__(self, basis: torch.Tensor, head_scale: torch.Tensor, residual_scale: torch.Tensor,
                 head: torch.Tensor, residual: torch.Tensor, row_scale: torch.Tensor, ids: torch.Tensor,
                 clipped_rows: torch.Tensor, clipped_head: torch.Tensor, candidates: int):
        self.basis = basis  # [d, D] float32, orthonormal rows
        self.head_scale = head_scale  # [d]
        self.residual_scale = residual_scale  # [D'], D' = D rounded up to a multiple of 4
        self.head = head  # [N, d] int8
        self.residual = residual  # [N, 3 D' / 4] uint8 (pack6)
        self.row_scale = row_scale  # [N] float32, >= 1: the residual scales' factor for each row
        self.ids = ids  # [N] int64 dataset indices
        self.clipped_rows = clipped_rows  # [C] int64 positions of the rows whose head codes clip
        self.clipped_head = clipped_head  # [C, d] float32: their head coordinates over the scales
        self.candidates = candidates

    @property
    def ntotal(self) -> int:
        return self.ids.numel()

    @property
    def width(self) -> int:
        return self.basis.shape[1]

    @property
    def head_dims(self) -> int:
        return self.basis.shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    # --- building -------------------------------------------------------------------

    @classmethod
    def build(cls, sample: torch.Tensor, rows: int, chunks: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
              head_dims: int, candidates: int) -> ScanIndex:
        """Fit the basis and the scales on ``sample`` (transformed rows [n, D]), then
        encode the ``rows`` rows that ``chunks()`` yields as (dataset indices, transformed
        rows). ``head_dims`` 0: the fewest directions holding HEAD_VARIANCE of the sample's."""
        width = sample.shape[1]
        basis = principal_directions(sample, head_dims or None)
        head_scale = _scale((sample @ basis.t()).abs().amax(0) * HEAD_HEADROOM, HEAD_LEVELS)
        padded = -(-width // 4) * 4
        residual_scale = torch.ones(padded)
        residual_scale[:width] = _scale(_residual(sample, basis, head_scale).abs().amax(0), RESIDUAL_LEVELS)
        head = torch.empty(rows, basis.shape[0], dtype=torch.int8)
        residual = torch.empty(rows, padded // 4 * 3, dtype=torch.uint8)
        row_scale = torch.empty(rows)
        ids = torch.empty(rows, dtype=torch.long)
        clipped_rows, clipped_head = [], []
        for at, idx, x in _positioned(chunks(), rows):
            n = x.shape[0]
            exact = (x @ basis.t()) / head_scale
            clipped = (exact.abs() > HEAD_LEVELS + 0.5).any(1).nonzero().flatten()
            clipped_rows.append(at + clipped)
            clipped_head.append(exact[clipped])
            h = exact.round().clamp_(-HEAD_LEVELS, HEAD_LEVELS).to(torch.int8)
            r = (x - (h.float() * head_scale) @ basis) / residual_scale[:width]
            factor = (r.abs().amax(1) / RESIDUAL_LEVELS).clamp_min(1.0)
            r = (r / factor[:, None]).round_().clamp_(-RESIDUAL_LEVELS, RESIDUAL_LEVELS)
            head[at:at + n] = h
            residual[at:at + n] = pack6(torch.nn.functional.pad(r + RESIDUAL_LEVELS, (0, padded - width))
                                        .to(torch.uint8))
            row_scale[at:at + n] = factor
            ids[at:at + n] = idx
        return cls(basis, head_scale, residual_scale, head, residual, row_scale, ids, torch.cat(clipped_rows),
                   torch.cat(clipped_head), candidates)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"basis": self.basis, "head_scale": self.head_scale, "residual_scale": self.residual_scale,
                "head": self.head, "residual": self.residual, "row_scale": self.row_scale, "ids": self.ids,
                "clipped_rows": self.clipped_rows, "clipped_head": self.clipped_head}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], candidates: int) -> ScanIndex:
        return cls(t["basis"], t["head_scale"], t["residual_scale"], t["head"], t["residual"], t["row_scale"],
                   t["ids"], t["clipped_rows"], t["clipped_head"], candidates)

    # --- searching ------------------------------------------------------------------

    def search(self, q: torch.Tensor, k: int, candidates: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [M, k'], dataset indices [M, k']) best first, ties by the smaller dataset
        index, k' = min(k, N)."""
        q = q.float()
        k = min(k, self.ntotal)
        want = max(candidates or self.candidates, k)
        head_q = (q @ self.basis.t()) * self.head_scale
        residual_q = torch.nn.functional.pad(q, (0, self.residual_scale.numel() - q.shape[1])) * self.residual_scale
        if want * 4 >= self.ntotal:  # a few rows: re-score them all
            return self._rescore_all(head_q, residual_q, k)
        query_of, row_of = self._head_pass(head_q, want, k)
        return self._rescore(head_q, residual_q, query_of, row_of, k)

    def _head_pass(self, head_q: torch.Tensor, want: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, row) of the pairs whose int8 head score reaches the query's threshold:
        about ``want`` rows per query, at least k."""
        q8, q_scale = _quantize_rows(head_q)
        int_thresholds = self._thresholds(q8, want)
        thresholds = int_thresholds.t()  # [1, M]
        query_of, row_of = [], []
        m = q8.shape[0]
        q_block = 256
        for start in range(0, self.ntotal, BLOCK):
            block = self.head[start:start + BLOCK]
            n = block.shape[0]
            span = -(-n // GROUP)  # group g holds the rows g, g + span, ...: a maximum across
            # slices is a vertical SIMD reduction, six times the speed of one along rows
            for s in range(0, m, q_block):
                scores = torch._int_mm(block, q8[s:s + q_block].t())  # [n, queries]
                if n % GROUP:
                    scores = torch.cat([scores, scores.new_full((GROUP * span - n, scores.shape[1]),
                                                                torch.iinfo(torch.int32).min)])
                width = scores.shape[1]
                scores = scores.view(GROUP, span * width)
                thr = thresholds[0, s:s + q_block]
                hit = (scores.view(GROUP, span, width).amax(0) >= thr).view(-1).nonzero().flatten()  # g * width + q
                if hit.numel() == 0:
                    continue
                query = hit % width
                in_group = (scores.index_select(1, hit) >= thr[query]).nonzero()  # (slice, hit)
                query_of.append(s + query[in_group[:, 1]])
                row_of.append(start + in_group[:, 0] * span + hit[in_group[:, 1]] // width)
        empty = torch.empty(0, dtype=torch.long)
        query_of = torch.cat(query_of) if query_of else empty
        row_of = torch.cat(row_of) if row_of else empty
        if self.clipped_rows.numel():  # their float head scores against the same thresholds
            unclipped = ~torch.isin(row_of, self.clipped_rows)
            query_of, row_of = query_of[unclipped], row_of[unclipped]
            scores = head_q @ self.clipped_head.t()  # head_q carries the scales: the int8 score's units
            passed = (scores >= int_thresholds.float() * q_scale).nonzero()
            query_of = torch.cat([query_of, passed[:, 0]])
            row_of = torch.cat([row_of, self.clipped_rows[passed[:, 1]]])
        short = (torch.bincount(query_of, minlength=m) < k).nonzero().flatten()
        if short.numel():  # a threshold set too high by the sample: take those queries' best head scores
            kept = ~torch.isin(query_of, short)
            best = self._head_top(q8[short], want)
            pairs = torch.stack([short.repeat_interleave(best.shape[1]), best.flatten()])
            if self.clipped_rows.numel():  # and every clipped row, once
                pairs = pairs[:, ~torch.isin(pairs[1], self.clipped_rows)]
                pairs = torch.cat([pairs, torch.cartesian_prod(short, self.clipped_rows).t()], 1)
            query_of = torch.cat([query_of[kept], pairs[0]])
            row_of = torch.cat([row_of[kept], pairs[1]])
        return query_of, row_of

    def _thresholds(self, q8: torch.Tensor, want: int) -> torch.Tensor:
        """Per query [M, 1] int32: the head score that about ``want`` of the N rows reach,
        read off every SAMPLE_STRIDE-th row."""
        scores = torch._int_mm(q8, self.head[::SAMPLE_STRIDE].contiguous().t())  # [M, rows / stride]
        place = max(1, min(scores.shape[1], round(want * scores.shape[1] / self.ntotal)))
        return scores.topk(place, dim=1).values[:, -1:]

    def _head_top(self, q8: torch.Tensor, n: int) -> torch.Tensor:
        """Rows [M', n] of the n best int8 head scores of each query, over every row."""
        best_scores, best_rows = None, None
        for start in range(0, self.ntotal, BLOCK):
            scores = torch._int_mm(q8, self.head[start:start + BLOCK].t())
            rows = torch.arange(start, start + scores.shape[1]).expand_as(scores)
            if best_scores is not None:
                scores, rows = torch.cat([best_scores, scores], 1), torch.cat([best_rows, rows], 1)
            top = scores.topk(min(n, scores.shape[1]), dim=1)
            best_scores, best_rows = top.values, rows.gather(1, top.indices)
        return best_rows

    def _scores(self, head_q: torch.Tensor, residual_q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[M, n]: the queries' scores with ``rows`` (sorted), head + residual, the float
        query's (the int8 one only ranks)."""
        codes = unpack6(self.residual.index_select(0, rows)).float() - RESIDUAL_LEVELS
        head = self.head.index_select(0, rows).float()
        return head_q @ head.t() + (residual_q @ codes.t()) * self.row_scale[rows]

    def _rescore(self, head_q, residual_q, query_of, row_of, k):
        """Each query's k best of its candidate rows by head + residual score."""
        order = torch.argsort(query_of, stable=True)
        query_of, row_of = query_of[order], row_of[order]
        m = residual_q.shape[0]
        counts = torch.bincount(query_of, minlength=m)
        ends = torch.cumsum(counts, 0)
        out_scores, out_ids = [], []
        q_block = 8  # queries re-scored together: the union of their rows is decoded once
        for s in range(0, m, q_block):
            e = min(s + q_block, m)
            lo, hi = int(ends[s - 1]) if s else 0, int(ends[e - 1])
            queries, rows = query_of[lo:hi] - s, row_of[lo:hi]
            unique, where = torch.unique(rows, return_inverse=True)
            pair_scores = self._scores(head_q[s:e], residual_q[s:e], unique)[queries, where]
            n = counts[s:e]
            width = int(n.max())
            slot = torch.arange(queries.numel()) - (torch.cumsum(n, 0) - n)[queries]
            vals = torch.full((e - s, width), float("-inf"))
            ids = torch.full((e - s, width), torch.iinfo(torch.int64).max)
            vals[queries, slot] = pair_scores
            ids[queries, slot] = self.ids[rows]
            v, i = ranked(vals, ids, k)
            out_scores.append(v)
            out_ids.append(i)
        return torch.cat(out_scores), torch.cat(out_ids)

    def _rescore_all(self, head_q, residual_q, k):
        best_v, best_i = None, None
        for start in range(0, self.ntotal, BLOCK):
            rows = torch.arange(start, min(start + BLOCK, self.ntotal))
            vals = self._scores(head_q, residual_q, rows)
            ids = self.ids[rows].expand_as(vals)
            if best_v is not None:
                vals, ids = torch.cat([best_v, vals], 1), torch.cat([best_i, ids], 1)
            best_v, best_i = ranked(vals, ids, k)
        return best_v, best_i


def _positioned(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], rows: int):
    """(first row, dataset indices, rows) of each chunk, checking that the chunks hold
    exactly ``rows`` rows (a run rewritten under a build would not)."""
    changed = "The training run changed while the index was being built."
    at = 0
    for idx, x in chunks:
        if at + x.shape[0] > rows:
            raise GhostprojError(changed)
        yield at, idx, x
        at += x.shape[0]
    if at != rows:
        raise GhostprojError(changed)


def principal_directions(sample: torch.Tensor, n: int | None) -> torch.Tensor:
    """The top right singular vectors [n, D] of ``sample`` [rows, D] (uncentered: the index
    serves inner products), from the smaller of its two Gram matrices. ``n`` None: the
    fewest that hold HEAD_VARIANCE of the sample's square sum, in multiples of 32, at
    most a quarter of D (the memory budget) and MAX_HEAD_DIMS."""
    x = sample.double()
    small = x.shape[0] < x.shape[1]
    vals, vecs = torch.linalg.eigh(x @ x.t() if small else x.t() @ x)
    vals, vecs = vals.flip(0).clamp_min(0), vecs.flip(1)
    if n is None:
        held = vals.cumsum(0) / vals.sum().clamp_min(1e-300)
        n = int((held < HEAD_VARIANCE).sum()) + 1
        n = min(-(-n // 32) * 32, max(1, x.shape[1] // 4), MAX_HEAD_DIMS)
    n = min(n, x.shape[1], x.shape[0])
    if not small:
        return vecs[:, :n].t().float().contiguous()
    directions = vecs[:, :n].t() @ x
    return (directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-300)).float().contiguous()


def _scale(max_abs: torch.Tensor, levels: int) -> torch.Tensor:
    return (max_abs / levels).clamp_min(1e-30).float()


def _head_codes(x: torch.Tensor, basis: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return ((x @ basis.t()) / scale).round_().clamp_(-HEAD_LEVELS, HEAD_LEVELS).to(torch.int8)


def _residual(x: torch.Tensor, basis: torch.Tensor, head_scale: torch.Tensor) -> torch.Tensor:
    return x - (_head_codes(x, basis, head_scale).float() * head_scale) @ basis


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [M, d], the scale of each row [M, 1]): the threshold pass ranks within a
    row, so one scale per query is enough."""
    scale = (x.abs().amax(1, keepdim=True) / HEAD_LEVELS).clamp_min(1e-30)
    return (x / scale).round_().clamp_(-HEAD_LEVELS, HEAD_LEVELS).to(torch.int8), scale


class FlatIndex:
    """The exact index: the transformed rows in float32, searched by one product per chunk
    (what the scan index re-ranks towards, and the right choice below 100,000 rows)."""

    def __init__(self, rows: torch.Tensor, ids: torch.Tensor):
        self.rows = rows  # [N, D] float32
        self.ids = ids  # [N] int64

    @property
    def ntotal(self) -> int:
        return self.ids.numel()

    def nbytes(self) -> int:
        return self.rows.numel() * 4 + self.ids.numel() * 8

    @classmethod
    def build(cls, rows: int, width: int, chunks: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]) \
            -> FlatIndex:
        data, ids = torch.empty(rows, width), torch.empty(rows, dtype=torch.long)
        for at, idx, x in _positioned(chunks(), rows):
            data[at:at + x.shape[0]], ids[at:at + x.shape[0]] = x, idx
        return cls(data, ids)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"rows": self.rows, "ids": self.ids}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> FlatIndex:
        return cls(t["rows"], t["ids"])

    def search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        best = StreamingTopK(min(k, self.ntotal))
        qt = q.float().t().contiguous()
        for start in range(0, self.ntotal, BLOCK):
            best.add(self.rows[start:start + BLOCK] @ qt, self.ids[start:start + BLOCK])
        return best.result()
