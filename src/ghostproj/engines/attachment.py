"""What attaching an engine changes on a model, recorded so that detaching undoes exactly
that: parameters frozen, hooks registered, forwards replaced by wrappers. Both engines
attach through it, and a detached model has no hook, attribute or flag of theirs left."""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn


class Attachment:
    def __init__(self) -> None:
        self._flags: list[tuple[nn.Parameter, bool]] = []
        self._hooks: list = []
        self._forwards: list[tuple[nn.Module, object]] = []  # (module, its own instance forward or None)

    @property
    def active(self) -> bool:
        return bool(self._flags or self._hooks or self._forwards)

    def freeze(self, params: Iterable[nn.Parameter]) -> None:
        """Turn ``requires_grad`` off, remembering each flag."""
        for p in params:
            self._flags.append((p, p.requires_grad))
            p.requires_grad_(False)

    def hook(self, handle) -> None:
        """Keep a hook handle to remove on :meth:`undo`."""
        self._hooks.append(handle)

    def wrap_forward(self, module: nn.Module, make: Callable) -> None:
        """Replace ``module.forward`` by ``make(inner)``, where ``inner`` is the forward it
        had (an instance-level one set by someone else is kept and restored)."""
        own = module.__dict__.get("forward")
        module.forward = make(own if own is not None else module.forward)
        self._forwards.append((module, own))

    def undo(self) -> None:
        for h in self._hooks:
            h.remove()
        for module, own in reversed(self._forwards):
            if own is None:
                del module.forward
            else:
                module.forward = own
        for p, flag in reversed(self._flags):
            p.requires_grad_(flag)
        self._hooks, self._forwards, self._flags = [], [], []


class AttachedEngine:
    """The context-manager protocol of both engines: ``with engine:`` attaches, leaving the
    block detaches."""

    def attach(self):
        raise NotImplementedError

    def detach(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()
