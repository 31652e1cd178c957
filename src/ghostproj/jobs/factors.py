"""The factors job: model + training data -> each layer's Kronecker factors, for
`project --factors` (projection in the Kronecker eigenbasis, scored with EK-FAC weights).

A run's batches come in a fixed order and its sums only grow, so a run checkpoints its
running sums (``OUT.partial``, one per torchrun rank) and a rerun of the same command
continues after the last batch they hold: the float64 sums are added in the same order,
so the file equals a clean run's byte for byte. Under torchrun each rank sums its share
and rank 0 writes the reduced sums."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import defaults
from ..data.batching import collate, fixed_size_batches, token_budget_batches
from ..distributed import distributed_rank, fillers_after, load_sharded, whole_weights
from ..engines.coverage import coverage_notes, layer_parameters, model_coverage
from ..engines.factors import FactorCollector, decompose
from ..engines.layer_types import projectable_type
from ..engines.layers import select_layers
from ..engines.losses import IGNORE_INDEX, LOSS_REDUCTIONS, causal_lm_losses
from ..errors import GhostprojError
from ..inputs import InputFields, load_inputs
from ..models import pad_token_id
from ..progress import RateProgress
from ..store.factors_file import (
    FactorTotals,
    factors_identity,
    join_factors,
    load_factors,
    read_factors_record,
    save_factors,
)
from ..store.fingerprint import fingerprint
from ..store.lock import RunLock
from ..store.outputs import check_outputs

FISHER_LABELS = ("empirical", "sampled")


@dataclass
class FactorsOptions(InputFields):
    """Options of ``ghostproj factors``: the data and layer options of ``project``."""

    out: str = "factors.safetensors"
    layers: list[str] | None = None
    loss_reduction: str = defaults.LOSS_REDUCTION
    fisher_labels: str = "empirical"  # the data's own labels, or labels sampled from the model (true Fisher)
    seed: int = 0  # of the sampled labels
    batch_size: int = 8
    token_budget: int | None = None
    num_shards: int = 1  # job arrays: split the examples into this many parts ...
    shard_id: int = 0  # ... and sum this one (then factors --merge)
    checkpoint_minutes: float = 10.0  # how often the running sums are saved for a resume (0: every batch)
    memory_gb: float = 8.0  # host memory for one pass's float64 sums; more layers take more passes
    fsdp: bool = False  # under torchrun: shard the weights across the ranks (FSDP2), each rank its own rows
    overwrite: bool = False
    show_progress: bool = True

    def __post_init__(self):
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise GhostprojError(f"Unknown --loss-reduction '{self.loss_reduction}'; choose mean or sum.")
        if self.fisher_labels not in FISHER_LABELS:
            raise GhostprojError(f"Unknown --fisher-labels '{self.fisher_labels}'; choose empirical or sampled.")
        if self.batch_size < 1 or (self.token_budget is not None and self.token_budget < 1):
            raise GhostprojError("--batch-size and --token-budget must be at least 1.")
        if self.num_shards < 1 or not 0 <= self.shard_id < self.num_shards:
            raise GhostprojError(f"--shard-id must be in 0..{self.num_shards - 1} for --num-shards "
                                 f"{self.num_shards}.")
        if self.checkpoint_minutes < 0:
            raise GhostprojError("--checkpoint-minutes must be 0 (every batch) or more.")
        if not self.memory_gb > 0:
            raise GhostprojError(f"--memory-gb must be positive, got {self.memory_gb}.")


@dataclass
class FactorsSummary:
    out: str
    examples: int = 0
    positions: int = 0
    layers: int = 0
    seconds: float = 0.0
    resumed_batches: int = 0
    coverage: str = ""  # what share of the model the layers hold, in words
    notes: list[str] = field(default_factory=list)


def partial_path(out: str | Path, rank: int | None = None) -> Path:
    """Where a run keeps its running sums until it finishes (per rank under torchrun)."""
    out = Path(out)
    return out.with_name(out.name + (".partial" if rank is None else f".partial-r{rank:03d}"))


def run_factors(opts: FactorsOptions, summary: FactorsSummary | None = None) -> FactorsSummary:
    t0 = time.perf_counter()
    summary = summary if summary is not None else FactorsSummary(out=opts.out)
    if opts.model is None or opts.data is None:
        raise GhostprojError("factors needs a model and data.")
    check_outputs([(opts.out, "--out")], [opts.data, opts.model, opts.adapter], opts.overwrite)
    if opts.adapter:
        raise GhostprojError("factors does not take --adapter: Kronecker factors cover a model's own Linear and "
                             "Conv1D layers.")
    inputs = load_inputs(opts, summary, meta=opts.fsdp)  # sharded, the weights are loaded below
    if opts.fsdp:
        load_sharded(inputs.model, opts.model, opts.dtype, opts.revision, inputs.device)
    dims = factor_layers(inputs.model, opts.layers)
    names = list(dims)
    modules = dict(inputs.model.named_modules())
    coverage = model_coverage(inputs.model, layer_parameters({n: modules[n] for n in names}, bias=False))
    summary.coverage = coverage.describe()
    summary.notes += coverage_notes(coverage)
    dist = distributed_rank(inputs.device)
    rank, world = dist or (0, 1)
    subset = inputs.data.examples[opts.shard_id::opts.num_shards][rank::world]
    batches = list(token_budget_batches(subset, opts.token_budget) if opts.token_budget is not None
                   else fixed_size_batches(subset, opts.batch_size))
    record = {
        "identity": factors_identity(whole_weights(inputs.model, names, lambda n: [(n + ".weight", modules[n].weight)]),
                                     names, dims),
        "model": {"path": opts.model, "class": type(inputs.model).__name__, "dtype": opts.dtype},
        "data": {**inputs.spec.describe(), "sha256": inputs.data.sha256, "count": len(inputs.data.examples),
                 "max_length": inputs.max_length},
        "loss_reduction": opts.loss_reduction,
    }
    if opts.fisher_labels != "empirical":  # kept out of older files' record, so their fingerprints stay
        record["fisher_labels"] = {"kind": opts.fisher_labels, "seed": opts.seed}
    if opts.num_shards > 1:
        record["part"] = {"shard_id": opts.shard_id, "num_shards": opts.num_shards}
    groups = layer_groups(dims, opts.memory_gb * 2**30)
    if len(groups) > 1:
        summary.notes.append(f"the float64 sums of {len(names)} layers exceed --memory-gb {opts.memory_gb:g}: "
                             f"{len(groups)} passes over the data, one per group of layers.")
    out = Path(opts.out)
    run = _Pass(inputs, batches, opts, record, _resume_key(record, opts, rank, world), dist, rank, world, summary)
    with RunLock(out.parent, rank if world > 1 else None, name=f".{out.name}.lock"):
        if len(groups) == 1:
            totals = run.sums(names, partial_path(out, rank if world > 1 else None))
            if rank == 0:
                save_factors(out, totals, record)
        else:
            totals = _grouped(run, groups, out)
        if dist is not None:
            import torch.distributed as td

            td.barrier()  # the file is written before any rank lets go of its checkpoints
        partial_path(out, rank if world > 1 else None).unlink(missing_ok=True)
    summary.examples, summary.layers = totals.examples, len(names)
    summary.positions = sum(len(e.input_ids) for e in inputs.data.examples[opts.shard_id::opts.num_shards]
                            if e.n_label_positions > 0)  # every layer sums over these
    summary.seconds = time.perf_counter() - t0
    return summary


def factor_layers(model, layers: list[str] | None) -> dict[str, tuple[int, int]]:
    """(n_in, n_out) of each layer factors are taken for, refused where a type has none."""
    dims = {}
    for name, module in select_layers(model, layers):
        kind = projectable_type(module)
        if not kind.kronecker_factors:
            raise GhostprojError(f"Layer '{name}' is a {kind.type_name} layer; Kronecker factors cover Linear and "
                                 "Conv1D layers (leave it out of --layers).")
        dims[name] = kind.dims(module)
    return dims


def layer_groups(dims: dict[str, tuple[int, int]], budget: float) -> list[list[str]]:
    """Consecutive layers whose float64 sums (8 (n_in^2 + n_out^2) bytes each) fit ``budget``
    together; a layer larger than it is a group of its own."""
    groups, size = [[]], 0
    for name, (n_in, n_out) in dims.items():
        need = 8 * (n_in * n_in + n_out * n_out)
        if groups[-1] and size + need > budget:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += need
    return groups


@dataclass
class _Pass:
    """One pass over the data for a set of layers: their sums, resumed from and saved to a
    checkpoint, summed over ranks, decomposed (rank 0 only)."""

    inputs: object
    batches: list
    opts: FactorsOptions
    record: dict
    key: str
    dist: tuple | None
    rank: int
    world: int
    summary: FactorsSummary

    def sums(self, names: list[str], partial: Path) -> FactorTotals:
        collector = FactorCollector(self.inputs.model, ["re:^" + re.escape(n) + "$" for n in names])
        start = _resume(collector, partial, self.key, self.summary)
        _collect(collector, self.inputs, self.batches, start, self.opts, partial, self.record, self.key)
        totals = FactorTotals(dict(collector.factors), collector.examples)
        if self.dist is not None:
            _reduce(totals, self.inputs.device)
        if self.rank == 0 and self.opts.num_shards == 1:  # a part's sums are decomposed once merged
            decompose(totals.layers, self.inputs.device)
        return totals


def _grouped(run: _Pass, groups: list[list[str]], out: Path) -> FactorTotals:
    """Each group's factors in a file of its own (kept across a crash, like a checkpoint),
    then joined into ``out`` one tensor at a time."""
    import torch.distributed as td

    files, totals = [], FactorTotals()
    rank_tag = f"-r{run.rank:03d}" if run.world > 1 else ""
    for g, names in enumerate(groups):
        file = out.with_name(f"{out.name}.group-{g:03d}")
        files.append(file)
        partial = out.with_name(f"{out.name}.partial-g{g:03d}{rank_tag}")
        done = file.exists() and read_factors_record(file).get("resume", {}) == {"key": run.key, "group": g}
        if not done:
            part = run.sums(names, partial)
            if run.rank == 0:
                save_factors(file, part, dict(run.record, resume={"key": run.key, "group": g}))
        partial.unlink(missing_ok=True)  # the group's file holds its sums now (also after a crash right then)
        if run.dist is not None:
            td.barrier()  # the group's file is there before any rank looks for the next
        rec = read_factors_record(file)
        totals.examples = rec["examples"]
    if run.rank == 0:
        join_factors(out, files, run.record)
        for file in files:
            file.unlink(missing_ok=True)
    return totals


def _resume_key(record: dict, opts: FactorsOptions, rank: int, world: int) -> str:
    """What a checkpoint's sums depend on: everything that decides the batches and their
    gradients. A checkpoint with another key is of another run and is started over."""
    batching = {"batch_size": opts.batch_size, "token_budget": opts.token_budget, "rank": rank, "world": world}
    return fingerprint({"record": str(sorted(record.items())), "batching": str(batching)})


def _resume(collector: FactorCollector, partial: Path, key: str, summary: FactorsSummary) -> int:
    """Take over a checkpoint's sums; returns the number of batches they hold."""
    if not partial.exists():
        return 0
    try:
        totals, rec = load_factors(partial, checkpoint=True)
    except GhostprojError:
        summary.notes.append(f"{partial} is damaged; starting over.")
        return 0
    if (rec.get("resume") or {}).get("key") != key or set(totals.layers) != set(collector.factors):
        summary.notes.append(f"{partial} holds the sums of another factors run (other model, data or options); "
                             "starting over.")
        return 0
    collector.factors, collector.examples = dict(totals.layers), totals.examples
    summary.resumed_batches = int(rec["resume"]["batches"])
    summary.notes.append(f"resumed after {summary.resumed_batches} batches ({totals.examples} examples) from "
                         f"{partial}.")
    return summary.resumed_batches


def _collect(collector: FactorCollector, inputs, batches: list, start: int, opts: FactorsOptions,
             partial: Path, record: dict, key: str) -> None:
    """One pass over ``batches[start:]``, its per-example losses summed, the running sums
    saved to ``partial`` every --checkpoint-minutes."""
    pad = pad_token_id(inputs.tokenizer)
    every = opts.checkpoint_minutes * 60
    saved_at = time.monotonic()
    total = sum(len(b) for b in batches)
    # A sharded model (--fsdp) gathers each unit's weights with every rank in every forward
    # and backward, so no rank may skip one: a batch without label positions runs a filler
    # that adds nothing, and a rank with fewer batches runs fillers after its own.
    filler = next((e for e in inputs.data.examples if e.n_label_positions > 0), None) if opts.fsdp else None
    fillers = fillers_after(len(batches) - start) if opts.fsdp else 0
    with RateProgress("factors", total=total, enabled=opts.show_progress) as bar, collector:
        bar.advance(sum(len(b) for b in batches[:start]), 0)
        for i in range(start, len(batches)):
            batch = batches[i]
            live = [e for e in batch if e.n_label_positions > 0]
            if not live and filler is not None:
                _run_filler(collector, inputs, filler, pad)
            if live:
                b = collate(live, pad).to(inputs.device)
                collector.begin(b.attention_mask, len(batch))
                logits = inputs.model(**b.model_inputs()).logits
                labels = b.labels
                if opts.fisher_labels == "sampled":
                    labels = sampled_labels(logits, labels, torch.Generator().manual_seed(opts.seed * 1_000_003 + i))
                losses, _ = causal_lm_losses(logits, labels, opts.loss_reduction)
                losses.sum().backward()
            else:
                collector.begin(None, len(batch))  # zero gradients: counted, nothing to add
            bar.advance(len(batch), sum(e.n_label_positions for e in batch))
            if i + 1 < len(batches) and time.monotonic() - saved_at >= every:
                save_factors(partial, FactorTotals(collector.factors, collector.examples),
                             dict(record, resume={"key": key, "batches": i + 1}))
                saved_at = time.monotonic()
        for _ in range(fillers if filler is not None else 0):  # no labels anywhere: no rank ran a forward
            _run_filler(collector, inputs, filler, pad)


def _run_filler(collector: FactorCollector, inputs, example, pad: int) -> None:
    """A forward and backward that every rank of a sharded model must join, masked out of
    every sum and counted as no example."""
    b = collate([example], pad).to(inputs.device)
    collector.begin(torch.zeros_like(b.attention_mask), 0)
    logits = inputs.model(**b.model_inputs()).logits
    causal_lm_losses(logits, b.labels, "sum")[0].sum().backward()


def sampled_labels(logits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn from the model's own predictions at each label position (the true
    Fisher's), the others left ignored. Drawn on the CPU, so a seed gives the same labels
    on every device."""
    out = labels.clone()
    keep = labels[:, 1:] != IGNORE_INDEX
    probs = torch.softmax(logits[:, :-1][keep].detach().float(), dim=-1).cpu()
    drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1) if probs.shape[0] else probs.new_zeros(0)
    out[:, 1:][keep] = drawn.to(device=labels.device, dtype=labels.dtype)
    return out


def _reduce(totals: FactorTotals, device: torch.device) -> None:
    """Sum every rank's factors into each rank's (nccl reduces on the GPU, gloo on the CPU)."""
    import torch.distributed as td

    where = device if device.type == "cuda" else torch.device("cpu")
    for f in totals.layers.values():
        for name in ("a", "g"):
            t = getattr(f, name).to(where)
            td.all_reduce(t)
            setattr(f, name, t.cpu())
        stats = torch.tensor([float(f.positions), f.sq_norms], dtype=torch.float64, device=where)
        td.all_reduce(stats)
        f.positions, f.sq_norms = int(stats[0]), float(stats[1])
    count = torch.tensor([totals.examples], dtype=torch.float64, device=where)
    td.all_reduce(count)
    totals.examples = int(count[0])


def merge_factors(out: str, parts: list[str], overwrite: bool) -> FactorTotals:
    """Sum the factors of job-array parts into one file: exactly one process's sums."""
    check_outputs([(out, "OUT")], parts, overwrite)
    loaded = [load_factors(p) for p in parts]
    first = loaded[0][1]
    k = (first.get("part") or {}).get("num_shards", 1)
    seen = set()
    same_keys = ("identity", "loss_reduction", "fisher_labels")
    for path, (_, rec) in zip(parts, loaded):
        same = {key: rec.get(key) for key in same_keys} == {key: first.get(key) for key in same_keys}
        if not same or rec.get("data", {}).get("sha256") != first.get("data", {}).get("sha256"):
            raise GhostprojError(f"{path} holds factors of another model, layers, loss or data than {parts[0]}.")
        part = rec.get("part") or {"shard_id": 0, "num_shards": 1}
        if part["num_shards"] != k or part["shard_id"] in seen:
            raise GhostprojError(f"{path} is not another part of the same split (each of the {k} parts once).")
        seen.add(part["shard_id"])
    if seen != set(range(k)):
        raise GhostprojError(f"Parts {', '.join(map(str, sorted(set(range(k)) - seen)))} of {k} are missing.")
    totals = loaded[0][0]
    for other, _ in loaded[1:]:
        for name, f in totals.layers.items():
            f.add(other.layers[name])
        totals.examples += other.examples
    record = {key: v for key, v in first.items() if key not in ("part", "format", "examples", "layers")}
    decompose(totals.layers)
    save_factors(out, totals, record)
    return totals
