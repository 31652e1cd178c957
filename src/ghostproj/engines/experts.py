"""Mixture-of-experts layers: transformers' fused expert modules, each expert's matrices
projected as layers of their own, in the same backward pass. Importing the package
registers the type (:mod:`ghostproj.engines`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import GhostprojError
from .calls import LayerTap
from .layer_types import LayerType


class FusedExpertsLayer(LayerType):
    """transformers' fused mixture-of-experts modules (``Qwen3MoeExperts``, ``OlmoeExperts``,
    ``MixtralExperts``: 3-D ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], one
    eager forward). Each expert's matrix is a part of its own, ``<module>.gate_up_proj.<e>``
    and ``<module>.down_proj.<e>``: a dense layer over the tokens routed to that expert, its
    output gradient carrying the routing weight the forward applies after ``down_proj``.
    The module's rank budget is shared by its experts. Projection only: the in-run engine,
    factors and Adam directions leave experts out."""

    type_name = "Experts"
    projectable = True
    in_run = False
    has_bias_column = False
    matrices = ("gate_up_proj", "down_proj")

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        params = dict(module.named_parameters(recurse=False))
        return (type(module).__name__.endswith("Experts") and set(params) == set(cls.matrices)
                and all(p.dim() == 3 for p in params.values()) and callable(getattr(module, "act_fn", None)))

    @staticmethod
    def dims(module: nn.Module) -> tuple[int, int]:  # of gate_up_proj: the module's first part
        _, n_out, n_in = module.gate_up_proj.shape
        return int(n_in), int(n_out)

    @classmethod
    def parts(cls, name: str, module: nn.Module) -> list[str]:
        return [f"{name}.{m}.{e}" for m in cls.matrices for e in range(module.gate_up_proj.shape[0])]

    @staticmethod
    def split(part: str) -> tuple[str, int]:
        """(the matrix's parameter name, the expert) of a part's name."""
        matrix, expert = part.rsplit(".", 2)[-2:]
        return matrix, int(expert)

    @classmethod
    def part_dims(cls, module, part):
        _, n_out, n_in = getattr(module, cls.split(part)[0]).shape
        return int(n_in), int(n_out)

    @classmethod
    def part_rank(cls, module, rank):
        return max(1, rank // module.gate_up_proj.shape[0])

    @classmethod
    def part_parameter(cls, module, part):
        return getattr(module, cls.split(part)[0])

    @classmethod
    def part_weight(cls, module, part):
        matrix, e = cls.split(part)
        return getattr(module, matrix)[e]

    @classmethod
    def part_grad(cls, module, part):
        matrix, e = cls.split(part)
        return getattr(module, matrix).grad[e]


class ExpertsCall:
    """Stands in for a fused experts module's forward while a projection engine is attached:
    the module's eager forward, each expert's two products going through
    :class:`_ExpertLinear`, which adds that expert's projected per-example gradient to its
    part's block in the backward pass."""

    def __init__(self, engine, name: str, module: nn.Module, inner) -> None:
        self.engine, self.name, self.module, self.inner = engine, name, module, inner

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        engine, module = self.engine, self.module
        if not torch.is_grad_enabled():
            return self.inner(hidden_states, top_k_index, top_k_weights)
        if torch.compiler.is_compiling():
            raise GhostprojError("Mixture-of-experts layers are projected eagerly; drop --compile.")
        if engine.batch_size is None:
            raise GhostprojError(f"{self.name} sees its batch's tokens flattened; begin the step with "
                                 "engine.prepare(batch_size, device) before the forward pass.")
        batch = engine.batch_size
        per_example = hidden_states.shape[0] // batch  # the block flattened [B, T, H] to [B * T, H]
        experts = module.gate_up_proj.shape[0]
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit.flatten().tolist():
            if e == experts:  # the slot of tokens routed to no expert
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            rows = token_idx // per_example
            gate, up = self._product(hidden_states[token_idx], "gate_up_proj", e, rows).chunk(2, dim=-1)
            h = self._product(module.act_fn(gate) * up, "down_proj", e, rows)
            h = h * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out

    def _product(self, x, matrix: str, e: int, rows):
        part = f"{self.name}.{matrix}.{e}"
        weight = self.module._parameters[matrix]
        mats = self.engine.matrices(part, x.device, x.dtype)
        return _ExpertLinear.apply(x, weight, self.engine.step_sinks[part], e, rows, mats, self.engine.batch_size,
                                   self.module, matrix)


class _ExpertLinear(torch.autograd.Function):
    """y = x W[e]^T over the tokens routed to expert e. Backward: the input gradient, the
    weight gradient where the weight is trained, and sum_t (P_out delta_t)(P_in x_t)^T per
    example (``rows`` says whose token each is) as the gradient of the part's sink."""

    @staticmethod
    def forward(ctx, x, weight, sink, e, rows, mats, batch, module, matrix):
        y = F.linear(x, weight[e])
        ctx.save_for_backward(x, mats.p_in.rows(x.detach()), rows)
        ctx.module, ctx.matrix, ctx.e, ctx.p_out, ctx.batch = module, matrix, e, mats.p_out, batch
        return y

    @staticmethod
    def backward(ctx, grad):
        x, xp, rows = ctx.saved_tensors
        weight = ctx.module._parameters[ctx.matrix]  # read now: a sharded model gathers it again for backward
        w = weight[ctx.e]
        dp = ctx.p_out.rows(grad.contiguous())
        block = torch.zeros(ctx.batch, dp.shape[1], xp.shape[1], dtype=torch.float32, device=grad.device)
        block.index_add_(0, rows, dp[:, :, None] * xp[:, None, :])
        grad_x = grad @ w.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(weight)
            grad_w[ctx.e] = (grad.t() @ x).to(grad_w.dtype)
        return grad_x, grad_w, block, None, None, None, None, None, None


FusedExpertsLayer.own_call = ExpertsCall


class RouterLayer(LayerType):
    """A mixture-of-experts router holding its matrix as a bare parameter (``*TopKRouter``,
    ``*Router``: ``weight`` [E, H], applied with ``F.linear`` inside a forward that then
    picks the experts). A dense layer, projected through the one ``F.linear`` of its forward;
    the gradient reaching its logits is the one the routing weights pass back."""

    type_name = "Router"
    projectable = True
    in_run = False
    has_bias_column = False

    @staticmethod
    def matches(module: nn.Module) -> bool:
        params = dict(module.named_parameters(recurse=False))
        return (type(module).__name__.endswith("Router") and set(params) == {"weight"}
                and params["weight"].dim() == 2 and not list(module.children()))

    @staticmethod
    def dims(module: nn.Module) -> tuple[int, int]:
        n_out, n_in = module.weight.shape
        return int(n_in), int(n_out)


class _RouterProduct(TorchFunctionMode):
    """Inside the router's forward: its ``F.linear`` with its own weight, tapped."""

    def __init__(self, call: "RouterCall") -> None:
        super().__init__()
        self.call = call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and args[1] is self.call.module._parameters["weight"]:
            return self.call.tapped(args[0], func(*args, **kwargs))
        return func(*args, **kwargs)


class RouterCall:
    """Stands in for a router's forward while a projection engine is attached: the forward
    runs as it is, its product with the router's weight tapped as a layer's output."""

    def __init__(self, engine, name: str, module: nn.Module, inner) -> None:
        self.engine, self.name, self.module, self.inner = engine, name, module, inner

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        if torch.compiler.is_compiling():
            raise GhostprojError("Mixture-of-experts layers are projected eagerly; drop --compile.")
        if self.engine.batch_size is None:
            raise GhostprojError(f"{self.name} sees its batch's tokens flattened; begin the step with "
                                 "engine.prepare(batch_size, device) before the forward pass.")
        with _RouterProduct(self):
            return self.inner(*args, **kwargs)

    def tapped(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mats = self.engine.matrices(self.name, x.device, y.dtype)
        xp = mats.p_in.rows(x.detach().reshape(-1, x.shape[-1]))
        return LayerTap.apply(y, self.engine.step_sinks[self.name], xp, mats.p_out, False, self.engine.batch_size)


RouterLayer.own_call = RouterCall
