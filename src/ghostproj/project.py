"""The projection job: model + data -> a run directory of projected per-example gradients."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data import Example, collate, fixed_size_batches, token_budget_batches
from .readers import DataSpec, load_examples
from .engines.projection import GradProjectionEngine
from .errors import GhostprojError
from .losses import LOSS_REDUCTIONS, causal_lm_losses
from .models import config_hash, load_model, pad_token_id, position_limit
from .progress import RateProgress
from .projector import PROJECTOR_KINDS, load_projectors, projector_hash, save_projectors
from .store import (
    FORMAT_VERSION,
    MANIFEST,
    PROJECTOR_FILE,
    STORE_DTYPES,
    RunWriter,
    damaged_shards,
    differing_part,
    fingerprint,
    fingerprint_parts,
    merge_manifests,
    rank_manifest_name,
    read_manifest,
    read_rows,
    read_shard_header,
    require_keys,
    sampled_weights_hash,
    RunLock,
    weights_hash,
    write_manifest,
)
from .transfer import HostCopy

ADAPTER_LAYERS = r"re:\.lora_[AB]\.[^.]+$"
# Settings a resumed run must share with the interrupted one, beyond the fingerprint.
_RESUME_SETTINGS = ("max_length", "data_spec", "store_dtype", "shard_size", "batch_size", "token_budget", "dtype")


@dataclass
class ProjectOptions:
    """Options of ``ghostproj project``. Fields left None take their default, or the value
    recorded in the ``like`` run."""

    model: str
    data: str
    out: str
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
    max_length: int = 512
    store_dtype: str = "bfloat16"
    shard_size: int = 4096
    device: str = "auto"
    dtype: str = "float32"
    text_field: str | None = None  # None: the layout is read from the data's first row
    prompt_field: str | None = None
    completion_field: str | None = None
    messages_field: str | None = None
    format: str = "auto"
    token_dtype: str | None = None
    split: str = "train"
    token_budget: int | None = None
    include_embeddings: bool = False
    revision: str | None = None
    adapter: str | None = None
    num_shards: int = 1  # job arrays: split the examples into this many parts ...
    shard_id: int = 0  # ... and project this one
    force: bool = False  # start even when the disk looks too small
    resume: bool = True
    verify: bool = False  # on resume or rerun, hash every shard, not only the last one
    compile: bool = False  # torch.compile the model with the engine attached: one graph, no break per layer
    show_progress: bool = True


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
    repaired: int = 0  # damaged or missing shards recomputed
    already_complete: bool = False
    notes: list[str] = field(default_factory=list)


_DEFAULTS = {"rank": 256, "rank_min": 1, "projector": "gaussian", "seed": 0, "loss_reduction": "mean", "bias": False}


def _apply_like(opts: ProjectOptions) -> tuple[dict | None, dict]:
    """Resolve the run-defining options, from ``--like`` where given. Returns the like
    manifest (or None) and the resolved values."""
    resolved = {k: getattr(opts, k) for k in _DEFAULTS}
    if not opts.like:
        return None, {k: (v if v is not None else _DEFAULTS[k]) for k, v in resolved.items()}
    like = read_manifest(opts.like)
    require_keys(like, ("projector", "loss_reduction", "bias"), Path(opts.like) / MANIFEST, "--like")
    recorded = {
        "projector": like["projector"]["kind"],
        "seed": like["projector"]["seed"],
        "loss_reduction": like["loss_reduction"],
        "bias": like["bias"],
    }
    for key, value in recorded.items():
        if resolved[key] is not None and resolved[key] != value:
            flag = "--" + key.replace("_", "-")
            raise GhostprojError(f"{flag} {resolved[key]} contradicts the --like run, which used {value}.")
    for key in ("rank", "rank_min", "rank_in", "rank_out"):
        if getattr(opts, key) is not None:
            raise GhostprojError(f"--{key.replace('_', '-')} cannot be combined with --like; the k's come from the --like run.")
    if opts.layers:
        names = [layer["name"] for layer in like["layers"]]
        raise GhostprojError(f"--layers cannot be combined with --like; the --like run projects {', '.join(names)}.")
    recorded["rank"], recorded["rank_min"] = None, None
    return like, recorded


def _check_choices(opts: ProjectOptions, values: dict) -> None:
    if values["projector"] not in PROJECTOR_KINDS:
        raise GhostprojError(f"Unknown --projector '{values['projector']}'; choose one of {', '.join(PROJECTOR_KINDS)}.")
    if values["loss_reduction"] not in LOSS_REDUCTIONS:
        raise GhostprojError(f"Unknown --loss-reduction '{values['loss_reduction']}'; choose mean or sum.")
    if opts.store_dtype not in STORE_DTYPES:
        raise GhostprojError(f"Unknown --store-dtype '{opts.store_dtype}'; choose one of {', '.join(STORE_DTYPES)}.")
    if opts.max_length < 2:
        raise GhostprojError(f"--max-length must be at least 2, got {opts.max_length}.")
    if opts.batch_size < 1:
        raise GhostprojError(f"--batch-size must be at least 1, got {opts.batch_size}.")
    if opts.token_budget is not None and opts.token_budget < 1:
        raise GhostprojError(f"--token-budget must be at least 1, got {opts.token_budget}.")
    if opts.shard_size < 1:
        raise GhostprojError(f"--shard-size must be at least 1, got {opts.shard_size}.")


def build_engine(model, opts: ProjectOptions, values: dict, like: dict | None) -> GradProjectionEngine:
    if like is None:
        layers = opts.layers
        if layers is None and opts.adapter:
            layers = [ADAPTER_LAYERS]  # with an adapter, its LoRA matrices are what was trained
        return GradProjectionEngine(
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
        )
    names = [layer["name"] for layer in like["layers"]]
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise GhostprojError(f"The model has no layer '{missing[0]}' that the --like run projects.")
    ranks = {layer["name"]: (int(layer["k_in"]), int(layer["k_out"])) for layer in like["layers"]}
    widths = {layer["name"]: (int(layer["n_in"]), int(layer["n_out"])) for layer in like["layers"]}
    projectors = load_projectors(Path(opts.like) / PROJECTOR_FILE, names,
                                 {n: (ranks[n], widths[n]) for n in names})
    engine = GradProjectionEngine(
        model,
        ["re:^" + re.escape(n) + "$" for n in names],
        projector=values["projector"],
        seed=values["seed"],
        bias=values["bias"],
        ranks=ranks,
        projectors=projectors,
    )
    return engine


def _prepare_out_dir(out: Path, manifest: dict, resume: bool, manifest_name: str = MANIFEST,
                     shared: bool = False) -> dict | None:
    """The existing manifest when this run resumes it, None for a fresh run. Refuses a
    directory that holds something else, naming what differs. ``shared``: torchrun ranks
    write one directory, each with its own manifest."""
    if out.exists() and not out.is_dir():
        raise GhostprojError(f"Output path {out} exists and is not a directory.")
    if not out.exists():
        out.mkdir(parents=True, exist_ok=True)
        return None
    if shared and (out / MANIFEST).exists():
        old = read_manifest(out)  # an earlier torchrun already merged this run
        if old.get("fingerprint") == manifest["fingerprint"] and old.get("complete"):
            return old
        raise GhostprojError(f"{out} holds a different run; choose another --out.")
    if not (out / manifest_name).exists():
        # what may already be there: the projector of a run that stopped before its first
        # manifest, a killed writer's temporary file (swept once the lock is taken), and
        # (torchrun) what sibling ranks wrote
        def ours(name: str) -> bool:
            if name in (PROJECTOR_FILE, ".lock") or ".tmp-" in name:
                return True
            return shared and name.startswith((".lock-r", "manifest-r", "grads-r"))
        if any(not ours(p.name) for p in out.iterdir()):
            raise GhostprojError(f"Output directory {out} is not empty and holds no ghostproj run; choose another --out.")
        return None
    old = read_manifest(out, manifest_name)
    part = differing_part(old, manifest)
    if part is not None:
        raise GhostprojError(f"{out} holds a different run (its {part} differ); choose another --out.")
    if old.get("data", {}).get("sha256") != manifest["data"]["sha256"]:
        raise GhostprojError(f"{out} holds a run over different data; choose another --out.")
    for key in _RESUME_SETTINGS:
        if old.get("settings", {}).get(key) != manifest["settings"].get(key):
            flag = "--" + key.replace("_", "-")
            raise GhostprojError(
                f"{out} holds a run made with {flag} {old.get('settings', {}).get(key)}; rerun with the same value or choose another --out."
            )
    if not shared:
        old_part = {k: v for k, v in (old.get("part") or {}).items() if k != "rows"}
        new_part = {k: v for k, v in (manifest.get("part") or {}).items() if k != "rows"}
        if old_part != new_part:
            was = f"part {old_part['shard_id']} of {old_part['num_shards']}" if old_part else "a whole run"
            raise GhostprojError(f"{out} holds {was}; rerun with the same --num-shards/--shard-id or choose another --out.")
    if not resume and not old.get("complete"):
        raise GhostprojError(f"{out} holds an unfinished run and --no-resume was given; choose another --out.")
    return old


def run_project(opts: ProjectOptions, summary: ProjectSummary | None = None) -> ProjectSummary:
    """Project ``opts.data`` into ``opts.out``. ``summary``, when given, is filled in as the
    run goes, so a caller still has its notes when the run is interrupted or refused."""
    t0 = time.perf_counter()
    like, values = _apply_like(opts)
    _check_choices(opts, values)
    summary = summary if summary is not None else ProjectSummary(out=opts.out)
    spec = DataSpec(opts.data, opts.format, opts.text_field, opts.prompt_field, opts.completion_field,
                    opts.messages_field, opts.token_dtype, opts.split)
    spec.resolved_format()  # refuse an unknown format before loading the model
    if spec.resolved_format() != "hf" and not Path(opts.data).is_file():
        raise GhostprojError(f"Data file {opts.data} does not exist.")
    model, tokenizer = load_model(opts.model, opts.dtype, device_for_this_process(opts.device), opts.revision,
                                  opts.adapter)
    device = next(model.parameters()).device

    max_length = opts.max_length
    limit = position_limit(model)
    if limit is not None and max_length > limit:
        summary.notes.append(f"--max-length {max_length} exceeds the model's position limit; capped to {limit}.")
        max_length = limit
    data = load_examples(spec, tokenizer, max_length, getattr(model.config, "vocab_size", None))
    summary.notes += data.notes
    examples = data.examples

    engine = build_engine(model, opts, values, like)
    modules = dict(model.named_modules())
    weight_tensors = []
    for info in engine.layers:
        weight_tensors.append((info.name + ".weight", modules[info.name].weight))
        if engine.bias:
            weight_tensors.append((info.name + ".bias", modules[info.name].bias))
    weights_sha = weights_hash(weight_tensors)
    if opts.adapter:
        # the adapter's matrices alone do not say which base they sit on: runs over
        # different bases must not compare as equal
        base = [(n, p) for n, p in model.named_parameters() if ".lora_" not in n]
        weights_sha = fingerprint({"adapter": weights_sha, "base": sampled_weights_hash(base)})
    parts = fingerprint_parts(engine.layers, weights_sha, projector_hash(engine.projectors),
                              values["loss_reduction"], values["bias"])
    summary.notes += _capped_rank_notes(engine, values, opts)
    fp = fingerprint(parts)
    manifest = {
        "format": FORMAT_VERSION,
        "fingerprint": fp,
        "fingerprint_parts": parts,
        "model": {
            "path": opts.model,
            "class": type(model).__name__,
            "config_hash": config_hash(model),
            "weights_hash": parts["model_weights"],
            "dtype": opts.dtype,
            "adapter": str(Path(opts.adapter).resolve()) if opts.adapter else None,
        },
        "data": {
            **spec.describe(),
            "sha256": data.sha256,
            "fields": data.fields,
            "max_length": max_length,
            "count": len(examples),
        },
        "loss_reduction": values["loss_reduction"],
        "bias": values["bias"],
        "projector": {"kind": values["projector"], "seed": values["seed"], "file": PROJECTOR_FILE},
        "layers": [info.to_json() for info in engine.layers],
        "dim": engine.dim,
        "store_dtype": opts.store_dtype,
        "settings": {
            "max_length": max_length,
            "data_spec": spec.describe(),
            "store_dtype": opts.store_dtype,
            "shard_size": opts.shard_size,
            "batch_size": opts.batch_size,
            "token_budget": opts.token_budget,
            "dtype": opts.dtype,
        },
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "shards": [],
        "complete": False,
    }

    dist = _distributed(device)
    num_shards, shard_id = opts.num_shards, opts.shard_id
    if dist is not None:
        if num_shards != 1:
            raise GhostprojError("--num-shards/--shard-id cannot be combined with torchrun; ranks split the work.")
        shard_id, num_shards = dist
    if num_shards < 1 or not 0 <= shard_id < num_shards:
        raise GhostprojError(f"--shard-id must be in 0..{num_shards - 1} for --num-shards {num_shards}.")
    subset = examples[shard_id::num_shards]  # a disjoint, deterministic part of the rows
    if num_shards > 1:
        manifest["part"] = {"shard_id": shard_id, "num_shards": num_shards, "rows": len(subset)}
    manifest_name = rank_manifest_name(shard_id) if dist is not None else MANIFEST

    out = Path(opts.out)
    regroup = False
    if dist is not None:
        _sync_start(out, shard_id)
        if not (out / MANIFEST).exists():
            regroup, subset = _regroup_after_rank_change(out, manifest, examples, shard_id, num_shards, subset)
    old = _prepare_out_dir(out, manifest, opts.resume, manifest_name, shared=dist is not None)
    if regroup and old is not None:
        old["complete"] = False  # this rank takes on part of the work left by the earlier run
    summary.dim = engine.dim
    summary.truncated = sum(e.truncated for e in subset)
    summary.no_label = sum(e.n_label_positions == 0 for e in subset)
    summary.prompt_too_long = sum(e.prompt_filled for e in subset)
    summary.examples = len(subset)
    summary.tokens = sum(e.n_label_positions for e in subset)
    damaged = []
    if old is not None:
        if dist is None:
            damaged = damaged_shards(out, old, opts.verify)
        else:
            damaged = damaged_shards(out, old, opts.verify) if not (out / MANIFEST).exists() else []
            if damaged:
                pos, why = damaged[0]
                raise GhostprojError(f"Shard {out / old['shards'][pos]['file']} is damaged ({why}); rerun this "
                                     "project command without torchrun to recompute it.")
    if old is not None and old.get("complete") and not damaged:
        summary.already_complete = True
        summary.bytes = sum(s.get("bytes", 0) for s in old["shards"])
        summary.seconds = time.perf_counter() - t0
        if dist is not None:
            _finish_distributed(out, shard_id, num_shards)
        return summary
    expected = len(subset) * engine.dim * STORE_DTYPES[opts.store_dtype].itemsize
    summary.notes.append(f"Expected output: about {expected / 2**20:.1f} MiB for {len(subset)} examples x D={engine.dim}.")
    free = shutil.disk_usage(out).free
    if old is None and expected > free and not opts.force:
        raise GhostprojError(f"The disk holding {out} has {free / 2**20:.0f} MiB free but the run needs about "
                             f"{expected / 2**20:.0f} MiB; free space or pass --force.")

    with RunLock(out, shard_id if dist is not None else None):
        if old is not None:
            manifest["shards"] = old["shards"]
            manifest["created"] = old.get("created", manifest["created"])
            if old.get("complete"):
                manifest["complete"], manifest["summary"] = True, old.get("summary")
        else:
            if shard_id == 0 or dist is None:
                save_projectors(out / PROJECTOR_FILE, engine.projectors,
                                {"format": str(FORMAT_VERSION), "fingerprint": fp})
            write_manifest(out, manifest, manifest_name)
        writer = RunWriter(out, manifest, opts.shard_size, rank=shard_id, manifest_name=manifest_name)
        start = 0 if regroup else writer.rows_written  # regrouped: the subset holds only rows still to do
        summary.resumed_from = writer.rows_written
        if summary.resumed_from:
            summary.notes.append(f"Resumed after {summary.resumed_from} examples already written.")
        planned = _planned_batches(subset, opts)
        todo_batches = _batches_after(planned, start, out)
        repairs = _repair_plan(planned, manifest["shards"], damaged, out)
        for pos, why in damaged:
            summary.notes.append(f"Shard {manifest['shards'][pos]['file']} was damaged ({why}); recomputing its "
                                 f"{manifest['shards'][pos]['rows']} examples.")
        summary.repaired = len(repairs)
        pad = pad_token_id(tokenizer)
        forward = torch.compile(model) if opts.compile else model
        total = len(subset) - start + sum(manifest["shards"][r.pos]["rows"] for r in repairs)
        try:
            with RateProgress("projecting", total=total, enabled=opts.show_progress) as bar, engine, \
                    _dynamic_batch_sizes(opts.compile):
                for repair in repairs:
                    parts = [launch_batch(forward, engine, b, values["loss_reduction"], pad, device,
                                          STORE_DTYPES[opts.store_dtype]).result() for b in repair.batches]
                    rows = [torch.cat([p[c] for p in parts])[repair.begin:repair.end] for c in range(4)]
                    entry = manifest["shards"][repair.pos]
                    if "index_min" in entry and (int(rows[1].min()), int(rows[1].max())) != (
                            entry["index_min"], entry["index_max"]):
                        raise GhostprojError(f"{out} does not follow this version's example order; the damaged "
                                             f"shard {entry['file']} cannot be recomputed in place.")
                    writer.replace_shard(repair.pos, *rows)
                    bar.advance(repair.end - repair.begin, int(rows[3].sum()))
                # One batch in flight: batch t+1 is queued on the device before batch t's
                # results are waited for and handed to the writer.
                pending = None
                for batch_examples in todo_batches:
                    launched = launch_batch(forward, engine, batch_examples, values["loss_reduction"], pad, device,
                                            STORE_DTYPES[opts.store_dtype])
                    if pending is not None:
                        _deliver(pending, writer, bar)
                    pending = launched
                if pending is not None:
                    _deliver(pending, writer, bar)
            if not manifest.get("complete"):
                writer.finish({k: v for k, v in asdict(summary).items()
                               if k not in ("out", "notes", "already_complete", "repaired")}, started=t0)
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
    if dist is not None:
        _finish_distributed(out, shard_id, num_shards)
    summary.bytes = sum(s["bytes"] for s in manifest["shards"])
    summary.seconds = time.perf_counter() - t0
    return summary


def _capped_rank_notes(engine: GradProjectionEngine, values: dict, opts: ProjectOptions) -> list[str]:
    """Say so when --rank asks for more than some layers have: they are projected at their
    full size, and the run is smaller than the user may think."""
    rank = values.get("rank")
    if rank is None or opts.rank_in is not None or opts.rank_out is not None:
        return []
    capped = [i for i in engine.layers if i.k_in == i.n_in and i.k_out == i.n_out and i.size < rank]
    if not capped:
        return []
    first = capped[0]
    return [f"--rank {rank} exceeds the full size of {len(capped)} layer(s) (e.g. {first.name}: {first.n_in} x "
            f"{first.n_out} = {first.size}); they are projected at that full size."]


def _dynamic_batch_sizes(compiling: bool):
    """Under torch.compile, let the engine's per-layer result buffers (attributes reached
    through the model's modules, which dynamo otherwise takes as fixed-size) follow the
    batch size, so --token-budget batches share one graph instead of one each."""
    if not compiling:
        return contextlib.nullcontext()
    import torch._dynamo

    return torch._dynamo.config.patch(force_nn_module_property_static_shapes=False)


def _planned_batches(subset: list[Example], opts: ProjectOptions) -> list[list[Example]]:
    """Every batch of the run, in the order their rows are written. The order is
    deterministic, so a resumed run skips exactly the examples already written and a
    damaged shard's examples can be found again."""
    if opts.token_budget is not None:
        # length buckets remove most padding
        return list(token_budget_batches(subset, opts.token_budget))
    return list(fixed_size_batches(subset, opts.batch_size))


def _batches_after(batches: list[list[Example]], start: int, out: Path) -> list[list[Example]]:
    """The batches still to run when ``start`` rows are already written."""
    todo, skipped = [], 0
    for batch in batches:
        if skipped + len(batch) <= start:
            skipped += len(batch)
        else:
            todo.append(batch)
    if skipped != start:
        raise GhostprojError(f"{out} ends inside a batch; it was not written by this version of ghostproj.")
    return todo


@dataclass
class _Repair:
    """A damaged shard (its position in the manifest) and how to recompute it: these
    batches, whose concatenated rows [begin, end) are the shard's rows. Whole batches are
    run, so each example is computed in the very batch it was computed in before."""

    pos: int
    batches: list[list[Example]]
    begin: int
    end: int


def _repair_plan(batches: list[list[Example]], shards: list[dict], damaged: list[tuple[int, str]],
                 out: Path) -> list[_Repair]:
    starts, row = [], 0
    for entry in shards:
        starts.append(row)
        row += int(entry["rows"])
    plan = []
    for pos, _ in damaged:
        lo, hi = starts[pos], starts[pos] + int(shards[pos]["rows"])
        chosen, first, at = [], None, 0
        for batch in batches:
            if at + len(batch) > lo and at < hi:
                first = at if first is None else first
                chosen.append(batch)
            at += len(batch)
        if hi > at or first is None:
            raise GhostprojError(f"{out} lists more rows than its data has; it cannot be repaired in place.")
        plan.append(_Repair(pos, chosen, lo - first, hi - first))
    return plan


def device_for_this_process(device: str) -> str:
    """``--device`` for this process. Under torchrun each rank takes the GPU of its
    LOCAL_RANK and makes it current, so ranks never share GPU 0 and nccl, CUDA events
    and pinned copies all act on the rank's own device."""
    local = os.environ.get("LOCAL_RANK")
    if local is None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device  # the CPU, or a GPU the user named explicitly
    index, visible = int(local), torch.cuda.device_count()
    if index >= visible:
        raise GhostprojError(f"torchrun started local rank {index}, but only {visible} GPU(s) are visible; "
                             f"use --nproc-per-node {visible} or fewer.")
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def _distributed(device: torch.device) -> tuple[int, int] | None:
    """(rank, world size) under torchrun with more than one process, else None; sets up
    the process group once: nccl when this rank runs on a GPU, gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as td

    if not td.is_initialized():
        td.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return td.get_rank(), td.get_world_size()


def _sync_start(out: Path, rank: int) -> None:
    """Rank 0 creates the shared directory before any rank looks at it."""
    import torch.distributed as td

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    td.barrier()


def _rank_manifests(out: Path) -> dict[int, dict]:
    found = {}
    for path in out.glob("manifest-r[0-9][0-9][0-9].json"):
        found[int(path.name[10:13])] = read_manifest(out, path.name)
    return found


def _regroup_after_rank_change(out: Path, manifest: dict, examples: list[Example], rank: int, world: int,
                               subset: list[Example]) -> tuple[bool, list[Example]]:
    """A torchrun restarted with a different number of ranks: every rank reads what all
    earlier ranks wrote and takes its share of the rows still missing. Returns (regrouped,
    this rank's examples)."""
    import torch.distributed as td

    existing = _rank_manifests(out)
    regroup = any((m.get("part") or {}).get("num_shards") != world for m in existing.values())
    if regroup:
        done: set[int] = set()
        for m in existing.values():
            part = differing_part(m, manifest)
            if part is not None:
                raise GhostprojError(f"{out} holds rank manifests of a different run (their {part} differ).")
            for s in m["shards"]:
                header = read_shard_header(out / s["file"])
                done.update(read_rows(header, "index", 0, int(s["rows"])).tolist())
        remaining = [e for e in examples if e.index not in done]
        subset = remaining[rank::world]
        manifest["part"]["rows"] = len(subset)
    td.barrier()  # every rank decided before any rank rewrites its manifest
    return regroup, subset


def _finish_distributed(out: Path, rank: int, world: int) -> None:
    """After every rank finished its part, rank 0 merges the rank manifests into manifest.json
    (all of them, also those of ranks from an earlier run with more ranks) after checking that
    every example is there exactly once."""
    import torch.distributed as td

    td.barrier()
    if rank == 0 and not (out / MANIFEST).exists():
        ranks = _rank_manifests(out)
        merged = merge_manifests([ranks[r] for r in sorted(ranks)], by_shard_id=False)
        index = torch.cat([read_rows(read_shard_header(out / s["file"]), "index", 0, int(s["rows"]))
                           for s in merged["shards"]]) if merged["shards"] else torch.empty(0, dtype=torch.long)
        count = merged["data"]["count"]
        if index.numel() != count or index.unique().numel() != index.numel():
            raise GhostprojError(f"The ranks wrote {index.numel()} rows for {count} examples; rerun to repair.")
        write_manifest(out, merged)
        for r in ranks:
            (out / rank_manifest_name(r)).unlink(missing_ok=True)
    td.barrier()


def _deliver(launched: "LaunchedBatch", writer: RunWriter, bar: RateProgress) -> None:
    vectors, index, losses, counts = launched.result()
    writer.add(vectors, index, losses, counts)
    bar.advance(len(index), int(counts.sum()))


class LaunchedBatch:
    """One batch whose forward and backward have been queued on the device and whose
    results are on their way to the host."""

    def __init__(self, examples: list[Example], live: list[int], dim: int, copy: HostCopy | None):
        self.examples = examples
        self.live = live  # rows that have a label position and were run
        self.dim = dim
        self.copy = copy

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vectors [B, D] float32, index [B], losses [B], label counts [B]) on the host;
        examples with no label position were not run and get zero vectors."""
        b = len(self.examples)
        index = torch.tensor([e.index for e in self.examples], dtype=torch.long)
        counts = torch.tensor([e.n_label_positions for e in self.examples], dtype=torch.int32)
        losses = torch.zeros(b, dtype=torch.float32)
        if self.copy is None:
            return torch.zeros(b, self.dim, dtype=torch.float32), index, losses, counts
        vectors_live, losses_live = self.copy.result()
        if len(self.live) == b:  # every example had a label position: nothing to scatter
            return vectors_live, index, losses_live.float(), counts
        vectors = torch.zeros(b, self.dim, dtype=vectors_live.dtype)
        rows = torch.tensor(self.live)
        vectors[rows] = vectors_live
        losses[rows] = losses_live.float()
        return vectors, index, losses, counts


def launch_batch(model, engine: GradProjectionEngine, examples: list[Example], loss_reduction: str, pad_id: int,
                 device: torch.device, store_dtype: torch.dtype = torch.float32) -> LaunchedBatch:
    """Queue one batch's forward, backward and projection; nothing here waits for the device."""
    live = [r for r, e in enumerate(examples) if e.n_label_positions > 0]
    if not live:
        return LaunchedBatch(examples, live, engine.dim, None)
    batch = collate([examples[r] for r in live], pad_id).to(device)
    engine.prepare(len(live), device)  # result buffers made outside any compiled region
    logits = model(**batch.model_inputs()).logits
    per_example, _ = causal_lm_losses(logits, batch.labels, loss_reduction)
    per_example.sum().backward()
    vectors = engine.collect()
    if device.type == "cuda" and store_dtype in (torch.bfloat16, torch.float32):
        # Converted on the device: half the bytes to copy and nothing left for the host to
        # convert (bf16 keeps float32's range, so no overflow check is lost).
        vectors = vectors.to(store_dtype)
    return LaunchedBatch(examples, live, engine.dim, HostCopy([vectors, per_example]))
