"""``project --dry-run``: what a projection would take, before any weight is read. The
model is built from its config on the meta device, the data is read and batched as the
run would batch it, and one step of the largest batch is traced on the meta device for
its activation and engine memory, with and without gradient checkpointing."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from ..data.batching import Batch, Example, collate
from ..engines.coverage import engine_coverage
from ..engines.experts import FusedExpertsLayer
from ..engines.losses import causal_lm_losses
from ..errors import GhostprojError
from ..inputs import load_inputs
from ..memory_trace import MemoryTrace, give_value, tracing, with_value
from ..models import enable_gradient_checkpointing, pad_token_id
from ..store.manifest import STORE_DTYPES
from ..store.projector_file import encode_projectors
from .project import ProjectOptions, ProjectSummary, build_engine, run_values
from .resume import RunPlan

SHARD_ROW_EXTRA = 8 + 4 + 4  # a stored row's index (int64), loss (float32) and label count (int32)
SHARD_HEADER = 512  # a shard's safetensors header, rounded up
FSDP_RANKS = 8  # the FSDP estimate's world size when not under torchrun: one 8-GPU node


@dataclass
class MemoryEstimate:
    """Bytes one device holds at the peak of the largest batch's step."""

    setting: str
    parameters: int
    activations: int
    engine: int

    @property
    def total(self) -> int:
        return self.parameters + self.activations + self.engine


@dataclass
class DryRunReport:
    model: str
    parameters: int  # elements
    layers: int
    dim: int
    coverage: str
    examples: int
    tokens: int  # label positions
    batch: tuple[int, int]  # (examples, padded length) of the batch traced
    store_bytes: int
    store_dtype: str
    estimates: list[MemoryEstimate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def run_dry_run(opts: ProjectOptions) -> DryRunReport:
    """The layers, coverage, D, store size and per-device memory of ``opts``' run; reads
    the config, tokenizer and data, and writes nothing."""
    for flag, given in (("--like", opts.like), ("--factors", opts.factors), ("--adapter", opts.adapter),
                        ("--optimizer-state", opts.optimizer_state), ("--compile", opts.compile)):
        if given:
            raise GhostprojError(f"--dry-run estimates an eager projection of the model's own layers; drop {flag}.")
    _, values = run_values(opts)
    summary = ProjectSummary(out=opts.out)
    inputs = load_inputs(opts, summary, meta=True)
    model, examples = inputs.model, inputs.data.examples
    if any(FusedExpertsLayer.matches(m) for m in model.modules()) and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # the math the projection runs, with no fused kernel
    engine = build_engine(model, opts, values, None)
    plan = RunPlan(examples, opts.batch_size, opts.token_budget, opts.shard_size, 0)
    batch = _largest_batch(plan.batches)
    report = DryRunReport(
        model=type(model).__name__, parameters=sum(p.numel() for p in model.parameters()),
        layers=len(engine.layers), dim=engine.dim, coverage=engine_coverage(model, engine).describe(),
        examples=len(examples), tokens=sum(e.n_label_positions for e in examples),
        batch=(len(batch), max(len(e.input_ids) for e in batch)) if batch else (0, 0),
        store_bytes=_store_bytes(engine, len(examples), opts), store_dtype=opts.store_dtype, notes=summary.notes)
    if not batch:
        report.notes.append("No example has a label position: there is no step to estimate.")
        return report
    pad, reduction = pad_token_id(inputs.tokenizer), values["loss_reduction"]
    steps = {"": _traced_step(model, engine, batch, reduction, pad)}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    world = world if world > 1 else FSDP_RANKS
    weights = {"plain": _parameter_bytes(model), f"--fsdp over {world} ranks": _fsdp_parameter_bytes(model, world)}
    try:
        enable_gradient_checkpointing(model)
        steps[" + --gradient-checkpointing"] = _traced_step(model, engine, batch, reduction, pad)
    except GhostprojError as exc:  # a model HF cannot checkpoint: its estimate is left out, and why
        report.notes.append(str(exc))
    if weights[f"--fsdp over {world} ranks"] is None:
        del weights[f"--fsdp over {world} ranks"]
        report.notes.append(f"{report.model} has no decoder layers FSDP could shard one by one: no --fsdp estimate.")
    for setting, held in weights.items():
        for extra, (activations, engine_bytes) in steps.items():
            name = (setting + extra).removeprefix("plain + ")
            report.estimates.append(MemoryEstimate(name, held, activations, engine_bytes))
    return report


def _largest_batch(batches: list[list[Example]]) -> list[Example]:
    """The batch with the most padded tokens (the longest on a tie): the step's peak."""
    live = [[e for e in b if e.n_label_positions > 0] for b in batches]
    live = [b for b in live if b]
    return max(live, key=lambda b: (len(b) * max(len(e.input_ids) for e in b), max(len(e.input_ids) for e in b)),
               default=[])


def _traced_step(model, engine, batch: list[Example], reduction: str, pad: int) -> tuple[int, int]:
    """(activation bytes, engine bytes) at the peak of one step over ``batch``: the step
    without the engine (gradients through the activations only, the least any projection
    needs) and the engine's addition to it."""
    weights = list(model.parameters()) + list(model.buffers())
    cpu = collate(batch, pad)
    inputs = Batch(*(with_value(t) for t in (cpu.index, cpu.input_ids, cpu.attention_mask, cpu.position_ids,
                                             cpu.labels)))
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    trace = MemoryTrace(weights)
    routing = [m.register_forward_pre_hook(_balanced_routing) for m in model.modules() if FusedExpertsLayer.matches(m)]
    try:
        with tracing(trace):
            _step(model, inputs, reduction)
        floor = trace.peak
        hook.remove()
        trace.reset_peak()
        with tracing(trace), engine:
            engine.prepare(len(batch), torch.device("meta"))
            _step(model, inputs, reduction)
            engine.collect()
    finally:
        for h in [hook, *routing]:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    activations = min(floor, trace.peak)  # the engine's step may peak lower: it keeps less of some layers
    return activations, trace.peak - activations


def _balanced_routing(module, args) -> None:
    """The tokens' experts, which the weights decide, as a perfectly balanced router would
    choose them: token t's j-th choice is expert (t * k + j) mod E."""
    index = args[1]
    tokens, k = index.shape
    give_value(index, (torch.arange(tokens * k) % module.gate_up_proj.shape[0]).view(tokens, k))


def _step(model, inputs, reduction: str) -> None:
    logits = model(**inputs.model_inputs()).logits
    per_example, _ = causal_lm_losses(logits, inputs.labels, reduction)
    per_example.sum().backward()


def _parameter_bytes(model) -> int:
    """Weights and buffers, a tied weight once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _fsdp_parameter_bytes(model, world: int) -> int | None:
    """The most weight bytes a rank holds under --fsdp: its shard of every weight, the root
    unit (embeddings, head, final norm) gathered for the whole step, and two decoder layers
    gathered at once (the one running and the one prefetched). None: FSDP has no units."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        return None
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    total = _parameter_bytes(model)
    root = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_layers)
    largest = max(sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers)
    return math.ceil(total / world) + root + 2 * largest


def _store_bytes(engine, rows: int, opts: ProjectOptions) -> int:
    """The run directory's size: the shards and the projector file."""
    shards = math.ceil(rows / opts.shard_size)
    row = engine.dim * STORE_DTYPES[opts.store_dtype].itemsize + SHARD_ROW_EXTRA
    return rows * row + shards * SHARD_HEADER + len(encode_projectors(engine.projectors, {}))

