"""Scores between training and query vectors: dot, cosine and damped-Fisher influence,
streamed over training shards with a bounded top-k state.

Memory is bounded by the query block, one training chunk, the Fisher blocks and the top-k
state; the full N x M matrix is only held when the caller asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import GhostprojError
from .layers import LayerInfo, pattern_matches
from .store import Run, differing_part, open_run

METRICS = ("cosine", "dot", "influence", "influence-full")
NORMALIZATIONS = ("none", "unit", "layer")
REDUCTIONS = ("mean", "max")


@dataclass
class Projections:
    """Vectors of a run as returned by :func:`load_projections`."""

    grads: torch.Tensor | list[torch.Tensor]  # [N, D'] float32, or per-shard store-dtype views with mmap=True
    index: torch.Tensor  # [N] dataset rows
    loss: torch.Tensor
    tokens: torch.Tensor
    layers: list[LayerInfo]  # the selected layers, offsets relative to the selected columns
    manifest: dict


def _select_layers(layers: list[LayerInfo], patterns: list[str] | None) -> list[LayerInfo]:
    if not patterns:
        return layers
    chosen = []
    for pattern in patterns:
        hits = [info for info in layers if pattern_matches(pattern, info.name)]
        if not hits:
            raise GhostprojError(
                f"Layer pattern '{pattern}' matches no projected layer; the run has: {', '.join(i.name for i in layers)}."
            )
        chosen += [h for h in hits if h not in chosen]
    return sorted(chosen, key=lambda i: i.offset)


def _columns(selected: list[LayerInfo], dim: int) -> torch.Tensor | None:
    """Column indices of the selected blocks, or None for all columns."""
    if sum(i.size for i in selected) == dim:
        return None
    return torch.cat([torch.arange(i.offset, i.offset + i.size) for i in selected])


def _relative_blocks(selected: list[LayerInfo]) -> list[LayerInfo]:
    out, offset = [], 0
    for i in selected:
        out.append(LayerInfo(i.name, i.type, i.n_in, i.n_out, i.k_in, i.k_out, offset))
        offset += i.size
    return out


def load_projections(path, layers: list[str] | None = None, mmap: bool = False, verify: bool = True) -> Projections:
    """Vectors, dataset indices, losses and token counts of a run directory or shard file.

    ``layers`` restricts to those projected layers (patterns as in ``--layers``). With
    ``mmap=True`` the vectors stay on disk: ``grads`` is a list of per-shard memory-mapped
    tensors in the store dtype (all layers; select columns yourself with ``layers``'
    offsets); otherwise ``grads`` is one float32 tensor in memory. ``verify`` checks every
    shard's sha256 against the manifest (while reading; with ``mmap``, in one pass first).
    """
    run = open_run(path)
    selected = _select_layers(run.layers, layers)
    cols = _columns(selected, run.dim)
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
    return Projections(grads, index, loss, tokens, _relative_blocks(selected), run.manifest)


# -- the vector transform shared by both sides -------------------------------------------
@dataclass
class Transform:
    """Centering and normalization applied identically to training and query vectors."""

    blocks: list[LayerInfo]
    normalize: str = "none"
    unit_last: bool = False  # cosine: unit-normalize after everything else
    mean: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The transformed rows; ``x`` (a fresh float32 chunk) may be changed in place."""
        if self.mean is not None:
            x = x.sub_(self.mean)
        if self.normalize == "layer":
            _unit_blocks_(x, self.blocks)
        if self.normalize == "unit" or self.unit_last:
            _unit_rows_(x)
        return x


def _unit_rows_(x: torch.Tensor) -> torch.Tensor:
    """Scale each row of ``x`` (a matrix or a view of one) to unit norm in place; zero rows
    (no label positions) stay zero, so they score 0, never NaN."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x.mul_(torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm)))


def _unit_blocks_(x: torch.Tensor, blocks: list[LayerInfo]) -> None:
    """Each layer's block of every row to unit norm, in place: one pass over a [n, L, s]
    view when the blocks are of equal size (the usual case), else block by block."""
    sizes = {b.size for b in blocks}
    if len(sizes) == 1 and x.is_contiguous():
        _unit_rows_(x.view(x.shape[0], len(blocks), sizes.pop()))
        return
    for b in blocks:
        _unit_rows_(x[:, b.offset : b.offset + b.size])


@dataclass
class ScoreResult:
    train_index: torch.Tensor  # [N]
    query_index: torch.Tensor  # [M]
    scores: torch.Tensor | None = None  # [N, M] when keep_matrix
    topk_scores: torch.Tensor | None = None  # [M, K]
    topk_train: torch.Tensor | None = None  # [M, K] dataset indices, best first
    selection: torch.Tensor | None = None  # [N] per training example (reduce)
    group_names: list[str] = field(default_factory=list)
    seconds: float = 0.0
    flops: float = 0.0
    notes: list[str] = field(default_factory=list)


def check_comparable(train: Run, query: Run) -> None:
    part = differing_part(train.manifest, query.manifest)
    if part is not None:
        raise GhostprojError(
            f"The training and query runs are not comparable: their {part} differ "
            "(project the query set with --like TRAIN_DIR)."
        )
    if train.dim != query.dim:
        raise GhostprojError(f"The runs have different dimensions (train D={train.dim}, query D={query.dim}).")


def _chunked(run: Run, cols: torch.Tensor | None, chunk_rows: int):
    """float32 chunks of the selected columns; accumulation is float32 whatever the store dtype."""
    def convert(chunk: torch.Tensor) -> torch.Tensor:
        return chunk.float() if cols is None else chunk[:, cols].float()

    yield from run.iter_chunks(chunk_rows, convert=convert)


def score(
    train,
    query,
    metric: str = "cosine",
    normalize: str | None = "layer",
    center: bool = False,
    damping: float = 0.1,
    layers: list[str] | None = None,
    top_k: int | None = None,
    reduce: str | None = None,
    query_groups: list[str] | None = None,
    keep_matrix: bool = False,
    chunk_rows: int = 8192,
    progress=None,
) -> ScoreResult:
    """Score every training vector against every query vector.

    ``train``/``query``: run directories or shard files (or opened :class:`Run` objects).
    ``normalize`` defaults to ``layer`` (each layer's block to unit norm before the blocks
    are combined), which ranked best on real data (README, "Choosing a metric"); ``none``
    keeps the raw vectors. Cosine always ends with a unit normalization.
    ``query_groups`` (one label per query row) makes ``reduce='max'`` take the max over
    group means (LESS-style); without it ``max`` is over single queries.
    ``progress``: an object with ``advance(n)`` called per training chunk (and, if it has
    one, ``begin()`` called once the arguments have been checked).
    """
    import time

    t0 = time.perf_counter()
    if metric not in METRICS:
        raise GhostprojError(f"Unknown --metric '{metric}'; choose one of {', '.join(METRICS)}.")
    normalize = normalize or "none"
    if normalize not in NORMALIZATIONS:
        raise GhostprojError(f"Unknown --normalize '{normalize}'; choose one of {', '.join(NORMALIZATIONS)}.")
    if reduce is not None and reduce not in REDUCTIONS:
        raise GhostprojError(f"Unknown --reduce '{reduce}'; choose mean or max.")
    if damping < 0:
        raise GhostprojError(f"--damping must be non-negative, got {damping}.")
    train_run = train if isinstance(train, Run) else open_run(train)
    query_run = query if isinstance(query, Run) else open_run(query)
    check_comparable(train_run, query_run)
    n_train, n_query = train_run.rows, query_run.rows
    if n_query == 0:
        raise GhostprojError("The query set is empty.")
    if n_train == 0:
        raise GhostprojError("The training set is empty.")
    notes = []
    if top_k is not None and top_k < 1:
        raise GhostprojError(f"--top-k must be at least 1, got {top_k}.")
    if top_k is not None and top_k > n_train:
        notes.append(f"--top-k {top_k} is more than the {n_train} training examples; keeping all {n_train}.")
        top_k = n_train

    selected = _select_layers(train_run.layers, layers)
    cols = _columns(selected, train_run.dim)
    blocks = _relative_blocks(selected)
    transform = Transform(blocks, normalize=normalize, unit_last=(metric == "cosine"))
    if progress is not None and hasattr(progress, "begin"):
        progress.begin()  # every check has passed: show the bar from here

    if center:
        total = torch.zeros(sum(b.size for b in blocks), dtype=torch.float64)
        for _, x in _chunked(train_run, cols, chunk_rows):
            total += x.sum(dim=0, dtype=torch.float64)
        transform.mean = (total / n_train).float()

    q_parts, q_index = [], []
    for idx, x in _chunked(query_run, cols, chunk_rows):
        q_parts.append(transform(x))
        q_index.append(idx)
    q = torch.cat(q_parts)
    query_index = torch.cat(q_index)

    if metric.startswith("influence"):
        q = _precondition(train_run, cols, transform, blocks, q, damping, full=(metric == "influence-full"),
                          chunk_rows=chunk_rows, n_train=n_train)
    q_t = q.t().contiguous()  # [D', M]

    group_matrix, group_names = None, []
    if reduce == "max" and query_groups is not None:
        if len(query_groups) != n_query:
            raise GhostprojError("The query groups do not match the number of query rows.")
        group_names = sorted(set(query_groups))
        gi = {g: i for i, g in enumerate(group_names)}
        group_matrix = torch.zeros(n_query, len(group_names))
        for j, g in enumerate(query_groups):
            group_matrix[j, gi[g]] = 1.0
        group_matrix /= group_matrix.sum(dim=0, keepdim=True)

    matrix = torch.empty(n_train, n_query, dtype=torch.float32) if keep_matrix else None
    selection = torch.empty(n_train, dtype=torch.float32) if reduce else None
    train_index = torch.empty(n_train, dtype=torch.long)
    best = StreamingTopK(top_k) if top_k is not None else None
    flops = _score_chunks(train_run, cols, chunk_rows, transform, q_t, train_index, matrix, selection, reduce,
                          group_matrix, best, progress)
    topk_scores, topk_train = best.result() if best is not None else (None, None)
    return ScoreResult(train_index, query_index, matrix, topk_scores, topk_train, selection, group_names,
                       time.perf_counter() - t0, flops, notes)


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


def _score_chunks(train_run, cols, chunk_rows, transform, q_t, train_index, matrix, selection, reduce,
                  group_matrix, best: StreamingTopK | None, progress) -> float:
    """The streaming pass over the training rows: scores, the kept matrix, the selection
    scores and the running top-k. Returns the multiply-adds done, as flops."""
    row, flops = 0, 0.0
    buffer = None  # scores of one chunk, reused: a fresh [n, M] each chunk costs page faults
    for idx, x in _chunked(train_run, cols, chunk_rows):
        n = x.shape[0]
        if matrix is not None:
            s = matrix[row : row + n]
        else:
            if buffer is None or buffer.shape[0] < n:
                buffer = torch.empty(n, q_t.shape[1], dtype=torch.float32)
            s = buffer[:n]
        torch.mm(transform(x), q_t, out=s)
        if best is not None:
            best.add(s, idx)
        flops += 2.0 * n * q_t.shape[0] * q_t.shape[1]
        train_index[row : row + n] = idx
        if selection is not None:
            if reduce == "mean":
                selection[row : row + n] = s.mean(dim=1)
            elif group_matrix is not None:
                selection[row : row + n] = (s @ group_matrix).max(dim=1).values
            else:
                selection[row : row + n] = s.max(dim=1).values
        row += n
        if progress is not None:
            progress.advance(n)
    return flops


def fisher_blocks(train_run: Run, cols, transform: Transform, blocks: list[LayerInfo], full: bool,
                  chunk_rows: int, n_train: int) -> list[torch.Tensor]:
    """F = (1/N) sum_i g_i g_i^T per layer block (or one D' x D' block), float64."""
    spans = [(0, sum(b.size for b in blocks))] if full else [(b.offset, b.offset + b.size) for b in blocks]
    sums = [torch.zeros(e - s, e - s, dtype=torch.float64) for s, e in spans]
    for _, x in _chunked(train_run, cols, chunk_rows):
        x = transform(x)
        for acc, (s, e) in zip(sums, spans):
            block = x[:, s:e]
            acc += (block.t() @ block).double()
    return [acc / n_train for acc in sums]


MAX_FULL_FISHER_DIM = 16384  # a D x D float64 Fisher of 2 GiB


def _precondition(train_run, cols, transform, blocks, q, damping, full, chunk_rows, n_train) -> torch.Tensor:
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
