"""One capture lifecycle for the engines that observe layer calls through hooks: the in-run
dot products (:mod:`dotprod`), the Kronecker factors (:mod:`factors`) and the Adam
directions (:mod:`adam`). The base owns which modules are captured, attaching and
detaching, freezing and restoring parameters, and per call the layer's input and, once
backward reaches it, its output gradient; an engine implements only what it does with
them (:meth:`HookCapture.on_call`, :meth:`HookCapture.on_output_grad`).

The projection engine captures the same pairs by wrapping each layer's forward in an
autograd Function instead (:mod:`calls`): a wrapped call keeps ``nn.Module``'s hook-free
fast path and traces into a ``torch.compile`` graph, which its host-bound speed depends on.
It shares :class:`~ghostproj.engines.attachment.Attachment` with these.
"""

from __future__ import annotations

from functools import partial
from typing import Iterable

import torch
from torch import nn

from .attachment import AttachedEngine, Attachment
from .layer_types import LayerType


class HookCapture(AttachedEngine):
    """``captured``: {name: (module, its layer type)}. While attached, every call of a
    captured module with gradients enabled goes to :meth:`on_call`; when it returns a
    context, the call's output gradient goes to :meth:`on_output_grad` with it."""

    def __init__(self, model: nn.Module, captured: dict[str, tuple[nn.Module, type[LayerType]]]) -> None:
        self.model = model
        self.captured = captured
        self._attachment = Attachment()

    # -- what an engine decides ----------------------------------------------------------
    def frozen_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters whose ``requires_grad`` is off while attached (restored on detach)."""
        return self.model.parameters()

    def rewrites_arguments(self, kind: type[LayerType]) -> bool:
        """Whether calls of this type go through :meth:`before_call` first."""
        return False

    def before_call(self, name: str, module: nn.Module, kind: type[LayerType], args: tuple):
        """New positional arguments for the call, or None to leave them."""
        return None

    def on_call(self, name: str, module: nn.Module, kind: type[LayerType], args: tuple, output: torch.Tensor):
        """A captured call: return a context for its output gradient, or None to skip it."""
        raise NotImplementedError

    def on_output_grad(self, context, grad: torch.Tensor) -> None:
        raise NotImplementedError

    def after_detach(self) -> None:
        """Drop per-step state once the hooks are gone."""

    # -- the lifecycle -------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._attachment.active

    def attach(self):
        if self.attached:
            raise RuntimeError(f"{type(self).__name__} is already attached")
        self._attachment.freeze(self.frozen_parameters())
        for name, (module, kind) in self.captured.items():
            if self.rewrites_arguments(kind):
                self._attachment.hook(module.register_forward_pre_hook(partial(self._before, name, kind)))
            self._attachment.hook(module.register_forward_hook(partial(self._after, name, kind)))
        return self

    def detach(self) -> None:
        self._attachment.undo()
        self.after_detach()

    def _before(self, name, kind, module, args):
        return self.before_call(name, module, kind, args)

    def _after(self, name, kind, module, args, output):
        if not torch.is_grad_enabled() or not torch.is_tensor(output):
            return None
        context = self.on_call(name, module, kind, args, output)
        if context is None:
            return None
        replaced = None
        if not output.requires_grad:
            # frozen weights and an input that needs no gradient (the lowest captured layer):
            # the output becomes a leaf that does, so backward still reaches this call
            output = output.detach().requires_grad_(True)
            replaced = output
        output.register_hook(partial(self.on_output_grad, context))
        return replaced
