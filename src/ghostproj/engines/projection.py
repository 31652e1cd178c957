"""Per-example projected gradients from one backward pass.

For a dense layer the per-example weight gradient is G_i = sum_t delta_{i,t} x_{i,t}^T, so
its Kronecker projection P_out G_i P_in^T = sum_t (P_out delta_{i,t}) (P_in x_{i,t})^T
needs only the projected activations (kept from the forward pass, k_in wide) and the
projected output gradients (seen by a tensor hook on the layer output). G_i itself is
never formed.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ..errors import GhostprojError
from ..fp32 import no_autocast, project_rows
from ..layers import LayerInfo, expand_broadcast_ids, layer_type, select_layers
from ..projector import LayerProjector, build_projectors, choose_ranks


def split_ranks(
    rank: int, n_in: int, n_out: int, rank_min: int = 1, rank_in: int | None = None, rank_out: int | None = None
) -> tuple[int, int]:
    """(k_in, k_out): the budget rule of :func:`choose_ranks`, unless ``rank_in``/``rank_out``
    fix a side; a side left free then takes the rest of the budget."""
    if rank_in is not None and rank_in < 1 or rank_out is not None and rank_out < 1:
        raise GhostprojError("--rank-in and --rank-out must be at least 1.")
    if rank_in is None and rank_out is None:
        return choose_ranks(rank, n_in, n_out, rank_min)
    k_in = min(n_in, rank_in) if rank_in is not None else None
    k_out = min(n_out, rank_out) if rank_out is not None else None
    if k_in is None:
        k_in = max(1, min(n_in, rank // k_out))
    if k_out is None:
        k_out = max(1, min(n_out, rank // k_in))
    return k_in, k_out


class GradProjectionEngine:
    """Attach to Linear / Conv1D layers of any module; after a backward pass of the sum of
    per-example losses, :meth:`collect` returns a [B, D] float32 tensor.

    ``freeze_weights=True`` (projection mode) turns off ``requires_grad`` on every parameter
    while attached, so autograd computes no weight gradient at all and stops below the
    lowest projected layer. ``freeze_weights=False`` leaves the model untouched so the
    engine can observe an ordinary training loop without changing its gradients.

    ``layers``: module-name patterns (substring, or ``re:`` regex); None = every supported
    layer except embeddings and the output head. ``ranks`` ({name: (k_in, k_out)}) and
    ``projectors`` ({name: LayerProjector}) override the rank rule and the generated
    matrices, which is how a query run reuses a training run's exact matrices.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[str] | None = None,
        *,
        rank: int = 256,
        rank_min: int = 1,
        rank_in: int | None = None,
        rank_out: int | None = None,
        projector: str = "gaussian",
        seed: int = 0,
        bias: bool = False,
        ranks: dict[str, tuple[int, int]] | None = None,
        projectors: dict[str, LayerProjector] | None = None,
        freeze_weights: bool = True,
        include_embeddings: bool = False,
    ) -> None:
        self.model = model
        self.projector_kind = projector
        self.seed = seed
        self.bias = bias
        self.freeze_weights = freeze_weights

        chosen = select_layers(model, layers, include_embeddings)
        infos: list[LayerInfo] = []
        offset = 0
        for name, module in chosen:
            cls = layer_type(module)
            n_in, n_out = cls.dims(module)
            if bias and cls.has_bias_column:
                if cls.bias(module) is None:
                    raise GhostprojError(f"--bias was given but layer '{name}' has no bias.")
                n_in += 1
            if ranks is not None and name in ranks:
                k_in, k_out = ranks[name]
            else:
                k_in, k_out = split_ranks(rank, n_in, n_out, rank_min, rank_in, rank_out)
            infos.append(LayerInfo(name, cls.type_name, n_in, n_out, k_in, k_out, offset))
            offset += k_in * k_out
        self.layers: list[LayerInfo] = infos
        self.dim = offset

        if projectors is None:
            projectors = build_projectors(
                [(i.name, i.n_in, i.n_out, i.k_in, i.k_out) for i in infos], projector, seed
            )
        for info in infos:
            p = projectors.get(info.name)
            if p is None or tuple(p.p_in.shape) != (info.k_in, info.n_in) or tuple(p.p_out.shape) != (
                info.k_out,
                info.n_out,
            ):
                raise GhostprojError(f"The projector for layer '{info.name}' does not fit its shape.")
        self.projectors: dict[str, LayerProjector] = {i.name: projectors[i.name] for i in infos}

        self._modules = {name: module for name, module in chosen}
        self._types = {name: layer_type(module) for name, module in chosen}
        self._has_bias = {i.name: bias and self._types[i.name].has_bias_column for i in infos}
        self._tied = self._find_tied_uses(model)
        self._handles: list = []
        self._saved_requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._device_mats: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}
        self._acc: dict[str, torch.Tensor] = {}
        self._batch_size: int | None = None

    def _find_tied_uses(self, model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
        """Other modules whose weight is the same Parameter as a projected layer's (GPT-2's
        lm_head and wte): (projected layer, module, transposed). Their calls add to the
        projected layer's block, so the block is the gradient of the whole parameter; a
        module storing the weight the other way round (Linear vs Embedding) contributes
        G^T, i.e. its input meets P_out and its output gradient meets P_in."""
        tied = []
        selected = {id(m) for m in self._modules.values()}
        for name, module in self._modules.items():
            for other_name, other in model.named_modules():
                cls = layer_type(other)
                if other is module or id(other) in selected or cls is None or other.weight is not module.weight:
                    continue
                transposed = cls.stores_transposed != self._types[name].stores_transposed
                if transposed and self._has_bias[name]:
                    raise GhostprojError(f"--bias is not supported for '{name}', whose weight is tied to '{other_name}'.")
                tied.append((name, other, transposed))
        return tied

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> "GradProjectionEngine":
        if self.attached:
            raise RuntimeError("GradProjectionEngine is already attached")
        if self.freeze_weights:
            self._saved_requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
            for p, _ in self._saved_requires_grad:
                p.requires_grad_(False)
        uses = [(name, module, self._types[name], False) for name, module in self._modules.items()]
        uses += [(name, module, layer_type(module), transposed) for name, module, transposed in self._tied]
        for name, module, cls, transposed in uses:
            if not cls.has_bias_column:  # embeddings: token ids in
                self._handles.append(module.register_forward_pre_hook(self._expand_broadcast_ids))
            # Kept out of torch.compile graphs: they register tensor hooks and fill Python state.
            hook = torch.compiler.disable(partial(self._forward_hook, name, cls, transposed))
            self._handles.append(module.register_forward_hook(hook))
        return self

    def _expand_broadcast_ids(self, module, args):
        return expand_broadcast_ids(args, self._batch_size)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for p, flag in self._saved_requires_grad:
            p.requires_grad_(flag)
        self._saved_requires_grad = []
        self._device_mats.clear()
        self.reset()

    def __enter__(self) -> "GradProjectionEngine":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- results -------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop accumulated gradients (call between batches if you skip :meth:`collect`)."""
        self._acc.clear()
        self._batch_size = None

    def collect(self) -> torch.Tensor:
        """[B, D] float32 projected gradients of the last backward pass(es); resets the state."""
        if self._batch_size is None:
            raise RuntimeError("no projected layer ran a forward pass with gradients enabled since the last collect()")
        b = self._batch_size
        device = next(iter(self._acc.values())).device if self._acc else torch.device("cpu")
        blocks = []
        for info in self.layers:
            g = self._acc.get(info.name)
            if g is None:  # the layer did not run or did not affect the loss: its gradient is 0
                blocks.append(torch.zeros(b, info.size, dtype=torch.float32, device=device))
            else:
                blocks.append(g.reshape(b, info.size))
        self.reset()
        return torch.cat(blocks, dim=1)

    # -- hooks ---------------------------------------------------------------------------
    def _matrices(self, name: str, device: torch.device):
        key = (name, device)
        mats = self._device_mats.get(key)
        if mats is None:
            p = self.projectors[name]
            p_in = p.p_in.to(device=device, dtype=torch.float32)
            if self._has_bias[name]:
                # x is extended by a constant 1, so its column of P_in becomes an additive term.
                mats = (p_in[:, :-1].t().contiguous(), p_in[:, -1].contiguous(), p.p_out.to(device).float().t().contiguous())
            else:
                mats = (p_in.t().contiguous(), None, p.p_out.to(device).float().t().contiguous())
            self._device_mats[key] = mats
        return mats

    def _forward_hook(self, name: str, cls, transposed: bool, module: nn.Module, args, output):
        if not torch.is_grad_enabled() or not torch.is_tensor(output):
            return None
        x = args[0]
        b = x.shape[0]
        if self._batch_size is None:
            self._batch_size = b
        elif self._batch_size != b:
            raise RuntimeError(
                f"layer '{name}' saw batch size {b} but another projected layer saw {self._batch_size}; "
                "call collect() or reset() between batches"
            )
        p_in_t, p_in_bias, p_out_t = self._matrices(name, x.device)
        if transposed:  # this module holds the layer's weight the other way round
            p_in_t, p_out_t = p_out_t, p_in_t
        with torch.no_grad():
            xp = cls.project_input(module, x, p_in_t)
            if p_in_bias is not None and not transposed:
                xp += p_in_bias
        replaced = None
        if not output.requires_grad:
            # Frozen weights and an input that needs no gradient: start the graph here, so
            # backward stops at this layer instead of walking down to the embeddings.
            output = output.detach().requires_grad_(True)
            replaced = output
        output.register_hook(partial(self._grad_hook, name, xp, p_out_t, transposed))
        return replaced

    def _grad_hook(self, name: str, xp: torch.Tensor, p_out_t: torch.Tensor, transposed: bool,
                   grad: torch.Tensor) -> None:
        b = xp.shape[0]
        dp = project_rows(grad.reshape(b, -1, grad.shape[-1]), p_out_t)  # [B, S, k_out] ([B, S, k_in] if transposed)
        with no_autocast(dp.device):
            g = torch.bmm(xp.transpose(1, 2), dp) if transposed else torch.bmm(dp.transpose(1, 2), xp)  # [B, k_out, k_in]
        prev = self._acc.get(name)
        self._acc[name] = g if prev is None else prev + g
