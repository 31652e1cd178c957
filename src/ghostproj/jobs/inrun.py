"""The in-run valuation job: fine-tune with GradDotProdEngine attached and record, per step,
every training example's gradient dot product with the validation batch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.batching import Example
from ..data.readers import DataSpec, LayoutFields
from ..data.records import example_text
from ..engines.coverage import Coverage, coverage_notes, layer_parameters, model_coverage
from ..engines.dotprod import GradDotProdEngine
from ..errors import GhostprojError
from ..inputs import load_model_and_examples
from ..models import pad_token_id
from ..progress import RateProgress
from ..store.files import atomic_write
from ..store.outputs import check_output_dir
from ..store.shards import encode_safetensors
from .retrain import in_run_step, seeded_batches

MAX_VAL_BATCH = 512  # every step carries the whole validation batch


@dataclass
class InrunOptions(LayoutFields):
    """Options of ``ghostproj inrun`` (the command line is made from these fields); the
    command line puts the embedded demo in place of a missing model and data."""

    model: str | None = None
    train: str | None = None
    val: str | None = None
    out: str = "inrun-out"
    steps: int = 100
    batch_size: int = 8
    lr: float = 1e-4
    optimizer: str = "adamw"
    val_size: int | None = None
    seed: int = 0
    max_length: int = 512
    device: str = "auto"
    uncovered: str = "error"
    show_progress: bool = True

    def __post_init__(self):
        if self.steps <= 0:
            raise GhostprojError(f"--steps must be at least 1, got {self.steps}.")
        if self.batch_size < 1:
            raise GhostprojError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.optimizer not in ("sgd", "adamw"):
            raise GhostprojError(f"Unknown --optimizer '{self.optimizer}'; choose sgd or adamw.")
        if not self.lr > 0:
            raise GhostprojError(f"--lr must be positive, got {self.lr}.")
        if self.val_size is not None and self.val_size < 1:
            raise GhostprojError(f"--val-size must be at least 1, got {self.val_size}.")


@dataclass
class InrunResult:
    out: Path
    steps: int
    train_count: int
    val_count: int
    final_loss: float
    seconds: float
    values: torch.Tensor  # [N_train]
    counts: torch.Tensor  # [N_train] times each example was drawn
    train_texts: list[str]
    notes: list[str] = field(default_factory=list)
    coverage: str = ""  # what share of the model the dot products cover, in words


def _check_out(opts: InrunOptions) -> None:
    out = check_output_dir(opts.out, "--out", [opts.model, opts.train, opts.val])
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GhostprojError(f"Output directory {out} already holds files; choose another --out.")


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Seeded batches: a fresh permutation each epoch, consecutive slices of it."""
    return [torch.tensor(b) for b in seeded_batches(n, batch_size, seed, steps=steps)]


def run_inrun(opts: InrunOptions) -> InrunResult:
    t0 = time.perf_counter()
    _check_out(opts)
    model, tokenizer, train_spec, (train_data, val_data) = _load(opts)
    train, val = train_data.examples, _validation_batch(val_data.examples, opts.val_size)
    batch_size = min(opts.batch_size, len(train))
    log = _train(model, pad_token_id(tokenizer), train, val, batch_size, opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"seed": str(opts.seed), "batch_size": str(batch_size), "val_count": str(len(val)), "lr": str(opts.lr),
            "optimizer": opts.optimizer, "train": str(Path(opts.train).resolve()), "val": str(Path(opts.val).resolve())}
    atomic_write(out / "dots.safetensors", encode_safetensors(
        {"step": torch.cat(log.steps), "index": torch.cat(log.index), "dot": torch.cat(log.dots)}, meta))
    atomic_write(out / "values.safetensors", encode_safetensors(
        {"index": torch.arange(len(train)), "value": log.values.float(), "count": log.counts}, meta))
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    texts = ([example_text(train_data.records, i, train_spec.describe()) for i in range(len(train))]
             if train_data.records is not None else [""] * len(train))
    return InrunResult(out, opts.steps, len(train), len(val), log.loss, time.perf_counter() - t0,
                       log.values.float(), log.counts, texts,
                       train_data.notes + val_data.notes + coverage_notes(log.coverage), log.coverage.describe())


def _load(opts: InrunOptions):
    """(model, tokenizer, the training data's spec, (training data, validation data)), read as
    `project` reads data."""
    specs = [DataSpec(path, **opts.fields) for path in (opts.train, opts.val)]
    inputs = load_model_and_examples(opts.model, specs, max_length=opts.max_length, device=opts.device,
                                     read_first=True)
    return inputs.model, inputs.tokenizer, specs[0], tuple(inputs.sets)


def _validation_batch(val: list[Example], val_size: int | None) -> list[Example]:
    if val_size is not None:
        if val_size > len(val):
            raise GhostprojError(f"--val-size {val_size} is larger than the {len(val)} validation examples.")
        val = val[:val_size]
    val = [e for e in val if e.n_label_positions > 0]
    if not val:
        raise GhostprojError("The validation set has no example with a label position.")
    if len(val) > MAX_VAL_BATCH:
        raise GhostprojError(
            f"The validation batch of {len(val)} examples is larger than the {MAX_VAL_BATCH} allowed; pass --val-size."
        )
    return val


@dataclass
class _Log:
    """What training recorded: per step and drawn example, its dot product; per example,
    its value and how often it was drawn; the last training loss."""

    values: torch.Tensor
    counts: torch.Tensor
    steps: list[torch.Tensor] = field(default_factory=list)
    index: list[torch.Tensor] = field(default_factory=list)
    dots: list[torch.Tensor] = field(default_factory=list)
    loss: float = float("nan")
    coverage: Coverage | None = None


def _train(model, pad: int, train: list[Example], val: list[Example], batch_size: int, opts: InrunOptions) -> _Log:
    device = next(model.parameters()).device
    model.train()  # dropout as the checkpoint configures it
    engine = GradDotProdEngine(model, val_batch_size=len(val), loss_reduction="sum", uncovered=opts.uncovered)
    # a captured layer's weight and bias both take part in the dot products
    coverage = model_coverage(model, layer_parameters({n: m for n, (m, _) in engine.captured.items()}, bias=True))
    params = list(model.parameters())  # frozen uncovered ones get no gradient, so no update
    optimizer = (torch.optim.SGD if opts.optimizer == "sgd" else torch.optim.AdamW)(params, lr=opts.lr)
    torch.manual_seed(opts.seed)  # dropout masks
    log = _Log(torch.zeros(len(train), dtype=torch.float64), torch.zeros(len(train), dtype=torch.int64),
               coverage=coverage)
    engine.attach()
    try:
        with RateProgress("training", total=opts.steps, unit="steps", extra_unit=None,
                          enabled=opts.show_progress) as bar:
            for step, idx in enumerate(batch_order(len(train), batch_size, opts.steps, opts.seed)):
                lr = optimizer.param_groups[0]["lr"]
                losses, dots = in_run_step(model, engine, optimizer, [train[i] for i in idx.tolist()] + val, pad,
                                           device)
                log.values.index_add_(0, idx, -lr * dots)
                log.counts.index_add_(0, idx, torch.ones_like(idx))
                log.steps.append(torch.full((len(idx),), step, dtype=torch.int64))
                log.index.append(idx.clone())
                log.dots.append(dots.float())
                log.loss = float(losses[: len(idx)].detach().mean())
                bar.advance(1)
                bar.set_text(f"loss {log.loss:.3f}")
    finally:
        engine.detach()
    return log
