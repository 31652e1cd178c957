"""In-run gradient dot products: per training example, <grad l_i, sum_j grad l^val_j>.

The batch holds B training examples followed by M validation examples. One backward pass
of the summed per-example losses gives every covered module its inputs x (forward hook)
and output gradients delta (tensor hook). From those, per parameter:

- the validation side is materialized (its summed gradient, or one per validation example
  with ``per_query``), and each training example's dot product is a linear functional of
  its own (x, delta) -- or, for an unshared dense layer where it is cheaper for this call's
  sequence length, the token-Gram ("ghost") form
  <G_i, G_j> = sum_{t,s} (x_{i,t} . x_{j,s}) (delta_{i,t} . delta_{j,s});
- the training gradient (1/B) sum_{i<B} G_i is formed from the training rows only, so the
  validation part never updates the model.

Covered parameters are frozen while attached (autograd computes no weight gradient for
them); a parameter used by several modules (GPT-2's tied wte / lm_head) is handled as one
parameter, so the cross terms between its uses are in its dot product.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import GhostprojError
from .capture import HookCapture
from .fp32 import no_autocast
from .layer_types import LAYER_TYPES, LayerType, Use, expand_broadcast_ids, layer_type
from .layers import pattern_matches


# -- the engine ----------------------------------------------------------------------------
@dataclass
class DotProducts:
    """One step's result: ``total`` [B] (or [B, M] with per_query) summed over covered
    parameters, and the same per parameter name."""

    total: torch.Tensor
    per_param: dict[str, torch.Tensor]
    paths: dict[str, str] = field(default_factory=dict)  # module -> 'ghost' | 'materialize'


@dataclass
class _ParamState:
    name: str
    param: nn.Parameter
    roles: list[tuple[Use, str]] = field(default_factory=list)


class GradDotProdEngine(HookCapture):
    """Per-example gradient dot products with a validation batch, in the training backward.

    The batch is B training examples followed by ``val_batch_size`` (M) validation
    examples. ``loss_reduction`` says how the loss you back-propagate combines per-example
    losses: 'sum' (sum over all B + M) or 'mean' (mean over all B + M).
    ``layers``: module-name patterns restricting the covered modules (default: all
    Linear, Conv1D, Embedding, LayerNorm and RMSNorm modules). ``uncovered``: what to do
    with trainable parameters outside covered modules -- 'error' (default), or 'freeze'
    (they are not trained while attached). They cannot receive a training-only gradient
    from a backward pass that also carries the validation losses.
    ``method``: 'auto' picks ghost or materialize per call by cost; 'ghost' /
    'materialize' force one where possible.
    """

    def __init__(self, module: nn.Module, val_batch_size: int, layers: list[str] | None = None,
                 per_query: bool = False, loss_reduction: str = "sum", uncovered: str = "error",
                 method: str = "auto") -> None:
        if val_batch_size < 1:
            raise GhostprojError(f"val_batch_size must be at least 1, got {val_batch_size}.")
        if loss_reduction not in ("sum", "mean"):
            raise GhostprojError(f"loss_reduction must be 'sum' or 'mean', not '{loss_reduction}'.")
        if uncovered not in ("error", "freeze"):
            raise GhostprojError(f"uncovered must be 'error' or 'freeze', not '{uncovered}'.")
        if method not in ("auto", "ghost", "materialize"):
            raise GhostprojError(f"method must be 'auto', 'ghost' or 'materialize', not '{method}'.")
        self.val_batch_size = val_batch_size
        self.per_query = per_query
        self.loss_reduction = loss_reduction
        self.method = method
        covered: dict[str, tuple[nn.Module, type[LayerType]]] = {}
        for name, m in module.named_modules():
            math = layer_type(m)
            if math is None or not math.in_run or not any(p.requires_grad for p in m.parameters(recurse=False)):
                continue
            if layers and not any(pattern_matches(p, name) for p in layers):
                continue
            covered[name] = (m, math)
        if not covered:
            names = ", ".join(cls.type_name for cls in LAYER_TYPES)
            raise GhostprojError(f"The model has no trainable supported layer ({names}).")
        super().__init__(module, covered)
        covered_ids = {id(p) for m, _ in covered.values() for p in m.parameters(recurse=False)}
        self.uncovered = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in covered_ids]
        if self.uncovered and uncovered == "error":
            shown = ", ".join(self.uncovered[:8]) + (" ..." if len(self.uncovered) > 8 else "")
            raise GhostprojError(
                f"Trainable parameters outside supported layers cannot get a training-only gradient: {shown}; "
                "freeze them or pass uncovered='freeze'."
            )
        self._freeze_extra = uncovered == "freeze"
        self.param_names = {}
        for n, p in module.named_parameters(remove_duplicate=False):
            if id(p) in covered_ids:
                self.param_names.setdefault(id(p), n)
        self.step = 0
        self._reset_step()

    # -- the capture ---------------------------------------------------------------------
    def frozen_parameters(self):
        """Covered parameters (their gradient is formed here), and the others with uncovered='freeze'."""
        freeze = {id(p) for m, _ in self.captured.values() for p in m.parameters(recurse=False)}
        return [p for p in self.model.parameters() if id(p) in freeze or (self._freeze_extra and p.requires_grad)]

    def rewrites_arguments(self, kind) -> bool:
        return kind.takes_token_ids

    def before_call(self, name, module, kind, args):
        return expand_broadcast_ids(args, self._n)

    def after_detach(self) -> None:
        self._drop_param_attributes()
        self._reset_step()

    # -- per-step API ------------------------------------------------------------------------
    def _reset_step(self) -> None:
        self._params: dict[int, _ParamState] = {}
        self._use_params: dict[int, list[int]] = {}  # use -> keys of its parameters still to process
        self._train_grads: dict[int, torch.Tensor] = {}
        self._dots: dict[int, torch.Tensor] = {}
        self._paths: dict[str, str] = {}
        self._n: int | None = None

    def _drop_param_attributes(self) -> None:
        for st in self._params.values():
            if hasattr(st.param, "grad_dot_prod"):
                del st.param.grad_dot_prod

    def _end_step(self) -> None:
        self._drop_param_attributes()
        self._reset_step()
        self.step += 1

    def _require_step(self) -> None:
        if self._n is None:
            raise RuntimeError("no forward pass with gradients enabled ran since the last step")

    def _finalize(self) -> None:
        """Process parameters whose uses got no gradient (they do not affect the loss)."""
        for key, st in list(self._params.items()):
            if key in self._dots:
                continue
            for use, _ in st.roles:
                if use.delta is None:
                    use.delta = torch.zeros(use.kind.zero_output_gradient_shape(use), dtype=torch.float32,
                                            device=use.x.device)
            self._process(key)

    def results(self) -> DotProducts:
        """This step's dot products (after backward)."""
        self._require_step()
        self._finalize()
        per_param = {self.param_names[k]: v for k, v in self._dots.items()}
        total = sum(per_param.values())
        return DotProducts(total, per_param, dict(self._paths))

    def aggregate(self) -> torch.Tensor:
        """This step's dot products summed over parameters [B], the per-parameter tensors
        freed (what to keep of them, and with which example indices, is the caller's)."""
        res = self.results()
        self._drop_param_attributes()
        return res.total

    def prepare_gradients(self) -> None:
        """Put the gradient of (1/B) sum_{i<B} l_i (training part only) into ``.grad``."""
        self._require_step()
        self._finalize()
        for key, g in self._train_grads.items():
            p = self._params[key].param
            g = g.to(p.dtype)
            p.grad = g if p.grad is None else p.grad + g

    def clear_gradients(self) -> None:
        """Drop ``.grad`` of every parameter and this step's state; counts a step."""
        for p in self.model.parameters():
            p.grad = None
        self._end_step()

    def collect(self) -> DotProducts:
        """The context-manager API: results, training gradient into ``.grad``, state reset."""
        res = self.results()
        self.prepare_gradients()
        self._end_step()
        return res

    # -- per call ------------------------------------------------------------------------------
    def on_call(self, name, module, math, args, output):
        n = args[0].shape[0]
        if self._n is None:
            self._n = n
            if n <= self.val_batch_size:
                raise GhostprojError(
                    f"The batch has {n} examples but val_batch_size is {self.val_batch_size}; "
                    "put at least one training example before the validation examples."
                )
        elif n != self._n:
            raise RuntimeError(f"module '{name}' saw batch size {n}, another covered module saw {self._n}")
        x = math.save_input(module, args)
        # Kept in the model's dtype: a bf16 model's inputs are upcast only when their
        # parameters are processed, never all at once for the whole forward pass.
        use = Use(module, name, math, x)
        params = [(role, p) for role, p in (("weight", getattr(module, "weight", None)), ("bias", getattr(module, "bias", None)))
                  if isinstance(p, nn.Parameter)]
        for role, p in params:
            st = self._params.setdefault(id(p), _ParamState(self.param_names.get(id(p), name + "." + role), p))
            st.roles.append((use, role))
        self._use_params[id(use)] = [id(p) for _, p in params]
        return use

    def on_output_grad(self, use: Use, grad: torch.Tensor) -> None:
        scale = float(self._n) if self.loss_reduction == "mean" else 1.0
        g = grad.float() * scale if scale != 1.0 else grad.float()
        use.delta = use.kind.output_gradient(use, g)
        # a parameter is ready once every use of it in this forward has its gradient
        for key in list(self._use_params.get(id(use), [])):
            st = self._params[key]
            if key not in self._dots and all(u.delta is not None for u, _ in st.roles):
                self._process(key)

    def _process(self, key: int) -> None:
        with no_autocast(self._params[key].param.device):  # float32 products even inside an autocast region
            self._process_param(key)

    def _process_param(self, key: int) -> None:
        st = self._params[key]
        for use, _ in st.roles:
            if not use.kind.takes_token_ids and use.x.dtype != torch.float32:
                use.x = use.x.float()
        b = self._n - self.val_batch_size
        m = self.val_batch_size
        dots = None
        if len(st.roles) == 1:
            use, role = st.roles[0]
            if role == "weight" and use.kind.ghost is not None:
                ghost_cost, mat_cost = use.kind.costs(use, b, m, self.per_query)
                use_ghost = self.method == "ghost" or (self.method == "auto" and ghost_cost < mat_cost)
                self._paths[use.name] = "ghost" if use_ghost else "materialize"
                if use_ghost:
                    dots = use.kind.ghost(use, role, b)
                    if not self.per_query:
                        dots = dots.sum(1, keepdim=True)
        if dots is None:
            g_val = sum(use.kind.val_grad(use, role, b, self.per_query) for use, role in st.roles)
            dots = sum(use.kind.train_dot(use, role, b, g_val) for use, role in st.roles)
            for use, role in st.roles:
                if role == "weight":
                    self._paths.setdefault(use.name, "materialize")
        self._dots[key] = dots if self.per_query else dots[:, 0]
        self._train_grads[key] = sum(use.kind.train_grad(use, role, b) for use, role in st.roles) / b
        st.param.grad_dot_prod = self._dots[key]
        for use, _ in st.roles:  # free inputs and gradients once all their parameters are done
            pending = self._use_params.get(id(use), [])
            if key in pending:
                pending.remove(key)
            if not pending:
                use.x = use.delta = None
                use.per_example.clear()
