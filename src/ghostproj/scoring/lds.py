"""The linear datamodeling score (LDS): how well summed attribution scores predict what
retraining on a subset does to each query.

For subset models s = 1..S trained on subsets S_s of the training set, the prediction for
query j is the sum of the attribution scores of the subset's examples,
``pred[s, j] = sum_{i in S_s} score[i, j]``, and the outcome is the query's negated loss
under that model (a positive score says the example lowers the query's loss). The LDS of
query j is the Spearman correlation over s of the two; the reported LDS is its mean over
queries. The interval resamples subsets and queries together (a paired bootstrap: every
setting sees the same resamples, so their difference has an interval too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks along axis 0 (1-based), ties sharing their average rank, for every column."""
    below = (a[:, None, :] > a[None, :, :]).sum(axis=1)
    equal = (a[:, None, :] == a[None, :, :]).sum(axis=1)
    return below + (equal + 1) / 2.0


def spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``x`` [S, M] with the same column of ``y``;
    NaN where either column is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx = rx - rx.mean(axis=0)
    ry = ry - ry.mean(axis=0)
    denom = np.sqrt((rx * rx).sum(axis=0) * (ry * ry).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(axis=0) / np.where(denom > 0, denom, 1.0), np.nan)


def subset_predictions(scores: np.ndarray, members: np.ndarray) -> np.ndarray:
    """``pred[s, j]``: the summed scores [N, M] of subset s's members (``members`` [S, N] bool)."""
    return members.astype(np.float64) @ scores.astype(np.float64)


@dataclass
class LdsEstimate:
    value: float  # mean LDS over queries
    low: float  # 95% bootstrap interval
    high: float
    per_query: np.ndarray  # [M]
    replicates: np.ndarray  # [B] the bootstrap means, paired across settings


def resamples(n_subsets: int, n_queries: int, replicates: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(subset draws [B, S], query draws [B, M]) with replacement; shared by every setting."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, n_subsets, size=(replicates, n_subsets)),
            rng.integers(0, n_queries, size=(replicates, n_queries)))


def estimate_lds(scores: np.ndarray, members: np.ndarray, losses: np.ndarray,
                 draws: tuple[np.ndarray, np.ndarray]) -> LdsEstimate:
    """The mean LDS with a 95% percentile interval over ``draws`` (from :func:`resamples`)."""
    pred, actual = subset_predictions(scores, members), -losses
    per_query = spearman_columns(pred, actual)
    means = np.empty(draws[0].shape[0])
    for b, (s_idx, q_idx) in enumerate(zip(*draws)):
        means[b] = np.nanmean(spearman_columns(pred[s_idx][:, q_idx], actual[s_idx][:, q_idx]))
    low, high = np.nanpercentile(means, [2.5, 97.5])
    return LdsEstimate(float(np.nanmean(per_query)), float(low), float(high), per_query, means)


def difference_interval(a: LdsEstimate, b: LdsEstimate) -> tuple[float, float, float]:
    """(a - b, and its 95% interval from the paired replicates)."""
    diff = a.replicates - b.replicates
    low, high = np.nanpercentile(diff, [2.5, 97.5])
    return a.value - b.value, float(low), float(high)
