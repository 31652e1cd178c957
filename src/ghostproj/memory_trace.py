"""Device memory of a step traced on the meta device: every tensor an operation makes is
counted for as long as its storage lives, so the peak is what a device would hold for the
step, found from the model's shapes alone without allocating any of it."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

SHADOW_LIMIT = 1 << 22  # elements: the index-like tensors a step derives from its batch, never activations
_SHADOW = "_ghostproj_value"  # the attribute of a meta tensor that holds its value on the CPU


def with_value(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the meta device, its value kept beside it: what the model computes from it
    (masks, positions) keeps a value too, so its ``.item()`` checks read the truth."""
    meta = t.to("meta")
    give_value(meta, t)
    return meta


def give_value(meta: torch.Tensor, value: torch.Tensor) -> None:
    """Let the meta tensor ``meta`` stand for ``value`` (a CPU tensor of its shape)."""
    if meta.shape != value.shape:
        raise ValueError(f"a value of shape {tuple(value.shape)} for a tensor of shape {tuple(meta.shape)}")
    setattr(meta, _SHADOW, value)


class MemoryTrace(TorchDispatchMode):
    """The bytes of tensor storage made inside the mode and still alive, and their peak.
    Storages of ``existing`` tensors (the weights) are not counted: views of them make no
    memory. Meta tensors have no values, so an operation whose meta inputs all carry one
    (:func:`with_value`) is run on those values too; a ``.item()`` of a meta tensor without
    one (a value computed from the weights) reads True or 1."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._counted: set[int] = set()
        self._existing = {t.untyped_storage()._cdata for t in existing}

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        metas = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.device.type == "meta"]
        if func is torch.ops.aten._local_scalar_dense.default and metas:
            value = getattr(args[0], _SHADOW, None)
            if value is not None:
                return value.item()
            return True if args[0].dtype == torch.bool else 1
        try:
            out = func(*args, **kwargs)
        except (NotImplementedError, RuntimeError):  # a shape that depends on values (nonzero)
            values = _values_of(func, args, kwargs, metas)
            if values is None:
                raise
            out = tree_map(lambda v: with_value(v) if isinstance(v, torch.Tensor) else v, values)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t)
        _follow_values(func, args, kwargs, metas, out)
        return out

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._counted or key in self._existing:
            return
        size = storage.nbytes()
        self._counted.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        # torch keeps one Python object per storage for as long as the storage lives, so
        # this runs when the memory would be freed
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._counted.discard(key)
        self.live -= size


def _values_of(func, args, kwargs, metas: list[torch.Tensor]):
    """``func`` run on the values of its meta inputs (on the CPU), or None when one of
    them has no value or the operation fails there."""
    if not metas and "device" not in kwargs:
        return None
    if "device" in kwargs:  # a factory (arange, new_zeros): its value is made on the CPU
        kwargs = {**kwargs, "device": torch.device("cpu")}
    if not all(hasattr(t, _SHADOW) for t in metas):
        return None

    def value(a):
        return getattr(a, _SHADOW) if isinstance(a, torch.Tensor) and a.device.type == "meta" else a

    try:
        return func(*tree_map(value, args), **tree_map(value, kwargs))
    except (RuntimeError, TypeError, NotImplementedError, IndexError):
        return None


def _follow_values(func, args, kwargs, metas: list[torch.Tensor], out) -> None:
    """Give ``out`` the value ``func`` computes from its inputs' values, when every meta
    input has one and the result is small; an in-place update from an input without a
    value leaves the updated tensor without one."""
    if any(not hasattr(t, _SHADOW) for t in metas):
        for t in metas:
            if hasattr(t, _SHADOW) and func._schema.is_mutable:
                delattr(t, _SHADOW)
        return
    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not outs or any(t.numel() > SHADOW_LIMIT for t in outs) or all(hasattr(t, _SHADOW) for t in outs):
        return
    values = _values_of(func, args, kwargs, metas)
    for t, v in zip(outs, [v for v in tree_leaves(values) if isinstance(v, torch.Tensor)]):
        if t.device.type == "meta" and v.device.type != "meta" and t.shape == v.shape:
            setattr(t, _SHADOW, v)


@contextlib.contextmanager
def _value_reads():
    """``Tensor.tolist()`` of a meta tensor reads its value. It bypasses the dispatcher, so
    the method itself is swapped (a checkpointed layer recomputed in the backward pass
    calls it where no mode entered around the step is active)."""
    original = torch.Tensor.tolist

    def tolist(self):
        if self.device.type == "meta" and hasattr(self, _SHADOW):
            return getattr(self, _SHADOW).tolist()
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        yield
    finally:
        torch.Tensor.tolist = original


class _FusedAttention(torch.autograd.Function):
    """Attention as a fused kernel (flash or memory-efficient) holds it: the output, and
    for the backward the inputs, the output, one float per query and head, and a boolean
    mask turned into an additive one of the inputs' dtype; never the [T, T] scores that
    the meta device's unfused fallback would make."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        if mask is not None and mask.dtype == torch.bool:
            mask = mask.new_empty(mask.shape, dtype=q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        # the kernels' own scratch while they run: a float32 accumulator of the query
        # gradient and one float per query and head (softmax's row sums of grad * out)
        scratch = q.new_empty(q.shape, dtype=torch.float32), q.new_empty(q.shape[:-1], dtype=torch.float32)
        grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None
        del scratch
        return grads


@contextlib.contextmanager
def fused_attention_on_meta():
    """``scaled_dot_product_attention`` on meta tensors as the fused kernels a device runs.
    The function itself is swapped, not intercepted by a mode: a checkpointed layer's
    recomputation runs in the backward pass, where a mode entered around the step is not
    active, and must make what the forward made."""
    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, *args, **kwargs):
        if query.device.type == "meta":
            return _FusedAttention.apply(query, key, value, attn_mask)
        return original(query, key, value, attn_mask, *args, **kwargs)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def tracing(trace: MemoryTrace):
    """A step on the meta device, counted by ``trace``: attention as fused kernels run it,
    and values read where the tensors have them."""
    with fused_attention_on_meta(), _value_reads(), trace:
        yield trace


def allocator_peak(fn) -> int:
    """The most bytes torch's allocator held at once while ``fn()`` ran, over what it held
    when it began, from the profiler's allocation events: the measure a trace is checked
    against (on the CPU, the counterpart of CUDA's max_memory_allocated)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, size in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                          if e.name() == "[memory]"):
        live += size
        peak = max(peak, live)
    return peak
