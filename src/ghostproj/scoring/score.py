"""Scores between training and query vectors: dot, cosine and damped-Fisher influence,
streamed over training shards with a bounded top-k state.

Memory is bounded by the query block, one training chunk, the Fisher blocks and the top-k
state; the full N x M matrix is only held when the caller asks for it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .. import defaults
from ..engines.fp32 import mm_out_float32_supported
from ..errors import GhostprojError
from ..models import resolve_device
from ..store.fingerprint import differing_part
from ..store.reader import Run, open_run
from .columns import chunks, column_index, relative_blocks, selected_layers
from .feed import check_chunk_rows, chunk_rows_for, feed
from .influence import (
    FisherSums,
    check_fisher,
    check_full_size,
    ekfac_scale,
    fisher_blocks,
    is_eigenbasis,
    mean_squares,
    precondition,
)
from .topk import StreamingTopK
from .transform import NORMALIZATIONS, Transform

METRICS = ("cosine", "dot", "influence", "influence-full")
# the defaults: the best linear datamodeling score measured (README, "Choosing a metric")
DEFAULT_METRIC, DEFAULT_NORMALIZE = defaults.METRIC, defaults.NORMALIZE
REDUCTIONS = ("mean", "max")


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


def score(
    train,
    query,
    metric: str = DEFAULT_METRIC,
    normalize: str | None = DEFAULT_NORMALIZE,
    center: bool = False,
    damping: float = defaults.DAMPING,
    layers: list[str] | None = None,
    top_k: int | None = None,
    reduce: str | None = None,
    query_groups: list[str] | None = None,
    keep_matrix: bool = False,
    chunk_rows: int | None = None,
    progress=None,
    fisher: "FisherSums | str | None" = None,
    part: tuple[int, int] | None = None,
    device: str = "auto",
) -> ScoreResult:
    """Score every training vector against every query vector.

    ``train``/``query``: run directories or shard files (or opened :class:`Run` objects);
    or equal-length lists of them, one pair per checkpoint of a fine-tuning run (a
    checkpoint ensemble): each pair is transformed on its own and the scores are summed.
    ``metric``: ``influence`` (the damped per-layer Fisher inverse between the two sides) by
    default, with ``normalize='layer'`` (each layer's block to unit norm, then combined), as
    the README's "Choosing a metric" measures; ``none`` keeps the raw vectors.
    ``query_groups`` (one label per query row) makes ``reduce='max'`` take the max over
    group means (LESS-style); without it ``max`` is over single queries.
    ``progress``: an object with ``advance(n)`` called per training chunk (and, if it has
    one, ``begin()`` called once the arguments have been checked). ``fisher``: for the
    influence metrics, the Fisher sums ``ghostproj fisher`` computed (or their file), used
    instead of a pass over the training vectors (a list, one per checkpoint, for an
    ensemble). ``part`` = (i, K): score only shards i,
    i + K, ... of the training run (one of K processes; ``merge-scores`` joins them into
    exactly the single-process answer). ``device``: where the products run (``auto``: a GPU
    when there is one; 16-bit vectors multiply there in their dtype, README "Scoring").
    ``chunk_rows``: training rows per chunk (:func:`chunk_rows_for`).
    """
    t0 = time.perf_counter()
    check_choices(metric, normalize or "none", reduce, damping)
    if part is not None and (center or (metric.startswith("influence") and fisher is None)):
        raise GhostprojError("Scoring in parts needs the whole run's statistics: no --center, and influence "
                             "with --fisher (from `ghostproj fisher`).")
    where = resolve_device(device)
    check_chunk_rows(chunk_rows)
    pairs, fishers = _pairs_with_fishers(train, query, fisher)
    n_train, n_query = pairs[0][0].rows, pairs[0][1].rows
    notes = _repeated_matrices_note(pairs)
    top_k = _clamped_top_k(top_k, n_train, notes)
    groups = _query_groups(query_groups, n_query) if reduce == "max" and query_groups is not None else None
    if progress is not None and hasattr(progress, "begin"):
        progress.begin()  # every check has passed: show the bar from here
    sides = [_side(t, q, metric, normalize or "none", center, damping, layers, f, chunk_rows, where)
             for (t, q), f in zip(pairs, fishers)]
    if part is not None:
        for side in sides:
            side.run = side.run.part(*part)
    result = _streamed(sides, where, keep_matrix, top_k, reduce, groups, progress)
    result.seconds, result.notes = time.perf_counter() - t0, notes
    return result


def _streamed(sides: list, where: torch.device, keep_matrix: bool, top_k: int | None, reduce: str | None,
              groups, progress) -> ScoreResult:
    """One pass over the training rows of every checkpoint's side, keeping what was asked."""
    n_train, n_query = sides[0].run.rows, len(sides[0].query_index)
    matrix = torch.empty(n_train, n_query, dtype=torch.float32) if keep_matrix else None
    train_index = torch.empty(n_train, dtype=torch.long)
    best = StreamingTopK(top_k) if top_k is not None else None
    selection, flops = stream_ensemble(sides, where, train_index, matrix, reduce, groups[1] if groups else None,
                                       best, progress)
    topk_scores, topk_train = best.result() if best is not None else (None, None)
    if topk_scores is not None:
        topk_scores, topk_train = topk_scores.cpu(), topk_train.cpu()
    return ScoreResult(train_index, sides[0].query_index, matrix, topk_scores, topk_train, selection,
                       groups[0] if groups else [], 0.0, flops, [])


def _pairs_with_fishers(train, query, fisher) -> tuple[list[tuple[Run, Run]], list]:
    """The (training, query) run pairs, one per checkpoint, with each one's Fisher (or None)."""
    pairs = checkpoint_pairs(train, query)
    fishers = list(fisher) if isinstance(fisher, (list, tuple)) else [fisher] * len(pairs)
    if len(fishers) != len(pairs) or (len(pairs) > 1 and fisher is not None and not isinstance(fisher, (list, tuple))):
        raise GhostprojError(f"Give one --fisher file per checkpoint ({len(pairs)}), in the order of the runs.")
    if pairs[0][1].rows == 0:
        raise GhostprojError("The query set is empty.")
    if pairs[0][0].rows == 0:
        raise GhostprojError("The training set is empty.")
    return pairs, fishers


def _repeated_matrices_note(pairs: list[tuple[Run, Run]]) -> list[str]:
    repeated = repeated_matrices(pairs)
    if not repeated:
        return []
    return [f"Checkpoint(s) {', '.join(map(str, repeated))} use an earlier checkpoint's projection matrices (the same "
            "--seed), so their projection errors add up instead of averaging out; project each checkpoint with its "
            "own --seed (README, \"Checkpoint ensembles\")."]


def checkpoint_pairs(train, query) -> list[tuple[Run, Run]]:
    """(training run, query run) per checkpoint, opened and checked: each pair comparable,
    and every checkpoint holding the same examples in the same rows and shards."""
    trains = list(train) if isinstance(train, (list, tuple)) else [train]
    queries = list(query) if isinstance(query, (list, tuple)) else [query]
    if len(trains) != len(queries) or not trains:
        raise GhostprojError("Give one query run per training run (TRAIN QUERY [TRAIN QUERY ...]).")
    pairs = [(t if isinstance(t, Run) else open_run(t), q if isinstance(q, Run) else open_run(q))
             for t, q in zip(trains, queries)]
    for t, q in pairs:
        check_comparable(t, q)
    first_t, first_q = pairs[0]
    for c, (t, q) in enumerate(pairs[1:], start=2):
        if [i.name for i in t.layers] != [i.name for i in first_t.layers] or t.dim != first_t.dim:
            raise GhostprojError(f"Checkpoint {c}'s runs project other layers or ranks than checkpoint 1's.")
        for mine, theirs, what in ((t, first_t, "training"), (q, first_q, "query")):
            same_rows = [h.tensors["grads"][1][0] for h in mine.shards] == \
                        [h.tensors["grads"][1][0] for h in theirs.shards]
            if not same_rows or not torch.equal(mine.read_column("index"), theirs.read_column("index")):
                raise GhostprojError(f"Checkpoint {c}'s {what} run holds other examples (or other shards) than "
                                     f"checkpoint 1's; project the same data with the same --shard-size.")
    return pairs


def repeated_matrices(pairs: list[tuple[Run, Run]]) -> list[int]:
    """The checkpoints (1-based) of an ensemble projected with the same matrices as an
    earlier one. The projection error of a score is fixed by its matrices, so checkpoints
    that share them repeat one error, while matrices of their own average it out like a
    higher rank (README, "Checkpoint ensembles"). Bare shard files record no matrices."""
    seen, repeated = set(), []
    for c, (t, _) in enumerate(pairs, start=1):
        matrices = (t.manifest.fingerprint_parts or {}).get("projector")
        if matrices is not None and matrices in seen:
            repeated.append(c)
        seen.add(matrices)
    return repeated


@dataclass
class _Side:
    """One checkpoint's part of a score: its training run, the columns read, the transform
    of its training rows and its finished query block [D', M]."""

    run: Run
    cols: torch.Tensor | None
    transform: Transform
    q_t: torch.Tensor
    query_index: torch.Tensor
    chunk_rows: int


def _side(train_run: Run, query_run: Run, metric, normalize, center, damping, layers, fisher, chunk_rows,
          where) -> _Side:
    selected = selected_layers(train_run.layers, layers)
    cols = column_index(selected, train_run.dim)
    blocks = relative_blocks(selected)
    transform = Transform(blocks, normalize=normalize, unit_last=(metric == "cosine"))
    width = sum(b.size for b in blocks)
    rows_per_chunk = chunk_rows_for(where, chunk_rows, width, train_run.store_dtype, train_run.rows)
    if center:
        transform.mean = training_mean(train_run, cols, rows_per_chunk, width, where)
    if metric.startswith("influence") and is_eigenbasis(train_run):
        transform.scale = _ekfac_scale(train_run, cols, blocks, metric, damping, fisher, rows_per_chunk, where)
        query_index, q = query_side(query_run, cols, rows_per_chunk, transform)
        return _Side(train_run, cols, transform, q.t().contiguous(), query_index, rows_per_chunk)
    query_index, q = query_side(query_run, cols, rows_per_chunk, transform)
    if metric.startswith("influence"):
        full = metric == "influence-full"
        if full:
            check_full_size(q.shape[1])
        if fisher is not None:
            fisher = fisher if isinstance(fisher, FisherSums) else FisherSums.load(fisher)
            check_fisher(fisher, train_run, blocks, normalize, full, center)
            fishers = fisher.fishers()
        else:
            fishers = fisher_blocks(train_run, cols, transform, blocks, full, rows_per_chunk, train_run.rows, where)
        q = precondition(q, fishers, blocks, damping, full)
    return _Side(train_run, cols, transform, q.t().contiguous(), query_index, rows_per_chunk)


def _ekfac_scale(train_run: Run, cols, blocks, metric, damping, fisher, rows_per_chunk, where) -> torch.Tensor:
    """EK-FAC's weights for an eigenbasis run, from the second moments of its raw
    coordinates (computed here, or from a Fisher file of the raw vectors)."""
    if metric == "influence-full":
        raise GhostprojError("EK-FAC weights an eigenbasis run's coordinates one by one; use --metric influence.")
    if fisher is not None:
        fisher = fisher if isinstance(fisher, FisherSums) else FisherSums.load(fisher)
        check_fisher(fisher, train_run, blocks, "none", False, False)
        diagonal = torch.cat([f.diagonal() for f in fisher.fishers()])
    else:
        diagonal = mean_squares(train_run, cols, rows_per_chunk, where)
    return ekfac_scale(diagonal, blocks, train_run, damping)


def check_choices(metric: str, normalize: str, reduce: str | None, damping: float) -> None:
    if metric not in METRICS:
        raise GhostprojError(f"Unknown --metric '{metric}'; choose one of {', '.join(METRICS)}.")
    if normalize not in NORMALIZATIONS:
        raise GhostprojError(f"Unknown --normalize '{normalize}'; choose one of {', '.join(NORMALIZATIONS)}.")
    if reduce is not None and reduce not in REDUCTIONS:
        raise GhostprojError(f"Unknown --reduce '{reduce}'; choose mean or max.")
    if not math.isfinite(damping) or damping < 0:
        raise GhostprojError(f"--damping must be a finite non-negative number, got {damping}.")


def _clamped_top_k(top_k: int | None, n_train: int, notes: list[str]) -> int | None:
    if top_k is not None and top_k < 1:
        raise GhostprojError(f"--top-k must be at least 1, got {top_k}.")
    if top_k is not None and top_k > n_train:
        notes.append(f"--top-k {top_k} is more than the {n_train} training examples; keeping all {n_train}.")
        return n_train
    return top_k


def _query_groups(query_groups: list[str], n_query: int) -> tuple[list[str], torch.Tensor]:
    """(group names, [M, G] matrix whose column g averages the queries of group g)."""
    if len(query_groups) != n_query:
        raise GhostprojError("The query groups do not match the number of query rows.")
    names = sorted(set(query_groups))
    column = {g: i for i, g in enumerate(names)}
    matrix = torch.zeros(n_query, len(names))
    for j, g in enumerate(query_groups):
        matrix[j, column[g]] = 1.0
    return names, matrix / matrix.sum(dim=0, keepdim=True)


def training_mean(train_run: Run, cols, chunk_rows: int, width: int, device: torch.device) -> torch.Tensor:
    total = torch.zeros(width, dtype=torch.float64, device=device)
    for chunk in feed(train_run, cols, chunk_rows, device):
        total += chunk.rows[: chunk.n].sum(dim=0, dtype=torch.float64)
    return (total / train_run.rows).float().cpu()


def query_side(query_run: Run, cols, chunk_rows: int, transform: Transform) -> tuple[torch.Tensor, torch.Tensor]:
    """(query dataset indices [M], transformed query vectors [M, D'])."""
    parts, index = [], []
    for idx, x in chunks(query_run, cols, chunk_rows):
        parts.append(transform(x))
        index.append(idx)
    return torch.cat(index), torch.cat(parts)


class _Product:
    """Training rows [n, D'] times the query block [D', M], giving float32 scores. On the
    CPU into the start of one reused buffer: a fresh [n, M] each chunk costs page faults,
    and the product's last bits can depend on where its output sits in memory, while a
    score must not depend on how the rows were split. On a GPU with low-precision stored
    vectors: tensor-core operands in the store dtype with float32 accumulation and result."""

    def __init__(self, q_t: torch.Tensor, store_dtype: torch.dtype, device: torch.device) -> None:
        self.q_t = q_t.to(device)
        self.buffer = None
        self.low = None
        if device.type == "cuda" and store_dtype != torch.float32 and mm_out_float32_supported(device, store_dtype):
            self.low = self.q_t.to(store_dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.low is not None:
            return torch.mm(x.to(self.low.dtype), self.low, out_dtype=torch.float32)
        if x.device.type != "cpu":
            return torch.mm(x, self.q_t)
        n = x.shape[0]
        if self.buffer is None or self.buffer.shape[0] < n:
            self.buffer = torch.empty(n, self.q_t.shape[1], dtype=torch.float32)
        return torch.mm(x, self.q_t, out=self.buffer[:n])


def stream_scores(train_run, cols, chunk_rows, device, transform, q_t, train_index, matrix, reduce, group_matrix,
                  best: StreamingTopK | None, progress) -> tuple[torch.Tensor | None, float]:
    """The streaming pass over one run's training rows: scores, the kept matrix, the
    selection scores and the running top-k. Returns (the selection scores, the multiply-adds
    done as flops)."""
    side = _Side(train_run, cols, transform, q_t, torch.empty(0), chunk_rows)
    return stream_ensemble([side], device, train_index, matrix, reduce, group_matrix, best, progress)


def stream_ensemble(sides: list[_Side], device, train_index, matrix, reduce, group_matrix,
                    best: StreamingTopK | None, progress) -> tuple[torch.Tensor | None, float]:
    """The streaming pass over the training rows of every checkpoint at once: a row's score
    is the sum of its checkpoints' scores, added in checkpoint order."""
    row, flops = 0, 0.0
    products = [_Product(s.q_t, s.run.store_dtype, device) for s in sides]
    selection = torch.empty(train_index.numel(), dtype=torch.float32, device=device) if reduce else None
    if group_matrix is not None:
        group_matrix = group_matrix.to(device)
    feeds = [feed(s.run, s.cols, sides[0].chunk_rows, device) for s in sides]
    for chunks_now in zip(*feeds):
        chunk = chunks_now[0]
        n = chunk.n
        s = products[0](sides[0].transform(chunk.rows))[:n]
        for side, product, other in zip(sides[1:], products[1:], chunks_now[1:]):
            s = s + product(side.transform(other.rows))[:n]
        index = chunk.index.to(device)
        if matrix is not None:
            matrix[row : row + n].copy_(s)
        if best is not None:
            best.add(s, index)
        flops += sum(2.0 * n * sd.q_t.shape[0] * sd.q_t.shape[1] for sd in sides)
        train_index[row : row + n] = chunk.index
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
    return (None if selection is None else selection.cpu()), flops
