"""Fine-tuning copies of one model on subsets of a training set, and measuring query losses
under them: the counterfactuals that attribution scores are checked against."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from ..data.batching import Example, collate
from ..engines.losses import causal_lm_losses


@dataclass(frozen=True)
class Recipe:
    """How every model of an evaluation is fine-tuned: AdamW, linear decay to zero over
    ``epochs`` passes in a seeded order. Each subset model uses the same seed, so subsets
    differ in their data, not in their dropout masks' seed."""

    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 16
    seed: int = 0

    def describe(self) -> dict:
        return asdict(self)


def seeded_batches(n: int, batch_size: int, seed: int, *, epochs: int | None = None,
                   steps: int | None = None) -> list[list[int]]:
    """The one batch order of every training loop here: a fresh seeded permutation of the
    n examples per epoch. With ``epochs``, each epoch's slices (the last one smaller);
    with ``steps``, that many full batches of consecutive slices across epochs."""
    g = torch.Generator().manual_seed(seed)
    if epochs is not None:
        out = []
        for _ in range(epochs):
            order = torch.randperm(n, generator=g).tolist()
            out += [order[i : i + batch_size] for i in range(0, n, batch_size)]
        return out
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n, generator=g).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def epoch_batches(n: int, recipe: Recipe) -> list[list[int]]:
    return seeded_batches(n, recipe.batch_size, recipe.seed, epochs=recipe.epochs)


def in_run_step(model, engine, optimizer, examples: list[Example], pad_id: int, device) -> tuple:
    """One training step that carries the engine's validation examples (after ``examples``):
    (the per-example losses, each training example's dot products with the validation
    gradient). The optimizer sees the training part's gradient only."""
    batch = collate(examples, pad_id).to(device)
    losses, _ = causal_lm_losses(model(**batch.model_inputs()).logits, batch.labels, "mean")
    losses.sum().backward()
    dots = engine.aggregate().detach().double().cpu()
    engine.prepare_gradients()
    optimizer.step()
    engine.clear_gradients()
    return losses, dots


@dataclass
class Checkpoint:
    """A model's weights during fine-tuning, with the optimizer's Adam moments at that step
    ({parameter name: (exp_avg, exp_avg_sq)}, and b1, b2, eps): what optimizer-aware
    training vectors are projected with."""

    state: dict
    moments: dict
    betas: tuple[float, float]
    eps: float


def fine_tune(model, base_state: dict, examples: list[Example], recipe: Recipe, pad_id: int,
              checkpoints: int = 0, recorder=None) -> list[Checkpoint]:
    """Reset ``model`` to ``base_state`` and fine-tune it on ``examples`` (mean token loss
    per example, averaged over the batch). Returns ``checkpoints`` evenly spaced
    checkpoints (the last one is the end of training); none when 0. ``recorder`` (a
    training-time store's, with ``recorder.checkpoints`` marks) observes every step."""
    run = _TrainingRun(model, base_state, examples, recipe)
    total = len(run.batches)
    count = recorder.checkpoints if recorder is not None else checkpoints
    marks = [max(1, round(total * (c + 1) / count)) if total else 0 for c in range(count)]
    saved = [_checkpoint(model, run.optimizer) for m in marks[:checkpoints] if m == 0]
    for step, chosen in enumerate(run.batches, start=1):
        batch = collate([examples[i] for i in chosen], pad_id).to(run.device)
        lr = run.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        with recorder.step(step - 1, chosen, batch.labels, lr) if recorder is not None else nullcontext():
            losses, _ = causal_lm_losses(model(**batch.model_inputs()).logits, batch.labels, "mean")
            run.optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
        run.optimizer.step()
        run.schedule.step()
        saved += [_checkpoint(model, run.optimizer) for m in marks[:checkpoints] if m == step]
        for c, m in enumerate(marks, start=1):
            if recorder is not None and m == step:
                recorder.checkpoint(c, step)
    model.eval()
    return saved


class _TrainingRun:
    """What every fine-tuning of an evaluation starts from: ``model`` reset to the base
    weights in train mode, the seeded batches (dataset rows of the examples with a label
    position), AdamW with linear decay to zero, and the seeded dropout stream."""

    def __init__(self, model, base_state: dict, examples: list[Example], recipe: Recipe) -> None:
        model.load_state_dict(base_state)
        self.device = next(model.parameters()).device
        live = [r for r, e in enumerate(examples) if e.n_label_positions > 0]
        self.batches = [[live[r] for r in rows] for rows in epoch_batches(len(live), recipe)]
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
        total = max(1, len(self.batches))
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0 - step / total)
        torch.manual_seed(recipe.seed)  # dropout masks
        model.train()


def _checkpoint(model, optimizer) -> Checkpoint:
    moments = {}
    for name, p in model.named_parameters():
        st = optimizer.state.get(p, {})
        if "exp_avg" in st:
            moments[name] = (st["exp_avg"].detach().clone(), st["exp_avg_sq"].detach().clone())
    group = optimizer.param_groups[0]
    return Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, moments,
                      tuple(group["betas"]), float(group["eps"]))


@torch.no_grad()
def query_losses(model, examples: list[Example], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """Each example's mean token loss [M] (float64) under ``model`` in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id).to(device)
        losses, _ = causal_lm_losses(model(**batch.model_inputs()).logits, batch.labels, "mean")
        out.append(losses.double().cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def in_run_scores(model, base_state: dict, examples: list[Example], queries: list[Example], recipe: Recipe,
                  pad_id: int) -> torch.Tensor:
    """In-run attribution [N, M] (float64): the whole-set fine-tuning of :func:`fine_tune`
    with every query carried in each step, summing lr_t * <grad l_i, grad l_q> over the
    steps that drew example i (the first-order drop in query q's loss that the example's
    updates caused). Rows of examples with no label position stay 0."""
    from ..engines.dotprod import GradDotProdEngine

    scores = torch.zeros(len(examples), len(queries), dtype=torch.float64)
    engine = GradDotProdEngine(model, val_batch_size=len(queries), per_query=True, loss_reduction="sum",
                               uncovered="freeze")
    run = _TrainingRun(model, base_state, examples, recipe)
    optimizer = run.optimizer
    engine.attach()
    try:
        for chosen in run.batches:
            lr = optimizer.param_groups[0]["lr"]  # the rate this step's update uses
            _, dots = in_run_step(model, engine, optimizer, [examples[i] for i in chosen] + queries, pad_id,
                                  run.device)  # dots [B, M]
            scores.index_add_(0, torch.tensor(chosen), lr * dots / len(chosen))
            run.schedule.step()
    finally:
        engine.detach()
    model.eval()
    return scores
