"""One projected layer call: what replaces a module's forward while a
:class:`~ghostproj.engines.projection.GradProjectionEngine` is attached.

Per call the engine adds as little as a GPU's host can afford: one product for the
projected input in the forward pass (one per group of layers reading the same input), and
one product for the projected output gradient plus one batched per-example contraction in
the backward pass. Everything runs inside an autograd Function, with no tensor hooks and
no Python state written during backward: the per-example result is returned as the
gradient of a "sink" leaf, so ``torch.compile`` can trace a whole model through it.

- A frozen plain ``nn.Linear`` or HF ``Conv1D`` (projection mode) runs as one autograd
  node, :class:`_ProjectedLinear`: the module's own forward, then in backward the input
  gradient its own backward would give and the projected gradient.
- Anything else (a model being trained while observed, embeddings, a tied output head,
  subclasses of Linear) keeps its own forward and backward; :class:`LayerTap`, an identity on
  its output, adds the projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .fp32 import Projection, autocast_on, no_autocast
from .layer_types import LayerType, expand_broadcast_ids


@dataclass
class LayerMatrices:
    """One layer's projections on one device: P_in^T (applied to inputs), the bias column
    of P_in when --bias extends x by a constant 1 (else None), and P_out^T."""

    p_in: Projection
    bias_col: torch.Tensor | None
    p_out: Projection

    @classmethod
    def of(cls, p_in: torch.Tensor, p_out: torch.Tensor, bias: bool, device: torch.device,
           dtype: torch.dtype) -> "LayerMatrices":
        p_in = p_in.to(device=device, dtype=torch.float32)
        bias_col = None
        if bias:  # x is extended by a constant 1, so its column of P_in becomes an additive term
            p_in, bias_col = p_in[:, :-1], p_in[:, -1].contiguous()
        p_out = p_out.to(device=device, dtype=torch.float32)
        return cls(Projection(p_in.t().contiguous(), dtype), bias_col, Projection(p_out.t().contiguous(), dtype))


def project(x: torch.Tensor, p: Projection, bias_col: torch.Tensor | None) -> torch.Tensor:
    """Rows [B * S, k] float32 from an input [B, ..., n] (no graph is recorded)."""
    xp = LayerType.project_input(None, x, p)
    if bias_col is not None:
        xp += bias_col
    return xp


def output_gradient_rows(grad: torch.Tensor, p_out: Projection) -> tuple[torch.Tensor, torch.Tensor]:
    """(the output gradient made contiguous, its projection as rows [B * S, k] float32)."""
    grad = grad.contiguous()
    return grad, p_out.rows(grad.view(-1, grad.shape[-1]))


def contract(xp: torch.Tensor, dp: torch.Tensor, batch: int, transposed: bool) -> torch.Tensor:
    """sum_t dp_t xp_t^T for every example, from rows [B * S, k]: [B, k_out, k_in]. A
    transposed call (a tied module holding the weight the other way round) has P_out's
    side in xp and P_in's in dp."""
    xp, dp = xp.view(batch, -1, xp.shape[-1]), dp.view(batch, -1, dp.shape[-1])
    return torch.bmm(xp.transpose(1, 2), dp) if transposed else torch.bmm(dp.transpose(1, 2), xp)


class LayerCall:
    """Stands in for ``module.forward`` while attached; ``inner`` is the forward it wraps."""

    def __init__(self, engine, name: str, module: nn.Module, kind: type[LayerType], transposed: bool, fused: bool,
                 inner) -> None:
        self.engine, self.name, self.module, self.inner = engine, name, module, inner
        self.kind, self.transposed, self.fused = kind, transposed, fused
        self.token_ids = kind.takes_token_ids  # its input is projected by the type (a gather), not by P_in x
        self.device: torch.device | None = None  # where and in which dtype ``mats`` apply
        self.dtype: torch.dtype | None = None
        self.mats: LayerMatrices | None = None

    def use_matrices(self, device: torch.device, dtype: torch.dtype) -> None:
        self.mats, self.device, self.dtype = self.engine.matrices(self.name, device, dtype), device, dtype

    def __call__(self, *args, **kwargs):
        engine = self.engine
        if self.fused and len(args) == 1 and not kwargs and torch.is_grad_enabled():
            x = args[0]
            if torch.compiler.is_compiling():
                self.begin(x)
                return _ProjectedLinear.apply(x, engine.step_sinks[self.name], self)
            if x.shape[0] != engine.batch_size:
                engine.start_batch(self.name, x)
            if torch._C._are_functorch_transforms_active():
                return _ProjectedLinear.apply(x, engine.step_sinks[self.name], self)
            # Function.apply's Python wrapper only serves compilers and functorch transforms;
            # eager calls go straight to the C++ entry point (a few microseconds per layer).
            return _APPLY_FUSED(x, engine.step_sinks[self.name], self)
        if self.token_ids and engine.batch_size is not None:
            args = expand_broadcast_ids(args, engine.batch_size) or args
        y = self.inner(*args, **kwargs)
        if not torch.is_grad_enabled() or not torch.is_tensor(y):
            return y
        x = args[0] if args else next(iter(kwargs.values()))
        if torch.compiler.is_compiling():
            self.begin(x)
        elif x.shape[0] != engine.batch_size:
            engine.start_batch(self.name, x)
        xp, p_out = self.project_input(x, y.dtype)
        return LayerTap.apply(y, engine.step_sinks[self.name], xp, p_out, self.transposed, x.shape[0])

    def begin(self, x: torch.Tensor) -> None:
        """Inside a compiled region: the step was begun by ``engine.prepare`` outside it, and
        comparing batch sizes here would specialize the graph to one; only a step nobody
        began is begun here (correct, at the price of a graph break)."""
        if not self.engine.in_step:  # a flag, not the size: reading an int would be guarded on its value
            self.engine.start_batch(self.name, x)

    def project_input(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, Projection]:
        """(the projected input as rows [B * S, k] float32, the projection for the output gradient);
        ``dtype`` is the layer output's, the precision the layer computes in."""
        if dtype is not self.dtype or x.device != self.device:
            self.use_matrices(x.device, dtype)
        mats = self.mats
        if self.transposed:  # a tied module's input meets P_out, its output gradient P_in
            return self.kind.project_input(self.module, x, mats.p_out), mats.p_in
        if self.token_ids:
            return self.kind.project_input(self.module, x, mats.p_in), mats.p_out
        return self.engine.inputs.project(self, x, mats), mats.p_out


class SharedInputs:
    """Layers that read the very same input tensor (Llama's q/k/v and gate/up) project it
    in one product against their stacked P_in. Which layers share an input is learnt in
    the first step, from consecutive calls with the same tensor. Only the last call's input
    is held while learning: holding every layer's input would keep the activations that
    gradient checkpointing frees."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.learning = True
        self._last: tuple[torch.Tensor, list[str]] | None = None  # the latest input and the layers that read it
        self._runs: list[list[str]] = []  # layers that read one input, one call after another
        self._groups: dict[str, _Group] = {}
        self._pending: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None

    def project(self, call: LayerCall, x: torch.Tensor, mats: LayerMatrices) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one graph: the compiler sees every product anyway
            return project(x, mats.p_in, mats.bias_col)
        pending = self._pending
        if pending is not None and pending[0] is x:
            mine = pending[1].pop(call.name, None)
            if mine is not None:
                if not pending[1]:  # the group is done: hold its input no longer
                    self._pending = None
                return mine
        group = self._groups.get(call.name)
        if group is None:
            if self.learning:
                self._note(call.name, x)
            return project(x, mats.p_in, mats.bias_col)
        stacked = group.matrices(self.engine, x.device, call.dtype)
        parts = dict(zip(group.names, project(x, stacked.p_in, stacked.bias_col).split(group.widths, dim=-1)))
        mine = parts.pop(call.name)
        self._pending = (x, parts)
        return mine

    def _note(self, name: str, x: torch.Tensor) -> None:
        if self._last is not None and self._last[0] is x:
            if name not in self._last[1]:
                self._last[1].append(name)
            return
        if self._last is not None:
            self._runs.append(self._last[1])
        self._last = (x, [name])

    def end_step(self) -> None:
        self._pending = None
        if self.learning and self._last is not None:
            self._runs.append(self._last[1])
            self._last = None
            self._learn()

    def _learn(self) -> None:
        self.learning = False
        k_in = {i.name: i.k_in for i in self.engine.layers}
        for names in self._runs:
            if len(names) > 1 and not any(n in self._groups for n in names):
                group = _Group(names, [k_in[n] for n in names])
                self._groups.update({n: group for n in names})
        self._runs.clear()


class _Group:
    """Layers sharing one input, and their stacked P_in^T per (device, dtype)."""

    def __init__(self, names: list[str], widths: list[int]) -> None:
        self.names, self.widths = names, widths
        self._mats: dict[tuple, LayerMatrices] = {}

    def matrices(self, engine, device: torch.device, dtype: torch.dtype) -> LayerMatrices:
        mats = self._mats.get((device, dtype))
        if mats is None:
            parts = [engine.matrices(n, device, dtype) for n in self.names]
            bias = None
            if any(m.bias_col is not None for m in parts):
                bias = torch.cat([m.bias_col if m.bias_col is not None else torch.zeros(w, device=device)
                                  for m, w in zip(parts, self.widths)])
            stacked = Projection(torch.cat([m.p_in.full for m in parts], dim=1), dtype)
            mats = self._mats[(device, dtype)] = LayerMatrices(stacked, bias, parts[0].p_out)
        return mats


class _ProjectedLinear(torch.autograd.Function):
    """A frozen Linear or Conv1D call and its projection in one autograd node. Forward runs
    the module's own forward (bit-identical outputs, autocast included) and projects the
    input; backward gives the input gradient the layer's own backward would (in the
    precision it ran in) and the per-example projected gradient as the sink's gradient."""

    @staticmethod
    def forward(ctx, x, sink, call):
        y = call.inner(x)
        dtype = y.dtype
        if dtype is not call.dtype or x.device != call.device:
            call.use_matrices(x.device, dtype)
        ctx.save_for_backward(call.engine.inputs.project(call, x, call.mats))
        ctx.call, ctx.p_out, ctx.batch = call, call.mats.p_out, x.shape[0]
        return y

    @staticmethod
    def backward(ctx, grad):
        if autocast_on(grad.device.type):  # a backward() called inside an autocast region
            with no_autocast(grad.device):
                return _ProjectedLinear._backward(ctx, grad)
        return _ProjectedLinear._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):  # kept flat: it runs once per projected layer and step
        (xp,) = ctx.saved_tensors
        call = ctx.call
        rows = grad.contiguous().view(-1, grad.shape[-1])
        grad_x = None
        if ctx.needs_input_grad[0]:  # not for the lowest projected layer: backward ends here
            # read now, not at attach time: FSDP swaps a sharded weight for the gathered one
            # around each forward and backward (the dict itself: nn.Module's attribute lookup
            # costs this host-bound path measurably)
            w = call.module._parameters["weight"]
            w = w if w.dtype is grad.dtype else w.to(grad.dtype)
            grad_x = call.kind.input_grad(rows, w)
            grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1])
        return grad_x, contract(xp, ctx.p_out.rows(rows), ctx.batch, False), None


_APPLY_FUSED = super(torch.autograd.Function, _ProjectedLinear).apply


class LayerTap(torch.autograd.Function):
    """Identity on a layer's output y. Its backward passes y's gradient on and turns it into
    the layer's per-example projected gradient sum_t (P_out delta_t)(P_in x_t)^T, returned
    as the gradient of ``sink``."""

    @staticmethod
    def forward(ctx, y, sink, xp, p_out, transposed, batch):
        ctx.save_for_backward(xp)
        ctx.p_out, ctx.transposed, ctx.batch = p_out, transposed, batch
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        if autocast_on(grad.device.type):
            with no_autocast(grad.device):
                return LayerTap._backward(ctx, grad)
        return LayerTap._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        (xp,) = ctx.saved_tensors
        # Made contiguous once here and passed on, so the layer's own backward (which
        # flattens it too) does not copy it a second time.
        grad, dp = output_gradient_rows(grad, ctx.p_out)
        return grad, contract(xp, dp, ctx.batch, ctx.transposed), None, None, None, None
