"""Every supported module type, one class each, holding all of its maths for both engines.

A dense layer computes y = x W_eff^T (+ b) for an (n_out, n_in) matrix W_eff, so its
per-example gradient is G = sum_t delta_t x_t^T in (n_out, n_in) orientation whatever
the module stores (``stores_transposed``). For the projection engine a class says how the
layer's input is projected (:meth:`LayerType.project_input`); for the in-run engine
(:mod:`ghostproj.engines.dotprod`) how the validation gradient, each training example's
dot product with it, the training gradient and, where there is one, the token-Gram
("ghost") form are computed from the layer's inputs x and output gradients delta.

In-run tensors: x [N, S, n_in] (token ids [N, S] for embeddings), delta [N, S, n_out]
float32 already scaled per example; ``role`` is 'weight' or 'bias'; a validation
gradient carries a leading query axis M' (1 when summed over the validation examples).

A new module type is one subclass of :class:`LayerType` with a ``type_name``: defining it
registers it (:data:`LAYER_TYPES`), and every engine asks it, never its identity, what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .fp32 import Projection

# Every supported type, in definition order (filled by LayerType.__init_subclass__), and the
# type found for each module class (cleared whenever a type is added).
LAYER_TYPES: list[type["LayerType"]] = []
_BY_MODULE_TYPE: dict[type, type["LayerType"] | None] = {}


@dataclass
class Use:
    """One call of a covered module during an in-run step."""

    module: nn.Module
    name: str
    kind: type["LayerType"]
    x: torch.Tensor  # in the model's dtype until processed, then float32 (token ids for embeddings)
    delta: torch.Tensor | None = None
    per_example: dict = field(default_factory=dict)  # role -> [N, *shape], computed once per step


class LayerType:
    type_name: str = ""
    projectable = False  # the projection engine can project it
    projected_by_default = True  # chosen when no --layers pattern is given (embeddings are not)
    kronecker_factors = False  # `ghostproj factors` can take its A and G
    has_bias_column = True  # --bias extends x with a constant 1
    stores_transposed = False  # weight stored (n_in, n_out) rather than (n_out, n_in)
    takes_token_ids = False  # its input is token ids, not activations

    def __init_subclass__(cls, **kwargs):
        """A class with a ``type_name`` is a supported module type from its definition on."""
        super().__init_subclass__(**kwargs)
        if cls.type_name and cls not in LAYER_TYPES:
            LAYER_TYPES.append(cls)
            _BY_MODULE_TYPE.clear()

    @staticmethod
    def matches(module: nn.Module) -> bool:
        raise NotImplementedError

    @staticmethod
    def fusable(module: nn.Module) -> bool:
        """Whether a frozen call can run as one autograd node computing the layer's output,
        its input gradient (:meth:`input_grad`) and the projection: only the exact classes
        whose forward is known (a subclass may do anything in its own)."""
        return False

    @staticmethod
    def input_grad(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The input gradient of a fused call, from the output gradient as rows [B * S, n_out]."""
        raise NotImplementedError

    @classmethod
    def weight_grads(cls, module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Each example's weight gradient G_n [B, n_out, n_in], from x [B, S, n_in] (token ids
        [B, S] for embeddings) and delta [B, S, n_out], float32."""
        raise NotImplementedError

    # -- the projection engine -------------------------------------------------------------
    in_run = True  # the in-run engine can take it (a type the projection engine alone serves says False)
    # The projection engine's stand-in for the module's forward, for a type whose products
    # happen inside a forward of its own (None: the engine's own LayerCall); built as
    # ``own_call(engine, module name, module, the forward it wraps)``.
    own_call = None

    @staticmethod
    def dims(module: nn.Module) -> tuple[int, int]:
        """(n_in, n_out)."""
        raise NotImplementedError

    # A module is one projected layer named as the module, unless its type splits it into
    # parts (a fused MoE module's experts), each with its own record and block: its name,
    # (n_in, n_out), rank budget, the parameter holding it, its weight as stored (what the
    # fingerprint hashes) and its weight gradient in (n_out, n_in) orientation.
    @classmethod
    def parts(cls, name: str, module: nn.Module) -> list[str]:
        return [name]

    @classmethod
    def part_dims(cls, module: nn.Module, part: str) -> tuple[int, int]:
        return cls.dims(module)

    @classmethod
    def part_rank(cls, module: nn.Module, rank: int) -> int:
        return rank

    @classmethod
    def part_parameter(cls, module: nn.Module, part: str) -> nn.Parameter:
        return module.weight

    part_weight = part_parameter

    @classmethod
    def part_grad(cls, module: nn.Module, part: str) -> torch.Tensor:
        return cls.weight_grad(module)

    @classmethod
    def weight_grad(cls, module: nn.Module) -> torch.Tensor:
        """The module's accumulated weight gradient in (n_out, n_in) orientation."""
        return module.weight.grad.t() if cls.stores_transposed else module.weight.grad

    @staticmethod
    def bias(module: nn.Module) -> torch.Tensor | None:
        return getattr(module, "bias", None)

    @staticmethod
    def project_input(module: nn.Module | None, x: torch.Tensor, p_in: Projection) -> torch.Tensor:
        """P_in x_t for every token of every example, as rows [B * S, k_in] float32."""
        return p_in.rows(x.detach().reshape(-1, x.shape[-1]))

    # -- the in-run engine -----------------------------------------------------------------
    @staticmethod
    def save_input(module: nn.Module, args) -> torch.Tensor:
        x = args[0].detach()
        return x.reshape(x.shape[0], -1, x.shape[-1])

    @classmethod
    def output_gradient(cls, use: Use, grad: torch.Tensor) -> torch.Tensor:
        """The float32, per-example-scaled output gradient as the parameter sees it."""
        return grad.reshape(grad.shape[0], -1, grad.shape[-1])

    @staticmethod
    def zero_output_gradient_shape(use: Use) -> tuple[int, ...]:
        """The shape of delta for a call that did not affect the loss."""
        return tuple(use.x.shape)

    @classmethod
    def per_example(cls, use: Use, role: str) -> torch.Tensor:
        """Cheap per-example gradients [N, *shape]; the default for every role not given a
        direct form below."""
        raise NotImplementedError

    @classmethod
    def _pe(cls, use: Use, role: str) -> torch.Tensor:
        if role not in use.per_example:  # used three times per step: validation, dots, training grad
            use.per_example[role] = cls.per_example(use, role)
        return use.per_example[role]

    @classmethod
    def val_grad(cls, use: Use, role: str, b: int, per_query: bool) -> torch.Tensor:
        pe = cls._pe(use, role)[b:]
        return pe if per_query else pe.sum(0, keepdim=True)

    @classmethod
    def train_dot(cls, use: Use, role: str, b: int, g: torch.Tensor) -> torch.Tensor:
        pe = cls._pe(use, role)[:b]
        return pe.reshape(b, -1) @ g.reshape(g.shape[0], -1).t()

    @classmethod
    def train_grad(cls, use: Use, role: str, b: int) -> torch.Tensor:
        return cls._pe(use, role)[:b].sum(0)

    ghost = None  # optional token-Gram form: (use, role, b) -> [B, M]

    @staticmethod
    def costs(use: Use, b: int, m: int, per_query: bool) -> tuple[float, float]:
        """(ghost, materialize) multiply-adds of this call."""
        return float("inf"), 0.0


class LinearLayer(LayerType):
    """``torch.nn.Linear``: weight stored as (n_out, n_in)."""

    type_name = "Linear"
    projectable = True
    kronecker_factors = True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @staticmethod
    def fusable(module: nn.Module) -> bool:
        return type(module) is nn.Linear

    @staticmethod
    def input_grad(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.mm(rows, weight)

    @classmethod
    def weight_grads(cls, module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bto,bti->boi", delta, x)

    @staticmethod
    def dims(module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    @staticmethod
    def zero_output_gradient_shape(use: Use) -> tuple[int, ...]:
        return (*use.x.shape[:2], use.module.weight.shape[1 if use.kind.stores_transposed else 0])

    @classmethod
    def _to_layout(cls, g: torch.Tensor) -> torch.Tensor:  # (.., n_out, n_in) -> the parameter's layout
        return g.transpose(-1, -2) if cls.stores_transposed else g

    @classmethod
    def per_example(cls, use: Use, role: str) -> torch.Tensor:
        assert role == "bias"
        return use.delta.sum(1)

    @classmethod
    def val_grad(cls, use, role, b, per_query):
        if role == "bias":
            return super().val_grad(use, role, b, per_query)
        x, d = use.x[b:], use.delta[b:]
        g = torch.einsum("jso,jsi->joi", d, x) if per_query else torch.einsum("jso,jsi->oi", d, x)[None]
        return cls._to_layout(g)

    @classmethod
    def train_dot(cls, use, role, b, g):
        if role == "bias":
            return super().train_dot(use, role, b, g)
        x, d = use.x[:b], use.delta[:b]
        g = cls._to_layout(g)  # back to (n_out, n_in)
        out = torch.empty(b, g.shape[0], dtype=torch.float32, device=x.device)
        # <G_i, g> = sum_t d_t . (g x_t) = sum_t (g^T d_t) . x_t: the same multiply-adds either
        # way, so map onto the narrower side and keep the elementwise pass small.
        narrow_in = x.shape[-1] <= d.shape[-1]
        for m in range(g.shape[0]):  # M' is small; one [B, S, width] temporary at a time
            if narrow_in:
                out[:, m] = ((d @ g[m]) * x).sum(dim=(1, 2))
            else:
                out[:, m] = ((x @ g[m].t()) * d).sum(dim=(1, 2))
        return out

    @classmethod
    def train_grad(cls, use, role, b):
        if role == "bias":
            return super().train_grad(use, role, b)
        return cls._to_layout(torch.einsum("bso,bsi->oi", use.delta[:b], use.x[:b]))

    @staticmethod
    def ghost(use, role, b):
        x_tr, x_val = use.x[:b], use.x[b:]
        d_tr, d_val = use.delta[:b], use.delta[b:]
        gx = torch.einsum("bsi,mti->bmst", x_tr, x_val)
        gd = torch.einsum("bso,mto->bmst", d_tr, d_val)
        return (gx * gd).sum(dim=(2, 3))

    @staticmethod
    def costs(use, b, m, per_query):
        t = use.x.shape[1]
        n_in, n_out = use.x.shape[-1], use.delta.shape[-1]
        ghost = b * m * t * t * (n_in + n_out)
        materialize = m * t * n_in * n_out + b * (m if per_query else 1) * t * n_in * n_out
        return float(ghost), float(materialize)


class Conv1DLayer(LinearLayer):
    """HF ``transformers.pytorch_utils.Conv1D`` (GPT-2): weight stored transposed, (n_in, n_out)."""

    type_name = "Conv1D"
    stores_transposed = True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        conv1d = hf_conv1d_class()
        return conv1d is not None and isinstance(module, conv1d)

    @staticmethod
    def fusable(module: nn.Module) -> bool:
        return type(module) is hf_conv1d_class()

    @staticmethod
    def input_grad(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.mm(rows, weight.t())

    @staticmethod
    def dims(module: nn.Module) -> tuple[int, int]:
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)


class EmbeddingLayer(LayerType):
    """``torch.nn.Embedding`` as a dense layer on one-hot inputs: n_in = vocabulary size,
    n_out = embedding size, weight stored as (n_in, n_out). P_in x_t is the column of P_in
    at the token id, so the projection is a gather, never a one-hot product."""

    type_name = "Embedding"
    projectable = True
    projected_by_default = False  # vocabulary-sized gradients: chosen by --include-embeddings or a pattern
    has_bias_column = False
    stores_transposed = True
    takes_token_ids = True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @staticmethod
    def dims(module: nn.Module) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

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

    @staticmethod
    def save_input(module, args):
        ids = args[0].detach()
        return ids.reshape(ids.shape[0], -1)

    @classmethod
    def weight_grads(cls, module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The one-hot product as a scatter: G_n[:, v] = sum of delta_t where token t is v."""
        b, t, n_out = delta.shape
        if module.padding_idx is not None:  # the padding row never receives a gradient
            delta = delta * (x != module.padding_idx).unsqueeze(-1)
        vocab_rows = torch.zeros(b, module.num_embeddings, n_out, dtype=delta.dtype, device=delta.device)
        vocab_rows.scatter_add_(1, x.reshape(b, t, 1).expand(b, t, n_out), delta)
        return vocab_rows.transpose(1, 2)

    @classmethod
    def output_gradient(cls, use, grad):
        delta = grad.reshape(grad.shape[0], -1, grad.shape[-1])
        pad = use.module.padding_idx
        if pad is not None:  # nn.Embedding never updates its padding row
            delta = delta * (use.x != pad).unsqueeze(-1)
        return delta

    @staticmethod
    def zero_output_gradient_shape(use):
        return (*use.x.shape, use.module.weight.shape[1])

    @classmethod
    def val_grad(cls, use, role, b, per_query):
        w = use.module.weight
        ids, d = use.x[b:], use.delta[b:]
        rows = ids.shape[0] if per_query else 1
        g = torch.zeros(rows, *w.shape, dtype=torch.float32, device=d.device)
        for j in range(rows):
            sel_ids = ids[j] if per_query else ids.reshape(-1)
            sel_d = d[j] if per_query else d.reshape(-1, d.shape[-1])
            g[j].index_add_(0, sel_ids, sel_d)
        return g

    @classmethod
    def train_dot(cls, use, role, b, g):
        ids, d = use.x[:b], use.delta[:b]
        return torch.stack([(g[m][ids] * d).sum(dim=(1, 2)) for m in range(g.shape[0])], dim=1)

    @classmethod
    def train_grad(cls, use, role, b):
        ids, d = use.x[:b], use.delta[:b]
        g = torch.zeros(use.module.weight.shape, dtype=torch.float32, device=d.device)
        return g.index_add_(0, ids.reshape(-1), d.reshape(-1, d.shape[-1]))


def remove_layer_type(cls: type[LayerType]) -> None:
    """Undo a type's registration (a type defined for a while, in a test or a notebook)."""
    LAYER_TYPES.remove(cls)
    _BY_MODULE_TYPE.clear()


def layer_type(module: nn.Module) -> type[LayerType] | None:
    """The supported layer class for ``module`` (looked up once per module class), or None."""
    key = type(module)
    if key not in _BY_MODULE_TYPE:
        _BY_MODULE_TYPE[key] = next((cls for cls in LAYER_TYPES if cls.matches(module)), None)
    return _BY_MODULE_TYPE[key]


def projectable_type(module: nn.Module) -> type[LayerType] | None:
    """The layer class for ``module`` if the projection engine can project it, else None."""
    cls = layer_type(module)
    return cls if cls is not None and cls.projectable else None


def hf_conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but keep layers usable without it
        return None
    return Conv1D


def expand_broadcast_ids(args: tuple, batch_size: int | None):
    """For embeddings: position ids are often [1, T] and broadcast over the batch after the
    lookup; expanding them to [B, T] keeps the output gradient per example. Returns new
    args, or None to leave them."""
    ids = args[0] if args else None
    if batch_size is not None and batch_size > 1 and torch.is_tensor(ids) and ids.dim() >= 1 and ids.shape[0] == 1:
        return (ids.expand(batch_size, *ids.shape[1:]),) + tuple(args[1:])
    return None
