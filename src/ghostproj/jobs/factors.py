"""The factors job: model + training data -> each layer's Kronecker factors, for
`project --factors` (projection in the Kronecker eigenbasis, scored with EK-FAC weights)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..data.batching import collate, fixed_size_batches, token_budget_batches
from ..engines.factors import FactorCollector, decompose
from ..engines.losses import LOSS_REDUCTIONS, causal_lm_losses
from ..errors import GhostprojError
from ..models import pad_token_id
from ..progress import RateProgress
from ..store.factors_file import FactorTotals, factors_identity, load_factors, save_factors
from ..store.outputs import check_outputs
from .project import InputFields, load_inputs


@dataclass
class FactorsOptions(InputFields):
    """Options of ``ghostproj factors``: the data and layer options of ``project``."""

    out: str = "factors.safetensors"
    layers: list[str] | None = None
    loss_reduction: str = "mean"
    batch_size: int = 8
    token_budget: int | None = None
    num_shards: int = 1  # job arrays: split the examples into this many parts ...
    shard_id: int = 0  # ... and sum this one (then factors --merge)
    overwrite: bool = False
    show_progress: bool = True


@dataclass
class FactorsSummary:
    out: str
    examples: int = 0
    positions: int = 0
    layers: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def run_factors(opts: FactorsOptions, summary: FactorsSummary | None = None) -> FactorsSummary:
    t0 = time.perf_counter()
    summary = summary if summary is not None else FactorsSummary(out=opts.out)
    if opts.model is None or opts.data is None:
        raise GhostprojError("factors needs a model and data.")
    check_outputs([(opts.out, "--out")], [opts.data, opts.model, opts.adapter], opts.overwrite)
    if opts.loss_reduction not in LOSS_REDUCTIONS:
        raise GhostprojError(f"Unknown --loss-reduction '{opts.loss_reduction}'; choose mean or sum.")
    if opts.batch_size < 1 or (opts.token_budget is not None and opts.token_budget < 1):
        raise GhostprojError("--batch-size and --token-budget must be at least 1.")
    if opts.num_shards < 1 or not 0 <= opts.shard_id < opts.num_shards:
        raise GhostprojError(f"--shard-id must be in 0..{opts.num_shards - 1} for --num-shards {opts.num_shards}.")
    if opts.adapter:
        raise GhostprojError("factors does not take --adapter: Kronecker factors cover a model's own Linear and "
                             "Conv1D layers.")
    inputs = load_inputs(opts, summary)
    collector = FactorCollector(inputs.model, opts.layers)
    _collect(collector, inputs, inputs.data.examples[opts.shard_id::opts.num_shards], opts)
    names = list(collector.factors)
    dims = {n: (f.n_in, f.n_out) for n, f in collector.factors.items()}
    record = {
        "identity": factors_identity(inputs.model, names, dims),
        "model": {"path": opts.model, "class": type(inputs.model).__name__, "dtype": opts.dtype},
        "data": {**inputs.spec.describe(), "sha256": inputs.data.sha256, "count": len(inputs.data.examples),
                 "max_length": inputs.max_length},
        "loss_reduction": opts.loss_reduction,
    }
    if opts.num_shards > 1:
        record["part"] = {"shard_id": opts.shard_id, "num_shards": opts.num_shards}
    totals = FactorTotals(dict(collector.factors), collector.examples)
    if opts.num_shards == 1:  # once here, not in every project --factors (a part's sums are merged first)
        decompose(totals.layers, inputs.device)
    save_factors(opts.out, totals, record)
    summary.examples, summary.layers = totals.examples, len(names)
    summary.positions = sum(f.positions for f in totals.layers.values()) // max(len(names), 1)
    summary.seconds = time.perf_counter() - t0
    return summary


def _collect(collector: FactorCollector, inputs, subset: list, opts: FactorsOptions) -> None:
    """One pass over ``subset`` in ``project``'s batches, its per-example losses summed."""
    batches = list(token_budget_batches(subset, opts.token_budget) if opts.token_budget is not None
                   else fixed_size_batches(subset, opts.batch_size))
    pad = pad_token_id(inputs.tokenizer)
    with RateProgress("factors", total=len(subset), enabled=opts.show_progress) as bar, collector:
        for batch in batches:
            live = [e for e in batch if e.n_label_positions > 0]
            if live:
                b = collate(live, pad).to(inputs.device)
                collector.begin(b.attention_mask, len(batch))
                logits = inputs.model(**b.model_inputs()).logits
                losses, _ = causal_lm_losses(logits, b.labels, opts.loss_reduction)
                losses.sum().backward()
            else:
                collector.begin(None, len(batch))  # zero gradients: counted, nothing to add
            bar.advance(len(batch), sum(e.n_label_positions for e in batch))


def merge_factors(out: str, parts: list[str], overwrite: bool) -> FactorTotals:
    """Sum the factors of job-array parts into one file: exactly one process's sums."""
    check_outputs([(out, "OUT")], parts, overwrite)
    loaded = [load_factors(p) for p in parts]
    first = loaded[0][1]
    k = (first.get("part") or {}).get("num_shards", 1)
    seen = set()
    for path, (_, rec) in zip(parts, loaded):
        same = {key: rec.get(key) for key in ("identity", "loss_reduction")} == \
               {key: first.get(key) for key in ("identity", "loss_reduction")}
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
