"""Normalization layers, for the in-run engine: their elementwise weights (and LayerNorm's
bias) get per-example gradients from the normalized input. Importing the package
registers them (:mod:`ghostproj.engines`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer_types import LayerType


class LayerNormLayer(LayerType):
    """``torch.nn.LayerNorm`` (in-run only): per-example gradients of its elementwise weight
    and bias, from the normalized input."""

    type_name = "LayerNorm"

    @staticmethod
    def matches(module):
        return isinstance(module, nn.LayerNorm)

    @staticmethod
    def save_input(module, args):
        x = args[0].detach()
        k = len(module.normalized_shape)
        return x.reshape(x.shape[0], -1, *x.shape[x.dim() - k:])

    @classmethod
    def output_gradient(cls, use, grad):
        return grad.reshape(use.x.shape)

    @classmethod
    def per_example(cls, use, role):
        if role == "bias":
            return use.delta.sum(1)
        xhat = F.layer_norm(use.x, use.module.normalized_shape, eps=use.module.eps)
        return (use.delta * xhat).sum(1)


class RMSNormLayer(LayerType):
    """RMSNorm-style modules (``torch.nn.RMSNorm``; Llama, Mistral, Qwen, T5 ... each ship
    their own class): y = w * x / rms(x) (or (1 + w) * ...), so the per-example weight
    gradient is sum_t delta_t * x_t / rms(x_t) either way. In-run only."""

    type_name = "RMSNorm"

    @staticmethod
    def matches(module):
        cls_name = type(module).__name__
        w = getattr(module, "weight", None)
        return (cls_name.endswith("RMSNorm") or cls_name == "T5LayerNorm") and isinstance(w, torch.Tensor) and \
            w.dim() == 1 and getattr(module, "bias", None) is None and rms_eps(module) is not None

    @classmethod
    def per_example(cls, use, role):
        x = use.x
        xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + rms_eps(use.module))
        return (use.delta * xhat).sum(1)


def rms_eps(module: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return value
    return None
