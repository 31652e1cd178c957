"""How faithful is a projection? Exact per-example gradient inner products on a small
calibration set against their Kronecker-projected (and dense-projected) estimates, per
rank and per layer, so the rank can be chosen from evidence."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from .. import defaults
from ..data.batching import Example, collate
from ..engines.factors import factors_engine
from ..engines.losses import causal_lm_losses
from ..engines.projection import GradProjectionEngine
from ..errors import GhostprojError
from ..inputs import CheckSource
from .reference import per_example_weight_grads


def exact_layer_grads(model, examples: list[Example], names: list[str] | dict, loss_reduction: str = "mean"):
    """{layer: [B, n_out * n_in] float64} per-example weight gradients in (n_out, n_in)
    orientation (the examples given all have label positions)."""
    out = {n: [] for n in names}
    for _, grads in per_example_weight_grads(model, examples, names, loss_reduction):
        for n in names:
            out[n].append(grads[n].reshape(-1))
    return {n: torch.stack(v) for n, v in out.items()}


def dense_projection(g: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """[B, k]: a dense Gaussian projection (entries N(0, 1/k)) of [B, N] vectors, drawn in
    column chunks so the k x N matrix is never held at once."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(g.shape[0], k, dtype=torch.float64)
    chunk = max(1, (1 << 24) // max(k, 1))
    for start in range(0, g.shape[1], chunk):
        stop = min(g.shape[1], start + chunk)
        r = torch.randn(stop - start, k, generator=gen, dtype=torch.float64) / math.sqrt(k)
        out += g[:, start:stop] @ r
    return out


@dataclass
class Agreement:
    """How well estimated pairwise inner products (and cosines) follow the exact ones."""

    ip_corr: float
    ip_rel_err: float  # mean |est - exact| / (|g_i| |g_j|)
    cos_corr: float
    cos_abs_err: float

    @classmethod
    def of(cls, exact: torch.Tensor, est: torch.Tensor) -> "Agreement":
        iu = torch.triu_indices(exact.shape[0], exact.shape[0], 1)
        e_ip = exact @ exact.T
        p_ip = est @ est.T
        norms = exact.norm(dim=1)
        scale = (norms[:, None] * norms[None, :]).clamp(min=1e-300)
        pn = est.norm(dim=1)
        e_cos = e_ip / scale
        p_cos = p_ip / (pn[:, None] * pn[None, :]).clamp(min=1e-300)
        a, b = e_ip[iu[0], iu[1]], p_ip[iu[0], iu[1]]
        ca, cb = e_cos[iu[0], iu[1]], p_cos[iu[0], iu[1]]
        return cls(_corr(a, b), float(((a - b).abs() / scale[iu[0], iu[1]]).mean()), _corr(ca, cb),
                   float((ca - cb).abs().mean()))


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = a.norm() * b.norm()
    return float((a @ b) / den) if den > 0 else float("nan")


@dataclass
class RankReport:
    rank: int
    dim: int
    per_layer: dict[str, Agreement]
    total: Agreement
    dense_total: Agreement | None = None


@dataclass
class FidelityReport:
    examples: int
    ranks: list[RankReport] = field(default_factory=list)
    recommended: int | None = None
    rule: str = "the smallest rank whose total inner-product correlation is at least 0.9"


def run_fidelity(model, examples: list[Example], layers: list[str] | None, ranks: list[int], dense: bool = True,
                 seed: int = 0, loss_reduction: str = defaults.LOSS_REDUCTION, projector: str = defaults.PROJECTOR,
                 factors: tuple | None = None) -> FidelityReport:
    """``factors`` (from :func:`load_factors`): the Kronecker eigenbasis at each rank instead
    of ``projector``'s random matrices."""
    live = [e for e in examples if e.n_label_positions > 0]
    if len(live) < 3:
        raise GhostprojError("Fidelity needs at least 3 calibration examples with label positions.")
    if not ranks or any(r < 1 for r in ranks):
        raise GhostprojError("--ranks must be positive integers, e.g. 64,256,1024.")
    probe = GradProjectionEngine(model, layers, rank=1)
    names = [i.name for i in probe.layers]
    exact = exact_layer_grads(model, live, probe.modules, loss_reduction)  # a module split in parts: each part
    exact_total = torch.cat([exact[n] for n in names], dim=1)
    report = FidelityReport(len(live))
    for rank in sorted(set(ranks)):
        exact_names = ["re:^" + re.escape(n) + "$" for n in probe.whole]
        if factors is not None:
            engine = factors_engine(model, exact_names, factors, rank=rank)
        else:
            engine = GradProjectionEngine(model, exact_names, rank=rank, seed=seed, projector=projector)
        device = next(model.parameters()).device
        batch = collate(live).to(device)
        with engine:
            losses, _ = causal_lm_losses(model(**batch.model_inputs()).logits, batch.labels, loss_reduction)
            losses.sum().backward()
            est = engine.collect().double().cpu()
        per_layer = {}
        for info in engine.layers:
            per_layer[info.name] = Agreement.of(exact[info.name], est[:, info.offset:info.offset + info.size])
        rr = RankReport(rank, engine.dim, per_layer, Agreement.of(exact_total, est))
        if dense:
            blocks = [dense_projection(exact[i.name], i.size, seed * 1000 + n) for n, i in enumerate(engine.layers)]
            rr.dense_total = Agreement.of(exact_total, torch.cat(blocks, dim=1))
        report.ranks.append(rr)
    for rr in report.ranks:
        if rr.total.ip_corr >= 0.9:
            report.recommended = rr.rank
            break
    return report


@dataclass
class FidelityOptions(CheckSource):
    """Options of ``ghostproj fidelity``; ``ranks`` as typed, comma-separated."""

    samples: int = 16
    max_length: int = 512
    layers: list[str] | None = None
    ranks: str = "64,256,1024"
    dense: bool = True
    seed: int = 0
    factors: str | None = None
    device: str = "auto"

    def __post_init__(self):
        try:
            self.rank_list = [int(r) for r in self.ranks.split(",") if r.strip()]
        except ValueError:
            raise GhostprojError(f"--ranks must be comma-separated integers, got '{self.ranks}'.") from None
        if not self.rank_list or min(self.rank_list) < 1:
            raise GhostprojError(f"--ranks must list positive integers, got '{self.ranks}'.")


def run_fidelity_check(opts: FidelityOptions) -> FidelityReport:
    """The `fidelity` command: load the model and data as `project` does, pick calibration
    examples of mixed lengths and compare projected with exact inner products."""
    from ..inputs import load_model_and_data, pick_mixed_lengths
    from ..store.factors_file import load_factors

    loaded = load_factors(opts.factors, sums=False) if opts.factors is not None else None
    model, _, data = load_model_and_data(opts.model, opts.data, "float32", opts.device, opts.max_length,
                                         **opts.fields)
    examples = pick_mixed_lengths(data.examples, opts.samples)
    return run_fidelity(model, examples, opts.layers, opts.rank_list, dense=opts.dense, seed=opts.seed,
                        factors=loaded)
