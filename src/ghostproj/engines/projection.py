"""Per-example projected gradients from one backward pass.

For a dense layer the per-example weight gradient is G_i = sum_t delta_{i,t} x_{i,t}^T, so
its Kronecker projection P_out G_i P_in^T = sum_t (P_out delta_{i,t}) (P_in x_{i,t})^T
needs only the projected activations (kept from the forward pass, k_in wide) and the
projected output gradients (formed in the layer's backward). G_i itself is never formed.
How one layer call does that is in :mod:`ghostproj.engines.calls`; this module holds the
engine: layer choice, ranks and matrices, attaching, and collecting the vectors.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import defaults
from ..errors import GhostprojError
from ..store.manifest import LayerInfo
from .attachment import AttachedEngine, Attachment
from .calls import LayerCall, LayerMatrices, SharedInputs
from .layer_types import projectable_type
from .layers import select_layers
from .projector import LayerProjector, build_projectors, split_ranks

# Batch sizes whose result buffers are kept (each is B x D floats); --token-budget
# batches come sorted by length, so a size recurs in one stretch of the run.
SINK_SETS_KEPT = 8


def _layer_records(chosen: list[tuple[str, nn.Module]], bias: bool, ranks: dict | None, rank: int, rank_min: int,
                   rank_in: int | None, rank_out: int | None) -> list[LayerInfo]:
    """Each chosen layer's record: dimensions (n_in counting the bias column with --bias),
    k's (given in ``ranks``, else by the rank rule) and offset in the vector."""
    infos, offset = [], 0
    for module_name, module in chosen:
        cls = projectable_type(module)
        for name in cls.parts(module_name, module):
            n_in, n_out = cls.part_dims(module, name)
            if bias and cls.has_bias_column:
                if cls.bias(module) is None:
                    raise GhostprojError(f"--bias was given but layer '{name}' has no bias.")
                n_in += 1
            if ranks is not None and name in ranks:
                k_in, k_out = ranks[name]
            else:
                k_in, k_out = split_ranks(cls.part_rank(module, rank), n_in, n_out, rank_min, rank_in, rank_out)
            infos.append(LayerInfo(name, cls.type_name, n_in, n_out, k_in, k_out, offset))
            offset += k_in * k_out
    return infos


def _fitting_projectors(infos: list[LayerInfo], given, kind: str, seed: int) -> dict[str, LayerProjector]:
    """The given matrices (a --like run's, or a function of the layer records that makes
    them, as the Kronecker eigenbasis does), checked against the layers' shapes, or new
    ones."""
    if callable(given):
        given = given(infos)
    if given is None:
        given = build_projectors([(i.name, i.n_in, i.n_out, i.k_in, i.k_out) for i in infos], kind, seed)
    for info in infos:
        p = given.get(info.name)
        if p is None or tuple(p.p_in.shape) != (info.k_in, info.n_in) or tuple(p.p_out.shape) != (info.k_out,
                                                                                                   info.n_out):
            raise GhostprojError(f"The projector for layer '{info.name}' does not fit its shape.")
    return {i.name: given[i.name] for i in infos}


class GradProjectionEngine(AttachedEngine):
    """Attach to Linear / Conv1D layers of any module; after a backward pass of the sum of
    per-example losses, :meth:`collect` returns a [B, D] float32 tensor.

    ``freeze_weights=True`` (projection mode) turns off ``requires_grad`` on every parameter
    while attached, so autograd computes no weight gradient at all and stops below the
    lowest projected layer. ``freeze_weights=False`` leaves the model untouched so the
    engine can observe an ordinary training loop without changing its gradients.

    ``layers``: module-name patterns (substring, or ``re:`` regex); None = every supported
    layer except embeddings and the output head. ``ranks`` ({name: (k_in, k_out)}) and
    ``projectors`` ({name: LayerProjector}, or a function from the layer records to one)
    override the rank rule and the generated matrices, which is how a query run reuses a
    training run's exact matrices and how the Kronecker eigenbasis replaces them.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[str] | None = None,
        *,
        rank: int = defaults.RANK,
        rank_min: int = 1,
        rank_in: int | None = None,
        rank_out: int | None = None,
        projector: str = defaults.PROJECTOR,
        seed: int = 0,
        bias: bool = False,
        ranks: dict[str, tuple[int, int]] | None = None,
        projectors: dict[str, LayerProjector] | None = None,
        freeze_weights: bool = True,
        include_embeddings: bool = False,
    ) -> None:
        self.model, self.projector_kind, self.seed = model, projector, seed
        self.bias, self.freeze_weights = bias, freeze_weights
        chosen = select_layers(model, layers, include_embeddings)
        self.layers: list[LayerInfo] = _layer_records(chosen, bias, ranks, rank, rank_min, rank_in, rank_out)
        self.dim = sum(info.size for info in self.layers)
        self.projectors = _fitting_projectors(self.layers, projectors, projector, seed)
        owner = {part: module for name, module in chosen for part in projectable_type(module).parts(name, module)}
        self.modules = {info.name: owner[info.name] for info in self.layers}  # the projected layers' modules
        self.kinds = {name: projectable_type(module) for name, module in self.modules.items()}  # and their types
        self.whole = dict(chosen)  # the chosen modules by their own names
        self.has_bias = {i.name: bias and self.kinds[i.name].has_bias_column for i in self.layers}
        self.tied = self._find_tied_uses(model)
        self._attachment = Attachment()
        self._device_mats: dict[tuple, LayerMatrices] = {}
        self._sinks: dict[tuple[torch.device, int], dict[str, torch.Tensor]] = {}
        self.inputs = SharedInputs(self)
        self.batch_size: int | None = None
        self.in_step = False  # a step was begun (batch_size is set)
        self.device = torch.device("cpu")
        self.step_sinks: dict[str, torch.Tensor] = {}

    def _find_tied_uses(self, model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
        """Other modules whose weight is the same Parameter as a projected layer's (GPT-2's
        lm_head and wte): (projected layer, module, transposed). Their calls add to the
        projected layer's block, so the block is the gradient of the whole parameter; a
        module storing the weight the other way round (Linear vs Embedding) contributes
        G^T, i.e. its input meets P_out and its output gradient meets P_in."""
        tied = []
        selected = {id(m) for m in self.modules.values()}
        for name, module in self.modules.items():
            if not isinstance(getattr(module, "weight", None), torch.Tensor):  # parts of a module: never tied
                continue
            for other_name, other in model.named_modules():
                cls = projectable_type(other)
                if other is module or id(other) in selected or cls is None or other.weight is not module.weight:
                    continue
                transposed = cls.stores_transposed != self.kinds[name].stores_transposed
                if transposed and self.has_bias[name]:
                    raise GhostprojError(f"--bias is not supported for '{name}', whose weight is tied to '{other_name}'.")
                tied.append((name, other, transposed))
        return tied

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self._attachment.active

    def attach(self) -> "GradProjectionEngine":
        if self.attached:
            raise RuntimeError("GradProjectionEngine is already attached")
        if self.freeze_weights:
            self._attachment.freeze(self.model.parameters())
        uses = [(name, module, False) for name, module in self.whole.items() if projectable_type(module).own_call is None]
        uses += [(name, module, transposed) for name, module, transposed in self.tied]
        if any(projectable_type(m).own_call is not None for m in self.whole.values()):
            # their calls see the batch's tokens flattened: the step begins with the model's input
            self._attachment.hook(self.model.register_forward_pre_hook(self._begin_from_input, with_kwargs=True))
        for name, module in self.whole.items():
            own = projectable_type(module).own_call  # a call of its own stands in for the module's forward
            if own is not None:
                self._attachment.wrap_forward(module, lambda inner, name=name, module=module, own=own: own(
                    self, name, module, inner))
        for name, module, transposed in uses:
            # The layer's forward is wrapped rather than hooked: a wrapped call keeps
            # nn.Module's hook-free fast path and, being plain tensor code with an autograd
            # Function, traces into a torch.compile graph without a break. A frozen plain
            # Linear / Conv1D runs its product and the projection in one autograd node;
            # anything else (an observed training loop, embeddings, tied or subclassed
            # modules, a forward someone else replaced) keeps its own forward and backward,
            # tapped at its output.
            kind = projectable_type(module)
            fused = self.freeze_weights and not transposed and "forward" not in module.__dict__ and kind.fusable(module)

            def make(inner, name=name, module=module, kind=kind, transposed=transposed, fused=fused):
                call = LayerCall(self, name, module, kind, transposed, fused, inner)
                call.use_matrices(module.weight.device, module.weight.dtype)  # made now, not in a compiled graph
                return call
            self._attachment.wrap_forward(module, make)
        return self

    def _begin_from_input(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.batch_size is None and torch.is_grad_enabled() and torch.is_tensor(ids) and ids.dim() == 2:
            self.prepare(ids.shape[0], ids.device)

    def detach(self) -> None:
        self._attachment.undo()
        # The device matrices, sinks and shared-input groups stay: a loop that attaches
        # for every batch should not rebuild them.
        self.reset()

    # -- results -------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop accumulated gradients (call between batches if you skip :meth:`collect`)."""
        for sink in self.step_sinks.values():
            sink.grad = None
        self.batch_size = None
        self.in_step = False
        self.step_sinks = {}
        self.inputs.end_step()

    def collect(self) -> torch.Tensor:
        """[B, D] float32 projected gradients of the last backward pass(es); resets the state."""
        if self.batch_size is None:
            raise RuntimeError("no projected layer ran a forward pass with gradients enabled since the last collect()")
        b, sinks = self.batch_size, self.step_sinks
        blocks = []
        for info in self.layers:
            g = sinks[info.name].grad
            if g is None:  # the layer did not run or did not affect the loss: its gradient is 0
                g = torch.zeros(b, info.size, dtype=torch.float32, device=self.device)
            blocks.append(g.view(b, info.size))
        self.reset()
        return torch.cat(blocks, dim=1)

    # -- per call ------------------------------------------------------------------------
    def prepare(self, batch_size: int, device: torch.device | str) -> None:
        """Begin a step of ``batch_size`` examples on ``device``. Optional in eager mode (the
        first projected layer of a step does it); under ``torch.compile`` call it before
        every forward pass, so that neither the result buffers nor the batch size are
        made inside the compiled region (which would break the graph or specialize it to
        one batch size)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.batch_size is not None:
            if self.batch_size != batch_size:
                raise RuntimeError(f"a step of batch size {self.batch_size} is in progress; call collect() or "
                                   "reset() before starting one of another size")
            return
        key = (device, batch_size)
        sinks = self._sinks.pop(key, None)
        if sinks is None:
            # Leaves whose gradients receive each layer's [B, k_out, k_in] projected
            # gradient: outputs of the backward pass rather than Python state, so compiled
            # graphs and several calls of one layer (summed by autograd) need nothing special.
            # Their values are never read, so they are left uninitialized.
            sinks = {i.name: torch.empty(batch_size, i.k_out, i.k_in, device=device, requires_grad=True)
                     for i in self.layers}
            for sink in sinks.values():
                # under torch.compile, batch sizes vary (--token-budget): one graph for all
                torch._dynamo.maybe_mark_dynamic(sink, 0)
            while len(self._sinks) >= SINK_SETS_KEPT:  # B x D floats each: keep the recent sizes only
                self._sinks.pop(next(iter(self._sinks)))
        self._sinks[key] = sinks  # most recently used last
        self.batch_size, self.device, self.step_sinks = batch_size, device, sinks
        self.in_step = True

    def start_batch(self, name: str, x: torch.Tensor) -> None:
        """Called by a layer whose input's batch size differs from the step's: the first
        layer of a step begins it, any other is an error."""
        if self.batch_size is not None:
            raise RuntimeError(
                f"layer '{name}' saw batch size {x.shape[0]} but another projected layer saw {self.batch_size}; "
                "call collect() or reset() between batches"
            )
        self.prepare(x.shape[0], x.device)

    def matrices(self, name: str, device: torch.device, dtype: torch.dtype) -> LayerMatrices:
        """P_in^T, the bias column of P_in (or None) and P_out^T of one layer on ``device``,
        for a model computing in ``dtype``."""
        key = (name, device, dtype)
        mats = self._device_mats.get(key)
        if mats is None:
            p = self.projectors[name]
            mats = self._device_mats[key] = LayerMatrices.of(p.p_in, p.p_out, self.has_bias[name], device, dtype)
        return mats
