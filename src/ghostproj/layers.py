"""Supported layer types: their dimensions and how their weight gradient is oriented.

Every supported layer computes y = x W_eff^T (+ b) for some (n_out, n_in) matrix W_eff,
so a per-example gradient is always reported as G = sum_t delta_t x_t^T in (n_out, n_in)
orientation, whatever the module stores. A new layer type is one small class here plus
its entry in ``LAYER_TYPES``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .fp32 import Projection


class DenseLayer:
    """A layer whose forward is an affine map of the last input dimension."""

    type_name: str = ""
    has_bias_column = True  # --bias extends x with a constant 1
    stores_transposed = False  # weight stored as (n_in, n_out) rather than (n_out, n_in)

    @staticmethod
    def matches(module: nn.Module) -> bool:
        raise NotImplementedError

    @staticmethod
    def dims(module: nn.Module) -> tuple[int, int]:
        """(n_in, n_out)."""
        raise NotImplementedError

    @staticmethod
    def weight_grad(module: nn.Module) -> torch.Tensor:
        """The module's accumulated weight gradient in (n_out, n_in) orientation."""
        raise NotImplementedError

    @staticmethod
    def bias(module: nn.Module) -> torch.Tensor | None:
        return getattr(module, "bias", None)

    @staticmethod
    def project_input(module: nn.Module, x: torch.Tensor, p_in: Projection) -> torch.Tensor:
        """P_in x_t for every token of every example, as rows [B * S, k_in] float32."""
        return p_in.rows(x.detach().reshape(-1, x.shape[-1]))


class LinearLayer(DenseLayer):
    """``torch.nn.Linear``: weight stored as (n_out, n_in)."""

    type_name = "Linear"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @staticmethod
    def dims(module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    @staticmethod
    def weight_grad(module: nn.Module) -> torch.Tensor:
        return module.weight.grad


class Conv1DLayer(DenseLayer):
    """HF ``transformers.pytorch_utils.Conv1D`` (GPT-2): weight stored transposed, (n_in, n_out)."""

    type_name = "Conv1D"
    stores_transposed = True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        conv1d = hf_conv1d_class()
        return conv1d is not None and isinstance(module, conv1d)

    @staticmethod
    def dims(module: nn.Module) -> tuple[int, int]:
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)

    @staticmethod
    def weight_grad(module: nn.Module) -> torch.Tensor:
        return module.weight.grad.t()


class EmbeddingLayer(DenseLayer):
    """``torch.nn.Embedding`` as a dense layer on one-hot inputs: n_in = vocabulary size,
    n_out = embedding size, weight stored as (n_in, n_out). P_in x_t is the column of P_in
    at the token id, so the projection is a gather, never a one-hot product."""

    type_name = "Embedding"
    has_bias_column = False
    stores_transposed = True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @staticmethod
    def dims(module: nn.Module) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    @staticmethod
    def weight_grad(module: nn.Module) -> torch.Tensor:
        return module.weight.grad.t()

    @staticmethod
    def bias(module: nn.Module) -> torch.Tensor | None:
        return None

    @staticmethod
    def project_input(module: nn.Module, ids: torch.Tensor, p_in: Projection) -> torch.Tensor:
        ids = ids.detach().reshape(-1)
        xp = p_in.full[ids]
        if module.padding_idx is not None:  # the padding row never receives a gradient
            xp = xp * (ids != module.padding_idx).unsqueeze(-1)
        return xp


LAYER_TYPES: tuple[type[DenseLayer], ...] = (LinearLayer, Conv1DLayer, EmbeddingLayer)


def hf_conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep layers usable without it
        return None
    return Conv1D


def expand_broadcast_ids(args: tuple, batch_size: int | None):
    """Forward pre-hook body for embeddings: position ids are often [1, T] and broadcast
    over the batch after the lookup; expanding them to [B, T] keeps the output gradient per
    example. Returns new args, or None to leave them."""
    ids = args[0] if args else None
    if batch_size is not None and batch_size > 1 and torch.is_tensor(ids) and ids.dim() >= 1 and ids.shape[0] == 1:
        return (ids.expand(batch_size, *ids.shape[1:]),) + tuple(args[1:])
    return None


def layer_type(module: nn.Module) -> type[DenseLayer] | None:
    """The supported layer class for ``module``, or None."""
    for cls in LAYER_TYPES:
        if cls.matches(module):
            return cls
    return None


@dataclass(frozen=True)
class LayerInfo:
    """One projected layer as recorded in the manifest."""

    name: str
    type: str
    n_in: int  # includes the constant-1 column when bias is projected
    n_out: int
    k_in: int
    k_out: int
    offset: int  # start of this layer's block in the per-example vector

    @property
    def size(self) -> int:
        return self.k_in * self.k_out

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "type": self.type,
            "n_in": self.n_in,
            "n_out": self.n_out,
            "k_in": self.k_in,
            "k_out": self.k_out,
            "offset": self.offset,
        }

    @classmethod
    def from_json(cls, d: dict) -> "LayerInfo":
        return cls(
            name=str(d["name"]),
            type=str(d["type"]),
            n_in=int(d["n_in"]),
            n_out=int(d["n_out"]),
            k_in=int(d["k_in"]),
            k_out=int(d["k_out"]),
            offset=int(d["offset"]),
        )


def _pattern_matches(pattern: str, name: str) -> bool:
    import re

    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return pattern in name


def select_layers(model: nn.Module, patterns: list[str] | None,
                  include_embeddings: bool = False) -> list[tuple[str, nn.Module]]:
    """Modules to project, in module order.

    Without patterns: every supported layer except embeddings and the output head (their
    gradients are vocabulary-sized and rarely what users want to compare); with
    ``include_embeddings`` the embedding layers too. Patterns select any supported layer.
    """
    from .errors import GhostprojError

    supported = [(n, m) for n, m in model.named_modules() if n and layer_type(m) is not None]
    if not patterns:
        excluded = set()
        fn = getattr(model, "get_output_embeddings", None)
        if callable(fn):
            try:
                head = fn()
            except (NotImplementedError, AttributeError):
                head = None
            if head is not None:
                excluded.add(id(head))
        chosen = [(n, m) for n, m in supported if id(m) not in excluded
                  and (include_embeddings or layer_type(m) is not EmbeddingLayer)]
        if not chosen:
            raise GhostprojError("The model has no supported layer (nn.Linear or HF Conv1D) to project.")
        return chosen

    chosen: list[tuple[str, nn.Module]] = []
    seen: set[str] = set()
    all_named = [(n, m) for n, m in model.named_modules() if n]
    for pattern in patterns:
        hits = [(n, m) for n, m in all_named if _pattern_matches(pattern, n)]
        if not hits:
            names = ", ".join(n for n, _ in supported[:40])
            more = f" (and {len(supported) - 40} more)" if len(supported) > 40 else ""
            raise GhostprojError(
                f"Layer pattern '{pattern}' matches no module; supported layers are: {names}{more}."
            )
        usable = [(n, m) for n, m in hits if layer_type(m) is not None]
        if not usable:
            kinds = sorted({type(m).__name__ for _, m in hits})
            raise GhostprojError(
                f"Layer pattern '{pattern}' matches only unsupported layer types ({', '.join(kinds)}); "
                "ghostproj projects nn.Linear, HF Conv1D and nn.Embedding layers."
            )
        for n, m in usable:
            if n not in seen:
                seen.add(n)
                chosen.append((n, m))
    order = {n: i for i, (n, _) in enumerate(all_named)}
    chosen.sort(key=lambda nm: order[nm[0]])
    return chosen
