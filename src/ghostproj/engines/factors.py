"""Kronecker factors of each layer's per-example gradients, and the eigenbasis projection
built from them.

For a dense layer, G_n = sum_t g_t x_t^T (output gradient g, input x, over the positions
of example n). K-FAC approximates the layer's Fisher by A (x) G with A = E[x x^T] and
G = E[g g^T] over positions; projecting onto the top eigenvectors of A and of G keeps the
coordinates of G_n in which the curvature lives, exactly, with the per-token cost of a
Gaussian projection. EK-FAC then weights each kept coordinate by the inverse of its own
second moment (``scoring``), and damps with a share of the mean over the layer's whole
space, E_n ||G_n||^2 / (n_in n_out), which the collector records alongside.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import defaults
from ..distributed import whole_weights
from ..errors import GhostprojError
from ..store.factors_file import FactorTotals, LayerFactors, factors_identity
from .capture import HookCapture
from .layer_types import projectable_type
from .layers import select_layers
from .projection import GradProjectionEngine
from .projector import LayerProjector

EIGEN = "eigen"  # the projector kind of runs projected in the Kronecker eigenbasis of their factors


def eigenvectors(sums: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """All eigenvectors of a symmetric matrix as float32 rows, leading first, each in a fixed
    sign (its largest entry positive), so two runs over the same factors get the same
    matrices. Decomposed in float64 on ``device`` (a GPU's is much faster than the CPU's)."""
    vals, vecs = torch.linalg.eigh(sums.to(device=device, dtype=torch.float64))
    rows = vecs[:, torch.argsort(vals, descending=True)].t()
    pivot = rows.abs().argmax(dim=1)
    sign = torch.sign(rows.gather(1, pivot[:, None]))
    return (rows * torch.where(sign == 0, 1.0, sign)).float().cpu().contiguous()


def decompose(factors: dict[str, LayerFactors], device: torch.device | str = "cpu") -> None:
    """Fill in each layer's eigenvectors where they are not known yet."""
    for f in factors.values():
        if f.a_vecs is None or f.g_vecs is None:
            f.a_vecs, f.g_vecs = eigenvectors(f.a, device), eigenvectors(f.g, device)


def eigenbasis_projectors(factors: dict[str, LayerFactors], ranks: dict[str, tuple[int, int]]
                          ) -> dict[str, LayerProjector]:
    """P_in = the top k_in eigenvectors of A, P_out = the top k_out of G, per layer."""
    decompose(factors)
    return {name: LayerProjector(f.a_vecs[: ranks[name][0]].contiguous(), f.g_vecs[: ranks[name][1]].contiguous())
            for name, f in factors.items()}


class FactorCollector(HookCapture):
    """Accumulates each chosen layer's Kronecker factors over batches of a projection-style
    pass: weights frozen, gradients flowing through activations only, the per-example
    losses summed (so g is d l_n / d y for each example's own loss).

    Call :meth:`begin` with the batch's attention mask before its forward; padding
    positions are left out of A and G."""

    def __init__(self, model: nn.Module, layers: list[str] | None = None):
        chosen = select_layers(model, layers)
        for name, module in chosen:
            if not projectable_type(module).kronecker_factors:
                raise GhostprojError(f"Layer '{name}' is a {projectable_type(module).type_name} layer; Kronecker "
                                     "factors cover Linear and Conv1D layers (leave it out of --layers).")
        super().__init__(model, {name: (module, projectable_type(module)) for name, module in chosen})
        self.factors: dict[str, LayerFactors] = {}
        for name, module in chosen:
            n_in, n_out = projectable_type(module).dims(module)
            self.factors[name] = LayerFactors(n_in, n_out, torch.zeros(n_in, n_in, dtype=torch.float64),
                                              torch.zeros(n_out, n_out, dtype=torch.float64))
        self._mask: torch.Tensor | None = None
        self._calls: dict[str, int] = {}
        self._products: list[tuple[torch.Tensor, torch.Tensor]] = []  # this batch's (input, x^T x)
        self.examples = 0

    def begin(self, mask: torch.Tensor | None, examples: int) -> None:
        """A batch of ``examples`` examples whose forward comes next (``mask`` None: none of
        them has a label position, so none is run, but each counts)."""
        self._mask = mask.bool() if mask is not None else None
        self._calls, self._products = {}, []
        self.examples += examples

    def on_call(self, name, module, kind, args, output):
        self._calls[name] = self._calls.get(name, 0) + 1
        if self._calls[name] > 1:
            raise GhostprojError(f"Layer '{name}' is called more than once per forward pass; Kronecker factors "
                                 "of shared layers are not supported.")
        x = args[0].detach() * self._mask[..., None].to(args[0].device, args[0].dtype)
        self._add_input_factor(name, args[0], x)
        return name, x

    def on_output_grad(self, context, grad):
        name, x = context
        self._accumulate(name, x, grad.detach())

    def _add_input_factor(self, name: str, source: torch.Tensor, x: torch.Tensor) -> None:
        """A += x^T x over the batch's positions. Layers reading the same input (q, k, v;
        gate and up) share one product. Each batch's product is in float32, the running
        sum in float64, as the Fisher's."""
        # the inputs seen are held until the batch ends, so no other tensor can take their memory
        product = next((p for src, p in self._products if src.data_ptr() == source.data_ptr()
                        and src.shape == source.shape and src.stride() == source.stride()), None)
        if product is None:
            rows = x.reshape(-1, x.shape[-1]).float()
            product = (rows.t() @ rows).double().cpu()
            self._products.append((source, product))
        self.factors[name].a += product

    def _accumulate(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        """G += g^T g, and each example's ||G_n||^2, once the output gradient arrives."""
        f = self.factors[name]
        g = g * self._mask[..., None].to(g.device, g.dtype)
        rows = g.reshape(-1, g.shape[-1]).float()
        f.g += (rows.t() @ rows).double().cpu()
        f.positions += int(self._mask.sum())
        # ||G_n||^2 = sum_{t,s} (x_t . x_s)(g_t . g_s): the token Gram when it is the smaller
        # product, else G_n itself
        x, g = x.float(), g.float()
        t = x.shape[1]
        if t * t * (f.n_in + f.n_out) < t * f.n_in * f.n_out:
            sq = (torch.bmm(x, x.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum(dtype=torch.float64)
        else:
            sq = torch.bmm(g.transpose(1, 2), x).square().sum(dtype=torch.float64)
        f.sq_norms += float(sq)


def _eigen_projectors(model, factors: FactorTotals, record: dict):
    """The function that makes the engine's matrices from its layer records: the factors'
    top eigenvectors, once the factors are known to be of these layers and weights."""
    def make(infos):
        names = [i.name for i in infos]
        dims = {i.name: (i.n_in, i.n_out) for i in infos}
        if [list(x) for x in record["identity"]["layers"]] != [[n, *dims[n]] for n in names]:
            have = ", ".join(x[0] for x in record["identity"]["layers"])
            raise GhostprojError(f"The --factors cover the layers {have}; this run projects {', '.join(names)}. "
                                 "Compute factors with the same --layers.")
        modules = dict(model.named_modules())
        weights = whole_weights(model, names, lambda n: [(n + ".weight", modules[n].weight)])
        if factors_identity(weights, names, dims)["model_weights"] != record["identity"]["model_weights"]:
            raise GhostprojError("The --factors were computed for another model (the layers' weights differ); "
                                 "compute them on this model.")
        return eigenbasis_projectors({n: factors.layers[n] for n in names},
                                     {i.name: (i.k_in, i.k_out) for i in infos})
    return make


def factors_engine(model, layers: list[str] | None, factors: tuple[FactorTotals, dict], *, rank: int = defaults.RANK,
                   rank_min: int = 1, rank_in: int | None = None, rank_out: int | None = None) -> GradProjectionEngine:
    """A projection engine whose matrices are the top eigenvectors of ``factors`` (from
    :func:`load_factors`), refused where they are another model's or other layers'."""
    return GradProjectionEngine(model, layers, rank=rank, rank_min=rank_min, rank_in=rank_in, rank_out=rank_out,
                                projector=EIGEN, seed=0, projectors=_eigen_projectors(model, *factors))
