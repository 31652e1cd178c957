"""The projection runs of an evaluation: each kept checkpoint's training and query runs
(random matrices, Adam directions or the Kronecker eigenbasis), cached in its output
directory under the rank and layers they were projected with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..engines.factors import EIGEN
from ..errors import GhostprojError

MOMENTS = "adam-moments.safetensors"  # the optimizer's moments at a checkpoint


def project_checkpoints(opts, dirs: list[Path], out: Path) -> dict[str, list[tuple[Path, Path]]]:
    """Per kind of training vectors, (training run, query run) per checkpoint, each
    checkpoint projected with its own seed (:func:`projection_seed`); Adam directions use
    their checkpoint's gradient run's matrices (``--like``) and the same query run."""
    from .project import ProjectOptions, run_project

    runs: dict[str, list[tuple[Path, Path]]] = {v: [] for v in opts.vectors if "gaussian" in opts.projection}
    if EIGEN in opts.projection:
        runs[EIGEN] = []
    for c, d in enumerate(dirs, start=1):
        seed = projection_seed(c, len(dirs))
        where = out / "runs" / projection_key(opts) / f"ckpt-{c}-seed-{seed}"
        train_dir, query_dir = where / "train", where / "query"
        common = dict(model=str(d), max_length=opts.max_length, device=opts.device, batch_size=opts.batch_size,
                      show_progress=opts.show_progress, **opts.fields)
        if EIGEN in runs:
            runs[EIGEN].append(project_eigen(opts, d, where, common))
        if "gaussian" not in opts.projection:
            continue
        run_project(ProjectOptions(data=opts.train, out=str(train_dir), layers=opts.layers, rank=opts.rank,
                                   seed=seed, **common))
        run_project(ProjectOptions(data=opts.query, out=str(query_dir), like=str(train_dir), **common))
        if "grad" in runs:
            runs["grad"].append((train_dir, query_dir))
        if "adam" in runs:
            if not (d / MOMENTS).exists():
                raise GhostprojError(f"{d} has no optimizer moments ({MOMENTS}); use a new --out for --vectors adam.")
            adam_dir = where / "train-adam"
            run_project(ProjectOptions(data=opts.train, out=str(adam_dir), like=str(train_dir),
                                       optimizer_state=str(d / MOMENTS), **common))
            runs["adam"].append((adam_dir, query_dir))
    return runs


def project_eigen(opts, checkpoint: Path, where: Path, common: dict) -> tuple[Path, Path]:
    """(training run, query run) of one checkpoint in the Kronecker eigenbasis of its own
    factors over the training set (cached like every run)."""
    from .factors import FactorsOptions, run_factors
    from .project import ProjectOptions, run_project

    tag = "" if opts.fisher_labels == "empirical" else "-" + opts.fisher_labels
    factors = where / f"factors{tag}.safetensors"
    if not factors.exists():
        where.mkdir(parents=True, exist_ok=True)
        run_factors(FactorsOptions(model=str(checkpoint), data=opts.train, out=str(factors), layers=opts.layers,
                                   max_length=opts.max_length, device=opts.device, batch_size=opts.batch_size,
                                   fisher_labels=opts.fisher_labels, show_progress=opts.show_progress,
                                   **opts.fields))
    train_dir, query_dir = where / f"train-eigen{tag}", where / f"query-eigen{tag}"
    run_project(ProjectOptions(data=opts.train, out=str(train_dir), layers=opts.layers, rank=opts.rank,
                               factors=str(factors), **common))
    run_project(ProjectOptions(data=opts.query, out=str(query_dir), like=str(train_dir), **common))
    return train_dir, query_dir


def projection_seed(checkpoint: int, checkpoints: int) -> int:
    """Checkpoint c's (1-based) projection seed, C - c: the final model gets `project`'s
    default (0) and every other checkpoint matrices of its own. Checkpoints that share
    their matrices share their projection error too, and an ensemble cannot average it
    away (measured in the README, "Checking attribution")."""
    return checkpoints - checkpoint


def projection_key(opts) -> str:
    """The runs' directory name for this --rank and --layers: the trained models do not
    depend on them, so one evaluation can be scored at several ranks or layer choices."""
    layers = hashlib.sha256(json.dumps(opts.layers).encode()).hexdigest()[:8] if opts.layers else "all"
    return f"rank-{opts.rank or 'default'}-layers-{layers}"
