"""The slow exact references that prove the engine: naive per-example projection and
non-interference with a training loop."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .. import defaults
from ..data.batching import Example, collate
from ..engines.factors import factors_engine
from ..engines.losses import causal_lm_losses
from ..engines.projection import GradProjectionEngine
from ..errors import GhostprojError
from ..inputs import CheckSource, load_model_and_data, pick_mixed_lengths
from ..store.manifest import LayerInfo
from .reference import per_example_weight_grads


# -- naive reference --------------------------------------------------------------------
def naive_projected_grads(
    model: nn.Module,
    examples: list[Example],
    engine: GradProjectionEngine,
    loss_reduction: str = "mean",
) -> torch.Tensor:
    """[B, D] float64: each example alone (batch size 1, no padding), full autograd on the
    weights, explicit P_out G P_in^T with the engine's matrices."""
    out = torch.zeros(len(examples), engine.dim, dtype=torch.float64)
    for r, grads in per_example_weight_grads(model, examples, engine.modules, loss_reduction, engine.bias):
        for info in engine.layers:
            p = engine.projectors[info.name]
            block = p.p_out.double() @ grads[info.name] @ p.p_in.double().t()
            out[r, info.offset : info.offset + info.size] = block.reshape(-1)
    return out


def engine_projected_grads(
    model: nn.Module, examples: list[Example], engine: GradProjectionEngine, loss_reduction: str = "mean", pad_id: int = 0
) -> torch.Tensor:
    """[B, D] float32 from the engine on one right-padded batch of all ``examples``."""
    device = next(model.parameters()).device
    batch = collate(examples, pad_id).to(device)
    with engine:
        logits = model(**batch.model_inputs()).logits
        losses, _ = causal_lm_losses(logits, batch.labels, loss_reduction)
        losses.sum().backward()
        return engine.collect().cpu()


@dataclass
class Discrepancy:
    """How far one thing (a layer's vectors, a weight, a loss) is from its reference."""

    name: str
    max_rel: float
    max_abs: float


def compare_per_layer(got: torch.Tensor, ref: torch.Tensor, layers: list[LayerInfo]) -> list[Discrepancy]:
    """Per layer: max over examples of ||got - ref|| / ||ref|| (examples whose reference
    block is zero use the absolute norm) and the max absolute entry difference."""
    rows = []
    got = got.double()
    ref = ref.double()
    for info in layers:
        a = got[:, info.offset : info.offset + info.size]
        b = ref[:, info.offset : info.offset + info.size]
        diff = (a - b).norm(dim=1)
        scale = b.norm(dim=1)
        rel = torch.where(scale > 0, diff / scale.clamp(min=1e-300), diff)
        rows.append(Discrepancy(info.name, float(rel.max()), float((a - b).abs().max())))
    return rows


# -- non-interference ---------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.double(), b.double()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    return (diff / scale if scale > 0 else diff), diff


def module_state(model: nn.Module) -> dict:
    """Everything attaching an engine could leave behind."""
    state = {}
    for name, m in model.named_modules():
        state[name] = (
            tuple(sorted(m.__dict__.keys())),
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(getattr(m, "_backward_pre_hooks", {})),
        )
    state["__params__"] = tuple((n, p.requires_grad, p.grad is None) for n, p in model.named_parameters())
    state["__state_dict__"] = tuple(model.state_dict().keys())
    return state


def _training_step(model: nn.Module, opt, batch, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on the batch's mean loss; (loss, logits, flat gradient)."""
    torch.manual_seed(seed)  # the same dropout masks in both copies
    opt.zero_grad(set_to_none=True)
    logits = model(**batch.model_inputs()).logits
    losses, _ = causal_lm_losses(logits, batch.labels, "mean")
    loss = losses.mean()
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    opt.step()
    return loss.detach(), logits.detach(), grads


def non_interference(
    model: nn.Module,
    batches: list[list[Example]],
    layers: list[str] | None,
    steps: int = 3,
    lr: float = 1e-3,
    optimizer: str = "adamw",
    pad_id: int = 0,
    **engine_kwargs,
) -> tuple[list[Discrepancy], list[str]]:
    """Train two identical copies for ``steps`` steps, one with the engine attached in
    observe mode, and compare losses, logits, gradients and parameters. Returns the
    comparisons and a list of problems with detaching (empty when clean)."""
    device = next(model.parameters()).device
    plain = copy.deepcopy(model)
    watched = copy.deepcopy(model)
    results: dict[str, list[tuple[float, float]]] = {"loss": [], "logits": [], "grad": [], "params": []}

    def make_opt(m):
        params = [p for p in m.parameters() if p.requires_grad]
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
        return torch.optim.AdamW(params, lr=lr)

    before = module_state(watched)
    engine = GradProjectionEngine(watched, layers, freeze_weights=False, **engine_kwargs)
    engine.attach()
    opt_plain, opt_watched = make_opt(plain), make_opt(watched)
    plain.train()
    watched.train()
    for step in range(steps):
        batch = collate(batches[step % len(batches)], pad_id).to(device)
        outs = [_training_step(m, opt, batch, seed=1000 + step) for m, opt in ((plain, opt_plain), (watched, opt_watched))]
        engine.collect()
        (l0, z0, g0), (l1, z1, g1) = outs
        results["loss"].append(_rel(l1, l0))
        results["logits"].append(_rel(z1, z0))
        results["grad"].append(_rel(g1, g0))
        p0 = torch.cat([p.detach().reshape(-1) for p in plain.parameters()])
        p1 = torch.cat([p.detach().reshape(-1) for p in watched.parameters()])
        results["params"].append(_rel(p1, p0))
    engine.detach()
    for p in watched.parameters():
        p.grad = None
    problems = []
    after = module_state(watched)
    for key in before:
        if before[key] != after.get(key):
            problems.append(f"module '{key or '<root>'}' differs after detach")
    comps = [Discrepancy(k, max(r for r, _ in v), max(a for _, a in v)) for k, v in results.items()]
    return comps, problems


# -- command-level checks -------------------------------------------------------------------
@dataclass
class NaiveCheckResult:
    errors: list[Discrepancy]
    tolerance: float
    n_examples: int
    min_len: int
    max_len: int

    @property
    def ok(self) -> bool:
        return all(e.max_rel <= self.tolerance for e in self.errors)


SIXTEEN_BIT_TOLERANCE = 2e-2


@dataclass
class NaiveCheckOptions(CheckSource):
    """Options of ``ghostproj naive-check``."""

    dtype: str = "float32"
    adapter: str | None = None
    samples: int = 8
    max_length: int = 512
    layers: list[str] | None = None
    include_embeddings: bool = False
    rank: int = defaults.RANK
    projector: str = defaults.PROJECTOR
    seed: int = 0
    loss_reduction: str = defaults.LOSS_REDUCTION
    bias: bool = False
    tolerance: float | None = None  # None: 1e-4, or SIXTEEN_BIT_TOLERANCE for 16-bit models
    factors: str | None = None
    gradient_checkpointing: bool = False  # the engine under recomputation, as project --gradient-checkpointing
    device: str = "auto"


@dataclass
class NonInterferenceOptions(CheckSource):
    """Options of ``ghostproj non-interf``."""

    max_length: int = 128
    layers: list[str] | None = None
    steps: int = 3
    batch_size: int = 4
    lr: float = 1e-3
    optimizer: str = "adamw"
    tolerance: float = 1e-6
    device: str = "auto"

    def __post_init__(self):
        if self.steps < 1:
            raise GhostprojError(f"--steps must be at least 1, got {self.steps}.")
        if self.optimizer not in ("adamw", "sgd"):
            raise GhostprojError(f"Unknown --optimizer '{self.optimizer}'; choose adamw or sgd.")


def run_naive_check(opts: NaiveCheckOptions) -> NaiveCheckResult:
    """The engine against the naive reference on a padded batch of the data's examples
    (``factors``: in the Kronecker eigenbasis of that file, as `project --factors` uses it)."""
    model_path, data_path, layers, samples, rank = opts.model, opts.data, opts.layers, opts.samples, opts.rank
    projector, seed, loss_reduction, bias, max_length = (opts.projector, opts.seed, opts.loss_reduction, opts.bias,
                                                          opts.max_length)
    dtype, device, tolerance, adapter = opts.dtype, opts.device, opts.tolerance, opts.adapter
    include_embeddings, factors, fields = opts.include_embeddings, opts.factors, opts.fields
    from ..engines.layers import ADAPTER_LAYERS
    from ..models import enable_gradient_checkpointing, pad_token_id
    from ..store.factors_file import load_factors

    if factors is not None and (adapter or bias or include_embeddings):
        raise GhostprojError("--factors cannot be combined with --adapter, --bias or --include-embeddings: "
                             "factors cover each Linear / Conv1D layer's own weight.")
    loaded = load_factors(factors, sums=False) if factors is not None else None  # a bad file before the model load
    model, tokenizer, data = load_model_and_data(model_path, data_path, dtype, device, max_length, adapter, **fields)
    examples = pick_mixed_lengths(data.examples, samples)
    if opts.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if layers is None and adapter:
        layers = [ADAPTER_LAYERS]
    if loaded is not None:
        engine = factors_engine(model, layers, loaded, rank=rank)
    else:
        engine = GradProjectionEngine(model, layers, rank=rank, projector=projector, seed=seed, bias=bias,
                                      include_embeddings=include_embeddings)
    got = engine_projected_grads(model, examples, engine, loss_reduction, pad_token_id(tokenizer))
    ref = naive_projected_grads(model, examples, engine, loss_reduction)
    if tolerance is None:
        # 16-bit: the naive reference's own weight gradients are rounded to the model's
        # dtype (README, "Models": 4x the largest error measured)
        tolerance = 1e-4 if dtype == "float32" else SIXTEEN_BIT_TOLERANCE
    lengths = [len(e.input_ids) for e in examples]
    return NaiveCheckResult(compare_per_layer(got, ref, engine.layers), tolerance, len(examples),
                            min(lengths), max(lengths))


@dataclass
class NonInterferenceResult:
    comparisons: list[Discrepancy]
    problems: list[str]


def detach_problems(model: nn.Module, batch_examples: list[Example], layers: list[str] | None, pad_id: int = 0,
                    **engine_kwargs) -> list[str]:
    """Attach a projection-mode engine, run one backward pass, detach, and list what differs."""
    before = module_state(model)
    engine = GradProjectionEngine(model, layers, **engine_kwargs)
    device = next(model.parameters()).device
    batch = collate(batch_examples, pad_id).to(device)
    with engine:
        losses, _ = causal_lm_losses(model(**batch.model_inputs()).logits, batch.labels)
        losses.sum().backward()
        engine.collect()
    after = module_state(model)
    return [f"module '{k or '<root>'}' differs after detach (projection mode)" for k in before if before[k] != after.get(k)]


def run_non_interference(opts: NonInterferenceOptions) -> NonInterferenceResult:
    from ..data.batching import fixed_size_batches
    from ..models import pad_token_id

    layers, steps, batch_size, lr, optimizer = opts.layers, opts.steps, opts.batch_size, opts.lr, opts.optimizer
    model, tokenizer, data = load_model_and_data(opts.model, opts.data, "float32", opts.device, opts.max_length,
                                                 **opts.fields)
    examples = [e for e in data.examples if e.n_label_positions > 0]
    if not examples:
        raise GhostprojError("No example in the data has a label position to train on.")
    batches = list(fixed_size_batches(examples[: batch_size * steps], batch_size))
    pad = pad_token_id(tokenizer)
    comps, problems = non_interference(model, batches, layers, steps=steps, lr=lr, optimizer=optimizer, pad_id=pad)
    problems += detach_problems(model, batches[0], layers, pad)
    return NonInterferenceResult(comps, problems)
