"""TracIn-CP from a training-time gradient store: ``evaluate --metrics tracin``.

The whole-set fine-tuning runs once more with a :class:`GradientStore` attached, which
stores each example's projected gradient at the step that drew it, one run per stretch
between checkpoints (``window-0`` from the base model, ``window-c`` from checkpoint c).
Each window's queries are projected ``--like`` it on the model the window starts from,
and

    score(i, q) = sum over the steps t that drew i of  lr_t / B_t * <g_i(theta_t), g_q(theta_c(t))>

where lr_t / B_t is the weight the step's update gave example i (the loss is a mean over
the batch) and c(t) the checkpoint that starts t's window. With the query gradient taken
at theta_t itself (and no projection) this is the in-run attribution of ``--metrics
inrun``; the store lets the query side wait until training is over."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .. import defaults
from ..errors import GhostprojError
from ..store.files import atomic_write
from ..store.fingerprint import differing_part
from ..store.shards import encode_safetensors
from .evaluate_runs import projection_key


class _WindowRecorder:
    """The fine-tuning's hook into the store: each step's rows, labels and update weight;
    a new window at each checkpoint."""

    def __init__(self, store, checkpoints: int) -> None:
        self.store, self.checkpoints = store, checkpoints
        self.windows: list[dict] = []  # window-0 opens at the first step, once the model is reset

    def _open(self, c: int, step: int) -> None:
        self.store.open_window(f"window-{c}", step)
        self.windows.append({"dir": self.store.windows[-1], "start": c, "rows": [], "weights": []})

    @contextmanager
    def step(self, step: int, rows: list[int], labels: torch.Tensor, lr: float):
        if not self.windows:
            self._open(0, 0)
        with self.store.observing(step, torch.tensor(rows), labels):
            yield
        self.store.mark_step(step + 1)
        self.windows[-1]["rows"] += rows
        self.windows[-1]["weights"] += [lr / len(rows)] * len(rows)

    def checkpoint(self, c: int, step: int) -> None:
        """Checkpoint ``c`` (1-based) was saved after ``step``: its window starts."""
        self.store.close_window()
        if c < self.checkpoints:
            self._open(c, step)


def tracin_scores(ctx, opts, out: Path, checkpoint_dirs: list[Path]) -> np.ndarray:
    """[N, M'] TracIn-CP scores in dataset order for the evaluated queries (cached)."""
    from ..integrations.transformers import GradientStore
    from .retrain import fine_tune

    where = out / "tracin" / projection_key(opts)
    cached = where.with_suffix(".safetensors")
    if cached.is_file():
        from safetensors.torch import load_file

        scores = load_file(cached)["scores"]
        if scores.shape == (len(ctx.train), len(ctx.query)):
            return scores.numpy()
    shutil.rmtree(where, ignore_errors=True)  # what a killed attempt left: recomputed whole
    store = GradientStore(ctx.model, where, len(ctx.train), layers=opts.layers, rank=opts.rank or defaults.RANK,
                          store_dtype="float32")
    try:
        recorder = _WindowRecorder(store, opts.checkpoints)
        fine_tune(ctx.model, ctx.base, ctx.train, opts.recipe, ctx.pad, recorder=recorder)
    finally:
        store.close()
    starts = [opts.model] + [str(d) for d in checkpoint_dirs]
    scores = torch.zeros(len(ctx.train), len(ctx.query), dtype=torch.float64)
    for window in recorder.windows:
        if window["rows"]:
            scores += _window_scores(window, starts[window["start"]], ctx, opts)
    atomic_write(cached, encode_safetensors({"scores": scores}))
    return scores.numpy()


def _window_scores(window: dict, start_model: str, ctx, opts) -> torch.Tensor:
    from ..scoring import load_projections
    from .project import ProjectOptions, run_project

    query_dir = window["dir"].with_name(window["dir"].name + "-query")
    run_project(ProjectOptions(data=opts.query, out=str(query_dir), like=str(window["dir"]), model=start_model,
                               max_length=opts.max_length, device=opts.device, batch_size=opts.batch_size,
                               store_dtype="float32", show_progress=False, **opts.fields))
    train, query = load_projections(window["dir"]), load_projections(query_dir)
    differs = differing_part(train.manifest, query.manifest)
    if differs is not None:
        raise GhostprojError(f"The queries of {window['dir']} were projected with other {differs} than the window "
                             f"(on {start_model}); remove {window['dir'].parent} and rerun.")
    if train.index.tolist() != window["rows"]:  # the stream's order is the order the weights were recorded in
        raise GhostprojError(f"{window['dir']} does not hold the rows the fine-tuning drew; remove it and rerun.")
    column = {int(r): j for j, r in enumerate(query.index.tolist())}
    q = query.grads.double()[[column[r] for r in ctx.query_rows]]
    weights = torch.tensor(window["weights"], dtype=torch.float64)
    scores = torch.zeros(len(ctx.train), len(ctx.query_rows), dtype=torch.float64)
    scores.index_add_(0, train.index, (train.grads.double() * weights[:, None]) @ q.t())
    return scores
