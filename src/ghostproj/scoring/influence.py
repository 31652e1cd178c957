"""Influence scores: the damped per-layer (or full) Fisher of the training vectors,
applied to the query side.

The Fisher is a sum over training rows, so it can be computed once (``ghostproj fisher``),
in parts by separate processes, merged, and reused by every ``score --fisher``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import GhostprojError
from ..store.files import atomic_write
from ..store.manifest import LayerInfo
from ..store.reader import Run
from ..store.shards import encode_safetensors
from .feed import feed
from .transform import Transform

MAX_FULL_FISHER_DIM = 16384  # a D x D float64 Fisher of 2 GiB


@dataclass
class FisherSums:
    """sum_i g_i g_i^T per layer block (or one block with ``full``), float64, over ``count``
    training rows of the run with ``fingerprint``, transformed with ``normalize``;
    ``part`` = (i, K) for one of K parts, None for the whole run."""

    sums: list[torch.Tensor]
    count: int
    full: bool
    normalize: str
    layers: list[str]
    fingerprint: str
    part: tuple[int, int] | None = None

    def fishers(self) -> list[torch.Tensor]:
        return [s / self.count for s in self.sums]

    def save(self, path) -> None:
        tensors = {f"block.{i:05d}": s for i, s in enumerate(self.sums)}
        tensors["count"] = torch.tensor([self.count], dtype=torch.int64)
        meta = {"kind": "ghostproj-fisher", "full": str(self.full), "normalize": self.normalize,
                "layers": ",".join(self.layers), "fingerprint": self.fingerprint,
                "part": "" if self.part is None else f"{self.part[0]}/{self.part[1]}"}
        atomic_write(Path(path), encode_safetensors(tensors, meta))

    @classmethod
    def load(cls, path) -> "FisherSums":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("kind") != "ghostproj-fisher":
                    raise GhostprojError(f"{path} is not a Fisher file written by `ghostproj fisher`.")
                blocks = sorted(k for k in f.keys() if k.startswith("block."))
                sums = [f.get_tensor(k) for k in blocks]
                count = int(f.get_tensor("count")[0])
        except GhostprojError:
            raise
        except Exception as exc:  # a missing or damaged file
            raise GhostprojError(f"Cannot read the Fisher file {path} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}).") from None
        part = tuple(int(v) for v in meta["part"].split("/")) if meta.get("part") else None
        return cls(sums, count, meta.get("full") == "True", meta.get("normalize", ""),
                   [n for n in meta.get("layers", "").split(",") if n], meta.get("fingerprint", ""), part)


def check_full_size(d: int) -> None:
    """Refuse, before any pass over the data, a full Fisher too large to hold."""
    if d > MAX_FULL_FISHER_DIM:
        raise GhostprojError(
            f"influence-full needs a {d} x {d} Fisher matrix ({d * d * 8 / 2**30:.1f} GiB); use --metric influence "
            "(one block per layer) or score fewer --layers."
        )


def fisher_sums(train_run: Run, cols, transform: Transform, blocks: list[LayerInfo], full: bool,
                chunk_rows: int, device: torch.device = torch.device("cpu")) -> tuple[list[torch.Tensor], int]:
    """(sum_i g_i g_i^T per layer block (or one D' x D' block), float64 on the CPU; rows
    summed). Each chunk's products are float32 (on ``device``), their sums float64."""
    spans = [(0, sum(b.size for b in blocks))] if full else [(b.offset, b.offset + b.size) for b in blocks]
    sums = [torch.zeros(e - s, e - s, dtype=torch.float64, device=device) for s, e in spans]
    count = 0
    for chunk in feed(train_run, cols, chunk_rows, device):
        x = transform(chunk.rows)[: chunk.n]
        count += chunk.n
        for acc, (s, e) in zip(sums, spans):
            block = x[:, s:e]
            acc += (block.t() @ block).double()
    return [acc.cpu() for acc in sums], count


def fisher_blocks(train_run: Run, cols, transform: Transform, blocks: list[LayerInfo], full: bool,
                  chunk_rows: int, n_train: int, device: torch.device = torch.device("cpu")) -> list[torch.Tensor]:
    """F = (1/N) sum_i g_i g_i^T per layer block (or one D' x D' block), float64."""
    sums, _ = fisher_sums(train_run, cols, transform, blocks, full, chunk_rows, device)
    return [acc / n_train for acc in sums]


def merge_fisher(parts: list[FisherSums]) -> FisherSums:
    """The whole run's sums from the sums of its K parts (each exactly once)."""
    first = parts[0]
    k = first.part[1] if first.part else None
    seen = sorted(p.part[0] for p in parts if p.part)
    if k is None or seen != list(range(k)) or len(parts) != k:
        raise GhostprojError(f"A merge needs each of the K parts exactly once; got parts {seen} of {k}.")
    for p in parts[1:]:
        if (p.fingerprint, p.normalize, p.full, p.layers) != (first.fingerprint, first.normalize, first.full,
                                                              first.layers):
            raise GhostprojError("The Fisher parts come from different runs or settings; they cannot be merged.")
    sums = [sum((p.sums[i] for p in parts[1:]), parts[0].sums[i].clone()) for i in range(len(first.sums))]
    return FisherSums(sums, sum(p.count for p in parts), first.full, first.normalize, first.layers,
                      first.fingerprint)


def check_fisher(fs: FisherSums, train_run: Run, blocks: list[LayerInfo], normalize: str, full: bool,
                 center: bool) -> None:
    """Refuse a Fisher file that was not computed from these training vectors and settings."""
    why = None
    if fs.part is not None:
        why = f"it holds part {fs.part[0]} of {fs.part[1]} only (merge the parts first)"
    elif fs.fingerprint != train_run.manifest.fingerprint:
        why = "it was computed from another run"
    elif fs.layers != [b.name for b in blocks]:
        why = "it covers other layers (use the same --layers)"
    elif fs.normalize != normalize:
        why = f"it was computed with --normalize {fs.normalize}"
    elif fs.full != full:
        why = "it is for " + ("influence-full" if fs.full else "influence")
    elif center:
        why = "--center is not supported with a precomputed Fisher"
    elif fs.count != train_run.rows:
        why = f"it sums {fs.count} rows but the run has {train_run.rows}"
    if why:
        raise GhostprojError(f"The Fisher file does not fit this score: {why}.")


def damped(f: torch.Tensor, damping: float) -> torch.Tensor:
    """F_l + lambda_l I in float64, lambda_l = damping * mean diag F_l."""
    lam = damping * float(f.diagonal().mean())
    if lam <= 0:
        lam = 1e-12  # an all-zero block: any damping keeps the solve defined
    return f.double() + lam * torch.eye(f.shape[0], dtype=torch.float64)


def precondition(q: torch.Tensor, fishers: list[torch.Tensor], blocks: list[LayerInfo], damping: float,
                 full: bool) -> torch.Tensor:
    """(F_l + lambda_l I)^{-1} applied to each query block; lambda_l = damping * mean diag F_l."""
    spans = [(0, q.shape[1])] if full else [(b.offset, b.offset + b.size) for b in blocks]
    out = torch.empty_like(q)
    for f, (s, e) in zip(fishers, spans):
        a = damped(f, damping)
        try:
            out[:, s:e] = torch.linalg.solve(a, q[:, s:e].double().t()).t().float()
        except torch.linalg.LinAlgError:
            raise GhostprojError("The damped Fisher matrix is singular; use a positive --damping.") from None
    return out


def inverse_square_roots(fishers: list[torch.Tensor], damping: float) -> list[torch.Tensor]:
    """(F_l + lambda_l I)^{-1/2} of each block, lambda_l as precondition's: applied to both
    sides, q^T (F + lambda I)^{-1} x becomes a plain inner product of two vectors that an
    index can hold."""
    roots = []
    for f in fishers:
        vals, vecs = torch.linalg.eigh(damped(f, damping))
        if float(vals.min()) <= 0:
            raise GhostprojError("The damped Fisher matrix is singular; use a positive --damping.")
        roots.append(((vecs * vals.rsqrt()) @ vecs.t()).float())
    return roots


def apply_blocks(x: torch.Tensor, mats: list[torch.Tensor], blocks: list[LayerInfo]) -> torch.Tensor:
    """Each block of columns of ``x`` times its symmetric matrix."""
    out = torch.empty_like(x)
    for m, b in zip(mats, blocks):
        out[:, b.offset:b.offset + b.size] = x[:, b.offset:b.offset + b.size] @ m
    return out



def is_eigenbasis(run: Run) -> bool:
    """A run projected in the Kronecker eigenbasis of its factors (``project --factors``)."""
    return (run.manifest.projector or {}).get("kind") == "eigen" and run.manifest.factors is not None


def mean_squares(train_run: Run, cols, chunk_rows: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """Each column's mean square over the training rows, float64: the diagonal of the
    Fisher, without its blocks."""
    acc, count = None, 0
    for chunk in feed(train_run, cols, chunk_rows, device):
        x = chunk.rows[: chunk.n]
        sq = x.square().sum(0, dtype=torch.float64)
        acc = sq if acc is None else acc + sq
        count += chunk.n
    return acc.cpu() / max(count, 1)


def ekfac_scale(diagonal: torch.Tensor, blocks: list[LayerInfo], run: Run, damping: float) -> torch.Tensor:
    """(Lambda_ab + lambda_l)^(-1/2) for every kept coordinate, with Lambda_ab the training
    vectors' mean square of the coordinate (``diagonal``, the Fisher's) and
    lambda_l = damping x the mean correction over the layer's whole space, which the run's
    factors recorded. Applied to both sides, the dot product is EK-FAC's
    sum_ab R_n,ab R_q,ab / (Lambda_ab + lambda)."""
    base = run.manifest.factors["lambda_base"]
    parts, at = [], 0
    for b in blocks:
        lam = damping * float(base[b.name])
        diag = diagonal[at:at + b.size].double()
        at += b.size
        if lam <= 0 and bool((diag <= 0).any()):
            raise GhostprojError(f"Layer '{b.name}' has a coordinate no training example moves; use a positive "
                                 "--damping.")
        parts.append((diag + lam).rsqrt())
    return torch.cat(parts).float()
