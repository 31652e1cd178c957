"""The projection job: model + data -> a run directory of projected per-example gradients."""

from __future__ import annotations

import datetime as _dt
import errno
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import defaults
from ..data.batching import Example
from ..distributed import (
    distributed_rank,
    finish_distributed,
    load_sharded,
    regroup_after_rank_change,
    sync_start,
)
from ..engines.coverage import coverage_notes, engine_coverage
from ..engines.factors import EIGEN, factors_engine
from ..engines.layers import ADAPTER_LAYERS, layer_owners
from ..engines.losses import LOSS_REDUCTIONS
from ..engines.projection import GradProjectionEngine
from ..engines.projector import PROJECTOR_KINDS, LayerProjector, projector_hash
from ..errors import GhostprojError
from ..inputs import InputFields, LoadedInputs, load_inputs
from ..models import enable_gradient_checkpointing
from ..progress import RateProgress
from ..store.factors_file import FactorTotals, load_factors
from ..store.files import atomic_write
from ..store.fingerprint import (
    fingerprint_parts,
    sha256_hex,
)
from ..store.lock import RunLock
from ..store.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    PROJECTOR_FILE,
    SHARD_RE,
    STORE_DTYPES,
    Manifest,
    rank_manifest_name,
    read_manifest,
    write_manifest,
)
from ..store.outputs import check_output_dir
from ..store.projector_file import encode_projectors, load_projectors
from ..store.reader import check_projector_file
from ..store.shards import file_sha256_matches
from ..store.writer import RunWriter
from .pipeline import BatchRunner, dynamic_batch_sizes
from .resume import RunPlan, prepare_out_dir, resume_state
from .run_records import (
    build_manifest,
    capped_rank_notes,
    data_record,
    factors_record,
    model_record,
    run_settings,
    weights_sha,
)


@dataclass
class ProjectOptions(InputFields):
    """Options of ``ghostproj project`` (the command line is made from these fields). Fields
    left None take their default, or the value recorded in the ``like`` run; ``model`` and
    ``data`` are required (the command line puts the embedded demo in their place)."""

    out: str = "train.st"
    layers: list[str] | None = None
    rank: int | None = None
    rank_min: int | None = None
    rank_in: int | None = None
    rank_out: int | None = None
    projector: str | None = None
    seed: int | None = None
    like: str | None = None
    loss_reduction: str | None = None
    bias: bool | None = None
    batch_size: int = 8
    store_dtype: str = "bfloat16"
    shard_size: int = 4096
    token_budget: int | None = None
    include_embeddings: bool = False
    num_shards: int = 1  # job arrays: split the examples into this many parts ...
    shard_id: int = 0  # ... and project this one
    force: bool = False  # start even when the disk looks too small
    resume: bool = True
    verify: bool = False  # on resume or rerun, hash every shard, not only the last one
    compile: bool = False  # torch.compile the model with the engine attached: one graph, no break per layer
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in the backward pass
    fsdp: bool = False  # under torchrun: shard the weights across the ranks (FSDP2), each rank its own rows
    dry_run: bool = False  # estimate layers, D, store size and memory from the config alone; run nothing
    optimizer_state: str | None = None  # Adam moments: project update directions, not raw gradients (LESS)
    factors: str | None = None  # `ghostproj factors`: project in their Kronecker eigenbasis
    show_progress: bool = True

    def __post_init__(self):
        if self.factors is not None:
            _check_factors_choices(self)
        if self.store_dtype not in STORE_DTYPES:
            raise GhostprojError(f"Unknown --store-dtype '{self.store_dtype}'; choose one of "
                                 f"{', '.join(STORE_DTYPES)}.")
        if self.max_length < 2:
            raise GhostprojError(f"--max-length must be at least 2, got {self.max_length}.")
        if self.batch_size < 1:
            raise GhostprojError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.fsdp and (self.compile or self.optimizer_state):
            raise GhostprojError("--fsdp runs eager projection of raw gradients: drop --compile and "
                                 "--optimizer-state.")
        if self.optimizer_state and (self.compile or self.include_embeddings):
            raise GhostprojError("--optimizer-state works with Linear / Conv1D layers in eager mode: drop --compile "
                                 "and --include-embeddings.")
        if self.token_budget is not None and self.token_budget < 1:
            raise GhostprojError(f"--token-budget must be at least 1, got {self.token_budget}.")
        if self.shard_size < 1:
            raise GhostprojError(f"--shard-size must be at least 1, got {self.shard_size}.")


@dataclass
class ProjectSummary:
    out: str
    examples: int = 0
    tokens: int = 0  # label positions
    no_label: int = 0
    truncated: int = 0
    prompt_too_long: int = 0  # prompt filled --max-length: no completion token left
    dim: int = 0
    bytes: int = 0
    seconds: float = 0.0
    resumed_from: int = 0
    repaired: int = 0  # listed shards recomputed: damaged, missing, or holding other examples
    mode: str = "new"  # new, resumed, repaired (a complete run's bad shards) or complete (nothing to do)
    projector_rebuilt: bool = False
    coverage: str = ""  # what share of the model the projected layers hold, in words
    notes: list[str] = field(default_factory=list)

    @property
    def already_complete(self) -> bool:
        return self.mode == "complete"


_DEFAULTS = {"rank": defaults.RANK, "rank_min": 1, "projector": defaults.PROJECTOR, "seed": 0,
             "loss_reduction": defaults.LOSS_REDUCTION, "bias": False}


def run_values(opts: ProjectOptions) -> tuple[Manifest | None, dict]:
    """The --like run's manifest (or None) and the run-defining options, resolved from it
    where given and checked."""
    like, values = _apply_like(opts)
    _check_choices(opts, values)
    return like, values


def _apply_like(opts: ProjectOptions) -> tuple[Manifest | None, dict]:
    resolved = {k: getattr(opts, k) for k in _DEFAULTS}
    if not opts.like:
        return None, {k: (v if v is not None else _DEFAULTS[k]) for k, v in resolved.items()}
    like = read_manifest(opts.like)
    like.require(("projector", "loss_reduction", "bias"), Path(opts.like) / MANIFEST, "--like")
    recorded = {
        "projector": like.projector["kind"],
        "seed": like.projector["seed"],
        "loss_reduction": like.loss_reduction,
        "bias": like.bias,
    }
    for key, value in recorded.items():
        if resolved[key] is not None and resolved[key] != value:
            flag = "--" + key.replace("_", "-")
            raise GhostprojError(f"{flag} {resolved[key]} contradicts the --like run, which used {value}.")
    for key in ("rank", "rank_min", "rank_in", "rank_out"):
        if getattr(opts, key) is not None:
            raise GhostprojError(f"--{key.replace('_', '-')} cannot be combined with --like; the k's come from the --like run.")
    if opts.layers:
        names = [layer.name for layer in like.layers]
        raise GhostprojError(f"--layers cannot be combined with --like; the --like run projects {', '.join(names)}.")
    recorded["rank"], recorded["rank_min"] = None, None
    return like, recorded


def _check_choices(opts: ProjectOptions, values: dict) -> None:
    """The choices a --like run may supply, once they are known."""
    if opts.factors is None and values["projector"] not in PROJECTOR_KINDS + ((EIGEN,) if opts.like else ()):
        raise GhostprojError(f"Unknown --projector '{values['projector']}'; choose one of {', '.join(PROJECTOR_KINDS)}.")
    if values["loss_reduction"] not in LOSS_REDUCTIONS:
        raise GhostprojError(f"Unknown --loss-reduction '{values['loss_reduction']}'; choose mean or sum.")


def _check_factors_choices(opts: ProjectOptions) -> None:
    for flag, given in (("--like", opts.like), ("--projector", opts.projector), ("--seed", opts.seed),
                        ("--bias", opts.bias), ("--include-embeddings", opts.include_embeddings),
                        ("--adapter", opts.adapter), ("--optimizer-state", opts.optimizer_state)):
        if given:
            raise GhostprojError(f"--factors cannot be combined with {flag}: the matrices are the factors' "
                                 "eigenvectors of each Linear / Conv1D layer's own weight gradient.")


def build_engine(model, opts: ProjectOptions, values: dict, like: Manifest | None,
                 factors: tuple[FactorTotals, dict] | None = None) -> GradProjectionEngine:
    engine_class, extra = GradProjectionEngine, {}
    if factors is not None:
        return factors_engine(model, opts.layers, factors, rank=values["rank"], rank_min=values["rank_min"],
                              rank_in=opts.rank_in, rank_out=opts.rank_out)
    if opts.optimizer_state:
        from ..engines.adam import AdamDirectionEngine

        engine_class, extra = AdamDirectionEngine, {"optimizer_state": opts.optimizer_state}
    if like is None:
        layers = opts.layers
        if layers is None and opts.adapter:
            layers = [ADAPTER_LAYERS]  # with an adapter, its LoRA matrices are what was trained
        return engine_class(
            model,
            layers,
            rank=values["rank"],
            rank_min=values["rank_min"],
            rank_in=opts.rank_in,
            rank_out=opts.rank_out,
            projector=values["projector"],
            seed=values["seed"],
            bias=values["bias"],
            include_embeddings=opts.include_embeddings,
            **extra,
        )
    names = [layer.name for layer in like.layers]
    owners = layer_owners(model, names)
    missing = [n for n in names if n not in owners]
    if missing:
        raise GhostprojError(f"The model has no layer '{missing[0]}' that the --like run projects.")
    ranks = {layer.name: (layer.k_in, layer.k_out) for layer in like.layers}
    widths = {layer.name: (layer.n_in, layer.n_out) for layer in like.layers}
    check_projector_file(Path(opts.like), like)
    matrices = load_projectors(Path(opts.like) / PROJECTOR_FILE, names, {n: (ranks[n], widths[n]) for n in names})
    projectors = {n: LayerProjector(p_in, p_out) for n, (p_in, p_out) in matrices.items()}
    recorded = (like.fingerprint_parts or {}).get("projector")
    if recorded is not None and projector_hash(projectors) != recorded:  # a run without a recorded sha256
        raise GhostprojError(f"{Path(opts.like) / PROJECTOR_FILE} is damaged: its matrices differ from those the "
                             "--like run was projected with; rerun that run's project command to rebuild it.")
    return engine_class(
        model,
        ["re:^" + re.escape(n) + "$" for n in dict.fromkeys(owners.values())],
        projector=values["projector"],
        seed=values["seed"],
        bias=values["bias"],
        ranks=ranks,
        projectors=projectors,
        **extra,
    )


def run_project(opts: ProjectOptions, summary: ProjectSummary | None = None) -> ProjectSummary:
    """Project ``opts.data`` into ``opts.out``. ``summary``, when given, is filled in as the
    run goes, so a caller still has its notes when the run is interrupted or refused."""
    t0 = time.perf_counter()
    if opts.model is None or opts.data is None:
        raise GhostprojError("project needs a model and data.")
    if opts.dry_run:
        raise GhostprojError("A dry run is jobs.dry_run.run_dry_run's; run_project projects.")
    check_output_dir(opts.out, "--out", [opts.data, opts.model, opts.adapter, opts.like, opts.optimizer_state,
                                         opts.factors])
    like, values = run_values(opts)
    summary = summary if summary is not None else ProjectSummary(out=opts.out)
    factors = load_factors(opts.factors, sums=False) if opts.factors else None  # the eigenvectors are what it uses
    if opts.fsdp and opts.adapter:
        raise GhostprojError("--fsdp loads the base model's weights sharded; drop --adapter.")
    inputs = load_inputs(opts, summary, meta=opts.fsdp)  # sharded, the weights are loaded below
    if opts.gradient_checkpointing:
        enable_gradient_checkpointing(inputs.model)
    if opts.fsdp:
        load_sharded(inputs.model, opts.model, opts.dtype, opts.revision, inputs.device)
    engine = build_engine(inputs.model, opts, values, like, factors)
    parts = fingerprint_parts(engine.layers, weights_sha(inputs.model, engine, opts.adapter),
                              projector_hash(engine.projectors), values["loss_reduction"], values["bias"])
    summary.notes += capped_rank_notes(engine, values.get("rank"), opts.rank_in, opts.rank_out)
    manifest = build_manifest(
        parts=parts, model=model_record(inputs.model, opts, parts), data=data_record(inputs),
        loss_reduction=values["loss_reduction"], bias=values["bias"], projector=(values["projector"], values["seed"]),
        layers=engine.layers, store_dtype=opts.store_dtype, settings=run_settings(opts, inputs),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    coverage = engine_coverage(inputs.model, engine)
    manifest.coverage, summary.coverage = coverage.to_json(), coverage.describe()
    summary.notes += coverage_notes(coverage)
    if factors is not None or (like is not None and like.factors):
        manifest.projector["kind"] = EIGEN
        manifest.factors = like.factors if like else factors_record(opts.factors, *factors)
    out = Path(opts.out)
    part = _partition(opts, inputs, manifest, out)
    projector_bytes = encode_projectors(engine.projectors, {"format": str(FORMAT_VERSION),
                                                            "fingerprint": manifest.fingerprint})
    manifest.projector["sha256"] = sha256_hex(projector_bytes)
    old = prepare_out_dir(out, manifest, opts.resume, part.manifest_name, shared=part.dist)
    _count(summary, part.subset, engine.dim)
    if part.dist and old is not None and (out / MANIFEST).exists():
        summary.mode = "complete"  # merged already: the ranks' shards were checked then
        summary.bytes = old.bytes
    else:
        _check_disk(out, opts, part, engine.dim, fresh=old is None, summary=summary)
        with RunLock(out, part.shard_id if part.dist else None):
            _write_run(opts, values, inputs, engine, manifest, part, old, projector_bytes, summary, t0)
    if part.dist:
        finish_distributed(out, part.shard_id, part.num_shards)
    summary.seconds = time.perf_counter() - t0
    return summary


@dataclass
class _Part:
    """The rows this process projects and where it records them."""

    dist: bool  # under torchrun
    shard_id: int
    num_shards: int
    subset: list[Example]
    manifest_name: str
    regrouped: bool = False  # a torchrun restarted with another number of ranks: subset holds rows still to do


def _partition(opts: ProjectOptions, inputs: LoadedInputs, manifest: Manifest, out: Path) -> _Part:
    examples = inputs.data.examples
    dist = distributed_rank(inputs.device)
    num_shards, shard_id = opts.num_shards, opts.shard_id
    if dist is not None:
        if num_shards != 1:
            raise GhostprojError("--num-shards/--shard-id cannot be combined with torchrun; ranks split the work.")
        shard_id, num_shards = dist
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise GhostprojError(f"--shard-id must be in 0..{num_shards - 1} for --num-shards {num_shards}.")
    subset = examples[shard_id::num_shards]  # a disjoint, deterministic part of the rows
    if num_shards > 1:
        manifest.part = {"shard_id": shard_id, "num_shards": num_shards, "rows": len(subset)}
    part = _Part(dist is not None, shard_id, num_shards, subset,
                 rank_manifest_name(shard_id) if dist is not None else MANIFEST)
    if part.dist:
        sync_start(out, shard_id)
        if not (out / MANIFEST).exists():
            part.regrouped, part.subset = regroup_after_rank_change(out, manifest, examples, shard_id, num_shards,
                                                                    subset)
    return part


def _count(summary: ProjectSummary, subset: list[Example], dim: int) -> None:
    summary.dim = dim
    summary.truncated = sum(e.truncated for e in subset)
    summary.no_label = sum(e.n_label_positions == 0 for e in subset)
    summary.prompt_too_long = sum(e.prompt_filled for e in subset)
    summary.examples = len(subset)
    summary.tokens = sum(e.n_label_positions for e in subset)


def _check_disk(out: Path, opts: ProjectOptions, part: _Part, dim: int, fresh: bool, summary: ProjectSummary) -> None:
    expected = len(part.subset) * dim * STORE_DTYPES[opts.store_dtype].itemsize
    summary.notes.append(f"Expected output: about {expected / 2**20:.1f} MiB for {len(part.subset)} examples x D={dim}.")
    free = shutil.disk_usage(out).free
    if fresh and expected > free and not opts.force:
        raise GhostprojError(f"The disk holding {out} has {free / 2**20:.0f} MiB free but the run needs about "
                             f"{expected / 2**20:.0f} MiB; free space or pass --force.")


def _write_run(opts: ProjectOptions, values: dict, inputs: LoadedInputs, engine: GradProjectionEngine, manifest: Manifest,
               part: _Part, old: Manifest | None, projector_bytes: bytes, summary: ProjectSummary, t0: float) -> None:
    """Under the run's lock: keep the shards a clean run would hold, write every other one."""
    out = Path(opts.out)
    first_seq = 0
    if part.regrouped and old is not None:  # this rank takes on part of the work an earlier torchrun left
        old.complete = False
        first_seq = 1 + max((int(SHARD_RE.match(e.file).group(2)) for e in old.shards), default=-1)
    plan = RunPlan(part.subset, opts.batch_size, opts.token_budget, opts.shard_size, part.shard_id, first_seq)
    state = resume_state(out, old, plan, opts.verify, keep_all=part.regrouped)
    summary.notes += state.notes
    if _ensure_projector(out, projector_bytes, manifest, part) and old is not None:
        summary.projector_rebuilt = True
        source = "the --like run" if opts.like else "the factors" if opts.factors else f"seed {values['seed']}"
        summary.notes.append(f"{PROJECTOR_FILE} was missing or damaged; rebuilt it from {source}.")
    was_complete = old is not None and old.complete
    if was_complete and not state.todo:
        summary.mode = "complete"
        summary.bytes = old.bytes
        return
    if old is not None:
        manifest.created = old.created or manifest.created
    manifest.shards = state.kept
    write_manifest(out, manifest, part.manifest_name)  # incomplete until every planned shard is back
    writer = RunWriter(out, manifest, rank=part.shard_id, manifest_name=part.manifest_name, spans=state.todo)
    summary.resumed_from = sum(e.rows for e in state.kept)
    summary.repaired = state.recomputed
    summary.mode = "repaired" if was_complete else "resumed" if old is not None else "new"
    if summary.mode == "resumed" and summary.resumed_from:
        summary.notes.append(f"Resumed after {summary.resumed_from} examples already written.")
    batches = plan.batches_for(state.todo)
    run = BatchRunner(opts, values, inputs, engine)
    try:
        with RateProgress("projecting", total=sum(len(b) for _, b in batches), enabled=opts.show_progress) as bar, \
                engine, dynamic_batch_sizes(opts.compile):
            run.pipeline(batches, writer, bar)
        if was_complete:  # repaired: the run is again exactly as it was finished
            writer.close()
            manifest.complete, manifest.summary = True, old.summary
            write_manifest(out, manifest, part.manifest_name)
        else:
            writer.finish({k: v for k, v in asdict(summary).items() if k not in _RUNTIME_ONLY}, started=t0)
        summary.bytes = manifest.bytes
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise GhostprojError(f"The disk holding {out} is full after {writer.rows_written} examples; every "
                                 "complete shard is kept, free space and rerun to resume.") from None
        raise
    except Exception as exc:
        if opts.compile and type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            writer.close()  # the shard in flight lands first, so the count below is what is on disk
            raise GhostprojError(f"torch.compile failed after {writer.rows_written} examples ({first}); every "
                                 "complete shard is kept, rerun without --compile to resume.") from None
        raise
    finally:
        try:
            writer.close()  # a shard already encoded still reaches the disk on an interrupt
        except OSError:
            pass


# Summary fields that describe this invocation, not the run: kept out of the manifest.
_RUNTIME_ONLY = ("out", "notes", "repaired", "mode", "projector_rebuilt", "coverage")


def _ensure_projector(out: Path, data: bytes, manifest: Manifest, part: _Part) -> bool:
    """Write the projector file unless it already holds exactly ``data``; True when it was
    (re)written. Under torchrun rank 0 owns it."""
    path = out / PROJECTOR_FILE
    if part.dist and part.shard_id != 0:
        return False
    if path.is_file() and file_sha256_matches(path, manifest.projector["sha256"]):
        return False
    atomic_write(path, data)
    return True
