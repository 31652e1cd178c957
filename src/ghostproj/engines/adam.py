"""Optimizer-aware training vectors: each example's projected Adam update direction.

With Adam moments (m, v) of the model's last training step, the direction an example z
would move a weight is elementwise

    m' = b1 m + (1 - b1) g_z,   v' = b2 v + (1 - b2) g_z^2,   Gamma_z = m' / (sqrt(v') + eps)

(the LESS recipe). Gamma_z is elementwise in the full gradient g_z, so it has no Kronecker
shortcut: this engine forms each example's per-layer gradient G_z = sum_t delta_t x_t^T
(one batched product per layer, B x n_out x n_in floats at a time), transforms it, then
projects P_out Gamma_z P_in^T with the same matrices as the plain engine, so the training
vectors stay comparable with query vectors projected from raw gradients (``--like``).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import GhostprojError
from .capture import HookCapture
from .projection import GradProjectionEngine


@dataclass
class AdamMoments:
    """Per projected layer: (m, v) in (n_out, n_in) orientation, a bias column appended
    with --bias; and the optimizer's b1, b2, eps."""

    moments: dict[str, tuple[torch.Tensor, torch.Tensor]]
    beta1: float
    beta2: float
    eps: float


def _read_safetensors(path: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001  (any unreadable file gets one sentence)
        raise GhostprojError(f"Cannot read the optimizer state {path}: {str(exc).splitlines()[0]}") from None
    names = {k[: -len(".exp_avg")] for k in tensors if k.endswith(".exp_avg")}
    moments = {n: (tensors[f"{n}.exp_avg"], tensors[f"{n}.exp_avg_sq"]) for n in names if f"{n}.exp_avg_sq" in tensors}
    hyper = {k: float(meta[k]) for k in ("beta1", "beta2", "eps") if k in meta}
    return moments, hyper


def _trainer_order(model: nn.Module) -> list[str]:
    """Trainable parameter names as a Trainer-style optimizer numbers them: the
    weight-decayed ones (not biases, not norm layers), then the rest."""
    norm_params = {f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules() if "Norm" in type(m).__name__
                   for pn, _ in m.named_parameters(recurse=False)}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    decay = [n for n in names if n not in norm_params and "bias" not in n]
    return decay + [n for n in names if n not in decay]


def _read_torch_checkpoint(path: Path, model: nn.Module) -> tuple[dict, dict]:
    """A torch optimizer ``state_dict`` (AdamW of a training loop or Trainer's optimizer.pt),
    loaded with weights_only=True, its parameter numbers mapped to names by whichever
    parameter order fits every moment's shape."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise GhostprojError(f"Cannot read the optimizer state {path} as a torch optimizer checkpoint (only plain "
                             f"tensors and containers are loaded): {str(exc).splitlines()[0]}") from None
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise GhostprojError(f"{path} is not an optimizer state_dict (it has no 'state' and 'param_groups').")
    numbers = [i for g in sd["param_groups"] for i in g["params"]]
    params = dict(model.named_parameters())
    for order in (_trainer_order(model), [n for n, p in model.named_parameters() if p.requires_grad]):
        if len(order) != len(numbers):
            continue
        name_of = dict(zip(numbers, order))
        if all(tuple(s["exp_avg"].shape) == tuple(params[name_of[i]].shape)
               for i, s in sd["state"].items() if "exp_avg" in s):
            group = sd["param_groups"][0]
            betas = group.get("betas", (0.9, 0.999))
            moments = {name_of[i]: (s["exp_avg"], s["exp_avg_sq"]) for i, s in sd["state"].items()
                       if "exp_avg" in s and "exp_avg_sq" in s}
            return moments, {"beta1": float(betas[0]), "beta2": float(betas[1]), "eps": float(group.get("eps", 1e-8))}
    raise GhostprojError(f"The optimizer state {path} does not match this model: its {len(numbers)} parameters "
                         "fit neither the model's parameter order nor a Trainer's (is it from another model?).")


def load_adam_moments(path: str, engine: GradProjectionEngine) -> AdamMoments:
    """The Adam moments of every layer ``engine`` projects, from a safetensors file
    (``<param>.exp_avg`` / ``<param>.exp_avg_sq``, metadata beta1, beta2, eps) or a torch
    optimizer checkpoint."""
    p = Path(path)
    if not p.is_file():
        raise GhostprojError(f"Optimizer state {path} does not exist.")
    with open(p, "rb") as f:
        is_safetensors = p.suffix == ".safetensors" or f.read(1) not in (b"P", b"\x80")
    moments, hyper = _read_safetensors(p) if is_safetensors else _read_torch_checkpoint(p, engine.model)
    out = {}
    for info in engine.layers:
        kind = engine.kinds[info.name]
        param = f"{info.name}.weight"
        if param not in moments:
            raise GhostprojError(f"The optimizer state has no Adam moments for '{param}', a projected layer's weight.")
        m, v = (t.float().t() if kind.stores_transposed else t.float() for t in moments[param])
        if tuple(m.shape) != (info.n_out, info.n_in - int(engine.has_bias[info.name])) or m.shape != v.shape:
            raise GhostprojError(f"The optimizer state's moments for '{param}' have shape {tuple(m.shape)}, not the "
                                 "layer's weight shape.")
        if engine.has_bias[info.name]:
            if f"{info.name}.bias" not in moments:
                raise GhostprojError(f"--bias was given but the optimizer state has no moments for '{info.name}.bias'.")
            mb, vb = (t.float().reshape(-1, 1) for t in moments[f"{info.name}.bias"])
            m, v = torch.cat([m, mb], 1), torch.cat([v, vb], 1)
        out[info.name] = (m.contiguous(), v.contiguous())
    return AdamMoments(out, hyper.get("beta1", 0.9), hyper.get("beta2", 0.999), hyper.get("eps", 1e-8))


class _AdamCapture(HookCapture):
    """Keeps each projected layer call's input and output gradient for the Adam engine."""

    def __init__(self, engine: "AdamDirectionEngine") -> None:
        super().__init__(engine.model, {n: (m, engine.kinds[n]) for n, m in engine.modules.items()})
        self.engine = engine

    def on_call(self, name, module, kind, args, output):
        engine = self.engine
        if engine.batch_size is None:
            engine.start_batch(name, args[0])
        x = kind.save_input(module, args)
        if not kind.takes_token_ids:
            x = x.float()
            if engine.has_bias[name]:
                x = torch.cat([x, torch.ones_like(x[..., :1])], -1)
        entry = [x, None]
        engine.seen.setdefault(name, []).append(entry)
        return entry

    def on_output_grad(self, entry, grad):
        entry[1] = grad.detach().float().reshape(grad.shape[0], -1, grad.shape[-1])


class AdamDirectionEngine(GradProjectionEngine):
    """:class:`GradProjectionEngine` whose vectors are projected Adam update directions;
    same layers, matrices and [B, D] layout. The shared hook capture keeps each projected
    layer's input and output gradient, and :meth:`collect` forms (by the layer type),
    transforms and projects the per-example gradients."""

    def __init__(self, model: nn.Module, layers=None, *, optimizer_state: str, **kwargs) -> None:
        super().__init__(model, layers, **kwargs)
        if self.tied:
            raise GhostprojError("--optimizer-state does not support layers whose weight is tied to another module.")
        if any(kind.own_call is not None for kind in self.kinds.values()):
            raise GhostprojError("--optimizer-state projects Linear / Conv1D layers; leave the mixture-of-experts "
                                 "modules out of --layers.")
        self.adam = load_adam_moments(optimizer_state, self)
        self.seen: dict[str, list] = {}  # this step's [input, output gradient] per call of each layer
        self._capture = _AdamCapture(self)
        self._on_device: dict[tuple[str, torch.device], tuple[torch.Tensor, ...]] = {}

    @property
    def attached(self) -> bool:
        return self._capture.attached

    def attach(self) -> "AdamDirectionEngine":
        self._capture.attach()
        return self

    def detach(self) -> None:
        self._capture.detach()
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.seen = {}

    def _layer_tensors(self, name: str, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(m, v, P_in, P_out) of one layer on ``device``, float32; copied there once, not per batch."""
        key = (name, device)
        if key not in self._on_device:
            p = self.projectors[name]
            self._on_device[key] = tuple(t.to(device, torch.float32) for t in (*self.adam.moments[name], p.p_in,
                                                                                 p.p_out))
        return self._on_device[key]

    def collect(self) -> torch.Tensor:
        if self.batch_size is None:
            raise RuntimeError("no projected layer ran a forward pass with gradients enabled since the last collect()")
        b, blocks, a = self.batch_size, [], self.adam
        for info in self.layers:
            calls = [(x, d) for x, d in self.seen.get(info.name, []) if d is not None]
            kind, module = self.kinds[info.name], self.modules[info.name]
            if not calls:
                g = torch.zeros(b, info.n_out, info.n_in, device=self.device)
            else:
                g = sum(kind.weight_grads(module, x, d) for x, d in calls)
            m, v, p_in, p_out = self._layer_tensors(info.name, g.device)
            direction = (a.beta1 * m + (1 - a.beta1) * g) / ((a.beta2 * v + (1 - a.beta2) * g * g).sqrt() + a.eps)
            blocks.append((p_out @ direction @ p_in.t()).reshape(b, info.size))
        self.reset()
        return torch.cat(blocks, dim=1)
