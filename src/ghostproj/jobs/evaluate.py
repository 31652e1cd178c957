"""`ghostproj evaluate`: do the scores predict what retraining does?

Fine-tunes copies of the model on random subsets of the training set and records every
query's loss under each (the counterfactuals), fine-tunes once on the whole set keeping
evenly spaced checkpoints, projects the training and query sets at those checkpoints (each
with projection matrices of its own), and reports the linear datamodeling score
(:mod:`ghostproj.scoring.lds`) of every scoring setting asked for, with checkpoint
ensembles of 1, 2, 4, ... checkpoints, and the loss change when a query's top-k training
examples are removed against k random ones.

Everything expensive is cached in the output directory (subset losses, checkpoints, runs,
removal runs), so a killed evaluation resumes where it stopped, and the subsets can be
trained by several processes (``--num-parts/--part`` or torchrun ranks).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import defaults
from ..data.batching import Example
from ..data.readers import DataSpec, LayoutFields
from ..errors import GhostprojError
from ..inputs import load_model_and_examples
from ..models import pad_token_id
from ..progress import RateProgress
from ..scoring.lds import difference_interval, estimate_lds, resamples
from ..scoring.score import DEFAULT_METRIC, DEFAULT_NORMALIZE, METRICS, score
from ..scoring.transform import NORMALIZATIONS
from ..store.files import atomic_write
from ..store.fingerprint import hash_tensors
from ..store.outputs import check_output_dir
from ..store.shards import encode_safetensors
from .evaluate_runs import MOMENTS, project_checkpoints
from .inrun import MAX_VAL_BATCH
from .lds_report import EvaluateResult, Setting, plot_report, write_report
from .retrain import Recipe, fine_tune, in_run_scores, query_losses
from .tracin import tracin_scores

VECTORS = ("grad", "adam")  # training vectors: gradients, or Adam update directions (project --optimizer-state)
PROJECTIONS = ("gaussian", "eigen")  # random matrices, or the Kronecker eigenbasis (factors, project --factors)

MIN_SUBSETS = 5  # fewer subset models give no usable rank correlation, let alone an interval
CONFIG = "evaluate.json"


@dataclass
class EvaluateOptions(LayoutFields):
    """Options of ``ghostproj evaluate`` (the command line is made from these fields); the
    command line puts the embedded demo in place of a missing model and data."""

    model: str | None = None
    train: str | None = None
    query: str | None = None
    out: str = "evaluate-out"
    subsets: int = 32
    fraction: float = 0.5
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0
    metrics: list[str] = field(default_factory=lambda: ["cosine", "dot", "influence"])
    normalize: list[str] = field(default_factory=lambda: ["none", "layer"])
    vectors: list[str] = field(default_factory=lambda: ["grad"])  # training vectors: grad, adam (LESS)
    projection: list[str] = field(default_factory=lambda: ["gaussian"])  # gaussian, eigen (Kronecker eigenbasis)
    fisher_labels: str = "empirical"  # the eigenbasis's factors: the data's labels, or sampled (true Fisher)
    checkpoints: int = 4
    layers: list[str] | None = None
    rank: int | None = None
    damping: float = defaults.DAMPING
    max_length: int = 512
    removal_queries: int = 8
    removal_k: int | None = None  # None: 5% of the training examples
    replicates: int = 1000
    num_parts: int = 1  # job arrays: train the subsets in this many processes ...
    part: int = 0  # ... this one (then run once more without --part to report)
    device: str = "auto"
    show_progress: bool = True

    def __post_init__(self):
        if not 0.0 < self.fraction < 1.0:
            raise GhostprojError(f"--fraction must be between 0 and 1 (exclusive), got {self.fraction}.")
        if self.subsets < MIN_SUBSETS:
            raise GhostprojError(f"--subsets {self.subsets} is too few for a rank correlation with an interval; "
                                 f"use at least {MIN_SUBSETS} (32 is the default).")
        for name in ("epochs", "batch_size", "checkpoints", "replicates"):
            if getattr(self, name) < 1:
                raise GhostprojError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if not self.lr > 0:
            raise GhostprojError(f"--lr must be positive, got {self.lr}.")
        if self.removal_queries < 0 or (self.removal_k is not None and self.removal_k < 1):
            raise GhostprojError("--removal-queries must be 0 or more and --removal-k at least 1.")
        if self.num_parts < 1 or not 0 <= self.part < self.num_parts:
            raise GhostprojError(f"--part must be in 0..{self.num_parts - 1} for --num-parts {self.num_parts}.")
        for m in self.metrics:
            if m not in METRICS + ("inrun", "tracin") or m == "influence-full":
                raise GhostprojError(f"Unknown --metrics entry '{m}'; choose from cosine, dot, influence, inrun, "
                                     "tracin.")
        for n in self.normalize:
            if n not in NORMALIZATIONS:
                raise GhostprojError(f"Unknown --normalize entry '{n}'; choose from {', '.join(NORMALIZATIONS)}.")
        for v in self.vectors:
            if v not in VECTORS:
                raise GhostprojError(f"Unknown --vectors entry '{v}'; choose from {', '.join(VECTORS)}.")
        for p in self.projection:
            if p not in PROJECTIONS:
                raise GhostprojError(f"Unknown --projection entry '{p}'; choose from {', '.join(PROJECTIONS)}.")
        if self.fisher_labels not in ("empirical", "sampled"):
            raise GhostprojError(f"Unknown --fisher-labels '{self.fisher_labels}'; choose empirical or sampled.")
        if not self.metrics or not self.normalize or not self.vectors or not self.projection:
            raise GhostprojError("--metrics, --normalize, --vectors and --projection each need at least one entry.")

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.epochs, self.lr, self.batch_size, self.seed)


@dataclass
class _Context:
    """The loaded model, its starting weights and the data of an evaluation."""

    model: object
    tokenizer: object
    base: dict
    pad: int
    train: list[Example]
    query: list[Example]  # with a label position
    query_rows: list[int]  # their rows in the query data
    config: dict
    notes: list[str] = field(default_factory=list)


def _load(opts: EvaluateOptions) -> _Context:
    specs = [DataSpec(path, **opts.fields) for path in (opts.train, opts.query)]
    inputs = load_model_and_examples(opts.model, specs, max_length=opts.max_length, device=opts.device,
                                     read_first=True)
    model, tokenizer, max_length = inputs.model, inputs.tokenizer, inputs.max_length
    train_data, query_data = inputs.sets
    if not any(e.n_label_positions for e in train_data.examples):
        raise GhostprojError("The training set has no example with a label token; nothing to fine-tune on.")
    query = [e for e in query_data.examples if e.n_label_positions > 0]
    if not query:
        raise GhostprojError("The query set has no example with a label token, so no query has a loss to predict "
                             "(check the completion or assistant fields).")
    if len(train_data.examples) < 4:
        raise GhostprojError(f"The training set has {len(train_data.examples)} examples; random subsets need at "
                             "least 4.")
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = {
        "model": str(Path(opts.model).resolve()) if Path(opts.model).exists() else opts.model,
        "weights_sha256": _weights_sha(base),
        "train_sha256": train_data.sha256, "query_sha256": query_data.sha256,
        "fields": opts.fields, "max_length": max_length, "recipe": opts.recipe.describe(),
        "subsets": opts.subsets, "fraction": opts.fraction, "checkpoints": opts.checkpoints,
    }
    notes = train_data.notes + query_data.notes
    dropped = len(query_data.examples) - len(query)
    if dropped:
        notes.append(f"{dropped} of {len(query_data.examples)} queries have no label token (no loss to predict) and "
                     "are left out of the LDS.")
    return _Context(model, tokenizer, base, pad_token_id(tokenizer), train_data.examples, query,
                    [e.index for e in query], config, notes)


def _weights_sha(state: dict) -> str:
    return hash_tensors(((name, state[name]) for name in sorted(state)), header="{name}", dtype=torch.float32)


def _claim(out: Path, config: dict) -> None:
    """Record the evaluation's settings in OUT, or check that OUT holds this evaluation."""
    path = out / CONFIG
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            raise GhostprojError(f"{path} is unreadable; choose another --out.") from None
        if old != config:
            changed = sorted(k for k in set(old) | set(config) if (k in old) != (k in config) or old[k] != config[k])
            raise GhostprojError(f"{out} holds an evaluation with other settings ({', '.join(changed)} differ); "
                                 "choose another --out.")
        return
    if out.exists() and (not out.is_dir() or any(not p.name.startswith(".") for p in out.iterdir())):
        # (hidden names: another part's claim being written right now)
        raise GhostprojError(f"{out} already holds files that are not an evaluation; choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(config, indent=1, sort_keys=True) + "\n").encode())


def subset_members(n: int, subsets: int, fraction: float, seed: int) -> np.ndarray:
    """[S, N] bool: subset s holds round(fraction * N) examples drawn with its own seed, so
    a subset is the same whichever process trains it."""
    size = min(n - 1, max(1, round(fraction * n)))
    members = np.zeros((subsets, n), dtype=bool)
    for s in range(subsets):
        members[s, np.random.default_rng([seed, s]).choice(n, size=size, replace=False)] = True
    return members


def _cached_tensor(path: Path, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """A cached result, or None when it is missing or damaged (then it is computed again,
    never trusted)."""
    if not path.exists():
        return None
    from safetensors.torch import load_file

    try:
        tensor = load_file(str(path))[name]
    except Exception:  # noqa: BLE001  (any damage means recomputing)
        return None
    return tensor if tuple(tensor.shape) == shape else None


def _cached_losses(path: Path, n_query: int) -> torch.Tensor | None:
    return _cached_tensor(path, "losses", (n_query,))


def _save_losses(path: Path, losses: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, encode_safetensors({"losses": losses.double()}))


def _retrained_losses(ctx: _Context, keep: np.ndarray, recipe: Recipe, path: Path) -> tuple[torch.Tensor, bool]:
    """The query losses after fine-tuning on the examples ``keep`` marks, from the cache or
    trained now; (losses, trained now)."""
    cached = _cached_losses(path, len(ctx.query))
    if cached is not None:
        return cached, False
    fine_tune(ctx.model, ctx.base, [e for e, k in zip(ctx.train, keep) if k], recipe, ctx.pad)
    losses = query_losses(ctx.model, ctx.query, ctx.pad)
    _save_losses(path, losses)
    return losses, True


def _train_subsets(ctx: _Context, opts: EvaluateOptions, members: np.ndarray, mine: list[int], out: Path) -> int:
    trained = 0
    with RateProgress("subset models", total=len(mine), unit="models", extra_unit=None,
                      enabled=opts.show_progress) as bar:
        for s in mine:
            _, now = _retrained_losses(ctx, members[s], opts.recipe, out / "subsets" / f"subset-{s:04d}.safetensors")
            trained += now
            bar.advance(1)
    return trained


def _checkpoint_dirs(opts: EvaluateOptions, out: Path) -> list[Path]:
    return [out / "checkpoints" / f"ckpt-{c + 1}" for c in range(opts.checkpoints)]


def _checkpoints(ctx: _Context, opts: EvaluateOptions, out: Path) -> tuple[list[Path], torch.Tensor]:
    """The whole-set fine-tuning run's evenly spaced checkpoints (saved once) and the query
    losses of its final model."""
    dirs = _checkpoint_dirs(opts, out)
    full = _cached_losses(out / "full.safetensors", len(ctx.query))
    if full is not None and all((d / "READY").exists() for d in dirs):
        return dirs, full
    saved = fine_tune(ctx.model, ctx.base, ctx.train, opts.recipe, ctx.pad, checkpoints=opts.checkpoints)
    for d, ck in zip(dirs, saved):
        ctx.model.load_state_dict(ck.state)
        ctx.model.save_pretrained(d)
        ctx.tokenizer.save_pretrained(d)
        tensors = {f"{n}.{kind}": t for n, (m, v) in ck.moments.items() for kind, t in (("exp_avg", m), ("exp_avg_sq", v))}
        atomic_write(d / MOMENTS, encode_safetensors(tensors, {"beta1": str(ck.betas[0]), "beta2": str(ck.betas[1]),
                                                               "eps": str(ck.eps)}))
        (d / "READY").write_text("complete\n")
    full = query_losses(ctx.model, ctx.query, ctx.pad)  # the last state is loaded
    _save_losses(out / "full.safetensors", full)
    return dirs, full


def ensemble_sizes(checkpoints: int) -> list[int]:
    """1, 2, 4, ... up to ``checkpoints``, and ``checkpoints`` itself."""
    sizes, e = [], 1
    while e < checkpoints:
        sizes.append(e)
        e *= 2
    return sizes + [checkpoints]


def ensemble_members(size: int, checkpoints: int) -> list[int]:
    """Which checkpoints (0-based) an ensemble of ``size`` uses: evenly spaced, ending with
    the last, so one checkpoint is the final model."""
    return sorted({checkpoints - 1 - round(i * checkpoints / size) for i in range(size)})


def _score_matrix(runs, members: list[int], metric: str, normalize: str, damping: float, n_train: int,
                  query_rows: list[int]) -> np.ndarray:
    """[N, M'] scores in dataset order, for the evaluated queries."""
    result = score([runs[c][0] for c in members], [runs[c][1] for c in members], metric=metric,
                   normalize=normalize, damping=damping, keep_matrix=True)
    ordered = torch.empty(n_train, result.scores.shape[1], dtype=torch.float64)
    ordered[result.train_index] = result.scores.double()
    column = {int(q): j for j, q in enumerate(result.query_index.tolist())}
    return ordered[:, [column[r] for r in query_rows]].numpy()


def _settings(opts: EvaluateOptions, runs: dict, members: np.ndarray, losses: np.ndarray, ctx: _Context, out: Path):
    """Every (metric, normalization, ensemble, training vectors) with its LDS, and the score
    matrices by :attr:`Setting.key`; the in-run values once (they come from the whole
    training run, not from checkpoints)."""
    draws = resamples(members.shape[0], losses.shape[1], opts.replicates, opts.seed)
    settings, matrices = [], {}

    def add(setting_args, m):
        setting = Setting(*setting_args[:3], estimate_lds(m, members, losses, draws), setting_args[3])
        settings.append(setting)
        matrices[setting.key] = m

    for metric in opts.metrics:
        if metric in ("inrun", "tracin"):  # from the whole training run, not from checkpoints
            add((metric, "none", 1 if metric == "inrun" else opts.checkpoints, "grad"),
                _in_run_matrix(ctx, opts, out) if metric == "inrun" else
                tracin_scores(ctx, opts, out, _checkpoint_dirs(opts, out)))
            continue
        for vectors in runs:
            for normalize in opts.normalize:
                for size in ensemble_sizes(opts.checkpoints):
                    m = _score_matrix(runs[vectors], ensemble_members(size, opts.checkpoints), metric, normalize,
                                      opts.damping, len(ctx.train), ctx.query_rows)
                    add((metric, normalize, size, vectors), m)
    return settings, matrices


def _in_run_matrix(ctx: _Context, opts: EvaluateOptions, out: Path) -> np.ndarray:
    """[N, M'] in-run values of the whole-set fine-tuning with the queries carried in every
    step (computed once, cached)."""
    path = out / "inrun.safetensors"
    cached = _cached_tensor(path, "scores", (len(ctx.train), len(ctx.query)))
    if cached is not None:
        return cached.numpy()
    if len(ctx.query) > MAX_VAL_BATCH:
        raise GhostprojError(f"--metrics inrun carries every query in each training step; {len(ctx.query)} queries "
                             f"is more than the {MAX_VAL_BATCH} allowed (use fewer queries or drop inrun).")
    scores = in_run_scores(ctx.model, ctx.base, ctx.train, ctx.query, opts.recipe, ctx.pad)
    atomic_write(path, encode_safetensors({"scores": scores}))
    return scores.numpy()


def _removal(ctx: _Context, opts: EvaluateOptions, matrices: dict, compared: list[Setting], full: torch.Tensor,
             out: Path) -> list[dict]:
    """Per compared setting: the mean query-loss change after removing each sampled query's
    top-k training examples and fine-tuning again, against removing k random ones."""
    n = len(ctx.train)
    k = opts.removal_k if opts.removal_k is not None else max(1, round(0.05 * n))
    if opts.removal_queries == 0 or k >= n:
        return []
    rng = np.random.default_rng([opts.seed, 1])
    picked = sorted(rng.choice(len(ctx.query), size=min(opts.removal_queries, len(ctx.query)), replace=False))
    rows = []
    for setting in [None] + compared:
        deltas = []
        for j in picked:
            if setting is None:
                removed = np.random.default_rng([opts.seed, 2, int(j)]).choice(n, size=k, replace=False)
            else:
                m = matrices[setting.key]
                removed = np.argsort(-m[:, j], kind="stable")[:k]
            keep = np.ones(n, dtype=bool)
            keep[removed] = False
            # cached under the removed set itself: settings that remove the same examples share it
            tag = hashlib.sha256(np.sort(removed).astype(np.int64).tobytes()).hexdigest()[:16]
            losses, _ = _retrained_losses(ctx, keep, opts.recipe, out / "removal" / f"q{j}-{tag}.safetensors")
            deltas.append(float(losses[j] - full[j]))
        rows.append({"setting": "random" if setting is None else setting.name, "k": k, "queries": len(picked),
                     "mean_loss_change": float(np.mean(deltas)), "per_query": deltas})
    return rows


def _parts(opts: EvaluateOptions) -> tuple[int, int, bool]:
    """(this process's part, number of parts, under torchrun). Under torchrun each rank
    takes the GPU of its LOCAL_RANK (``opts.device`` is set to it)."""
    from ..distributed import device_for_this_process, distributed_rank
    from ..models import resolve_device

    opts.device = device_for_this_process(opts.device)
    ranks = distributed_rank(resolve_device(opts.device))
    if ranks is not None:
        if opts.num_parts > 1:
            raise GhostprojError("Under torchrun each rank trains its own subsets; drop --num-parts and --part.")
        return ranks[0], ranks[1], True
    return opts.part, opts.num_parts, False


def run_evaluate(opts: EvaluateOptions) -> EvaluateResult:
    t0 = time.perf_counter()
    if opts.model is None or opts.train is None or opts.query is None:
        raise GhostprojError("evaluate needs a model, training data and query data.")
    part, num_parts, under_torchrun = _parts(opts)
    check_output_dir(opts.out, "--out", [opts.model, opts.train, opts.query])
    ctx = _load(opts)
    out = Path(opts.out)
    if under_torchrun:
        import torch.distributed as td

        if part == 0:
            _claim(out, ctx.config)
        td.barrier()  # rank 0 has claimed the directory
    _claim(out, ctx.config)
    members = subset_members(len(ctx.train), opts.subsets, opts.fraction, opts.seed)
    result = EvaluateResult(out, opts.subsets, len(ctx.train), len(ctx.query), rank=part if under_torchrun else None,
                            rank_setting=opts.rank, layers_setting=opts.layers, notes=list(ctx.notes))
    result.trained = _train_subsets(ctx, opts, members, list(range(part, opts.subsets, num_parts)), out)
    if not under_torchrun and num_parts > 1:
        result.finished = False
        return result
    if under_torchrun:
        td.barrier()  # every rank's subsets are on disk
    if part == 0:
        dirs, full = _checkpoints(ctx, opts, out)
    if under_torchrun:
        td.barrier()  # the checkpoints are saved: every rank projects its share of the examples
        dirs = _checkpoint_dirs(opts, out)
    runs = project_checkpoints(opts, dirs, out)
    if part != 0:
        result.finished = False
        return result
    losses = np.stack([_retrained_losses(ctx, members[s], opts.recipe,
                                         out / "subsets" / f"subset-{s:04d}.safetensors")[0].numpy()
                       for s in range(opts.subsets)])
    result.settings, matrices = _settings(opts, runs, members, losses, ctx, out)
    result.best = max(result.settings, key=lambda s: s.lds.value)
    result.baseline = next((s for s in result.settings if s.key == ("dot", "none", 1, "grad")), None)
    compared = [result.best] + ([result.baseline] if result.baseline not in (None, result.best) else [])
    if result.baseline is not None and result.baseline is not result.best:
        result.difference = difference_interval(result.best.lds, result.baseline.lds)
    result.recommended = next((s for s in result.settings
                               if s.key == (DEFAULT_METRIC, DEFAULT_NORMALIZE, opts.checkpoints, "grad")), None)
    if result.recommended is not None and result.baseline is not None and result.recommended is not result.baseline:
        result.recommended_difference = difference_interval(result.recommended.lds, result.baseline.lds)
    if opts.checkpoints > 1 and result.best.metric not in ("inrun", "tracin"):
        same = {s.checkpoints: s for s in result.settings
                if (s.metric, s.normalize, s.vectors) == (result.best.metric, result.best.normalize, result.best.vectors)}
        result.ensemble_gain = difference_interval(same[opts.checkpoints].lds, same[1].lds)
    result.removal = _removal(ctx, opts, matrices, compared, full, out)
    write_report(result, out / "lds.json")
    result.plot = plot_report(result, out / "lds.png", result.notes)
    result.seconds = time.perf_counter() - t0
    return result
