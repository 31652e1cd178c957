"""Projection matrices: the rank split, the seeded generation rule and the projector file.

The generation rule is part of the file-format contract (DESIGN.md §1): any version of
ghostproj on any device must produce bit-identical matrices for the same seed, layer name
and side, which is why they are always drawn on the CPU from a per-matrix seed derived by
sha256 rather than from a global generator.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from ..errors import GhostprojError
from ..store.fingerprint import hash_tensors

PROJECTOR_KINDS = ("gaussian", "rademacher", "orthonormal")


def matrix_seed(seed: int, layer_name: str, side: str) -> int:
    digest = hashlib.sha256(f"{seed}:{layer_name}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_matrix(kind: str, k: int, n: int, seed: int, layer_name: str, side: str) -> torch.Tensor:
    """The (k, n) float32 CPU matrix of DESIGN.md's generation rule."""
    if side not in ("in", "out"):
        raise ValueError(f"side must be 'in' or 'out', not {side!r}")
    g = torch.Generator("cpu").manual_seed(matrix_seed(seed, layer_name, side))
    if kind == "gaussian":
        return torch.randn(k, n, generator=g, dtype=torch.float32) / math.sqrt(k)
    if kind == "rademacher":
        return (torch.randint(0, 2, (k, n), generator=g) * 2 - 1).float() / math.sqrt(k)
    if kind == "orthonormal":
        if k > n:
            raise GhostprojError(f"An orthonormal projector needs k <= n, got k={k} > n={n} for {layer_name}.")
        q = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
        return (q.T * math.sqrt(n / k)).float()
    raise GhostprojError(f"Unknown projector '{kind}'; choose one of {', '.join(PROJECTOR_KINDS)}.")


def choose_ranks(rank: int, n_in: int, n_out: int, rank_min: int = 1) -> tuple[int, int]:
    """Split a per-layer budget ``rank`` into (k_in, k_out) with k_in * k_out <= rank.

    Rule: start from the balanced split k_in = floor(sqrt(rank)), capped to n_in; give
    k_out the rest of the budget (rank // k_in), capped to n_out; if k_out hit its cap,
    hand the freed budget back to k_in (rank // k_out, capped to n_in). Each side is at
    least ``rank_min`` unless its dimension is smaller. A balanced split keeps both
    sketches equally faithful; the rebalancing keeps narrow layers from wasting budget.
    """
    if rank < 1:
        raise GhostprojError(f"--rank must be at least 1, got {rank}.")
    if rank_min < 1:
        raise GhostprojError(f"--rank-min must be at least 1, got {rank_min}.")
    lo_in, lo_out = min(rank_min, n_in), min(rank_min, n_out)
    if lo_in * lo_out > rank:
        raise GhostprojError(
            f"--rank {rank} is smaller than --rank-min squared ({lo_in}x{lo_out}); raise --rank or lower --rank-min."
        )
    k_in = max(lo_in, min(n_in, math.isqrt(rank)))
    k_out = max(lo_out, min(n_out, rank // k_in))
    k_in = max(lo_in, min(n_in, rank // k_out))
    return k_in, k_out


def split_ranks(
    rank: int, n_in: int, n_out: int, rank_min: int = 1, rank_in: int | None = None, rank_out: int | None = None
) -> tuple[int, int]:
    """(k_in, k_out): the budget rule of :func:`choose_ranks`, unless ``rank_in``/``rank_out``
    fix a side; a side left free then takes the rest of the budget, and at least
    ``rank_min`` (or its whole dimension, if smaller)."""
    if rank_in is not None and rank_in < 1 or rank_out is not None and rank_out < 1:
        raise GhostprojError("--rank-in and --rank-out must be at least 1.")
    if rank_in is None and rank_out is None:
        return choose_ranks(rank, n_in, n_out, rank_min)
    k_in = min(n_in, rank_in) if rank_in is not None else None
    k_out = min(n_out, rank_out) if rank_out is not None else None
    if k_in is None:
        k_in = max(min(rank_min, n_in), min(n_in, rank // k_out))
    if k_out is None:
        k_out = max(min(rank_min, n_out), min(n_out, rank // k_in))
    return k_in, k_out


@dataclass
class LayerProjector:
    """The two fixed matrices of one layer: P_in (k_in, n_in) and P_out (k_out, n_out)."""

    p_in: torch.Tensor
    p_out: torch.Tensor

    @property
    def k_in(self) -> int:
        return self.p_in.shape[0]

    @property
    def k_out(self) -> int:
        return self.p_out.shape[0]


def build_projectors(
    layers: list[tuple[str, int, int, int, int]], kind: str, seed: int
) -> dict[str, LayerProjector]:
    """``layers`` holds (name, n_in, n_out, k_in, k_out); n_in includes any bias column."""
    return {
        name: LayerProjector(
            p_in=make_matrix(kind, k_in, n_in, seed, name, "in"),
            p_out=make_matrix(kind, k_out, n_out, seed, name, "out"),
        )
        for name, n_in, n_out, k_in, k_out in layers
    }


def projector_hash(projectors: dict[str, LayerProjector]) -> str:
    matrices = ((f"{name}.{side}", m) for name in sorted(projectors)
                for side, m in (("in", projectors[name].p_in), ("out", projectors[name].p_out)))
    return hash_tensors(matrices, header="{name}:{shape}", dtype=torch.float32)
