"""Per-example causal-LM losses that do not depend on what else is in the batch.

HF's ``labels=`` loss averages over every label token of the whole batch, so one
example's gradient would shrink when a long neighbour joins its batch. Here each example
is averaged over its own label positions (or summed), and the engine back-propagates the
sum over examples, which makes the output gradient reaching a layer for example i
exactly d l_i / d y_i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.batching import IGNORE_INDEX

LOSS_REDUCTIONS = ("mean", "sum")


def causal_lm_losses(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example losses [B] (float32) and label-position counts [B] (int).

    ``labels`` is [B, T] with IGNORE_INDEX on padding and masked prompt tokens; the usual
    one-token shift is applied here (logits at t-1 predict the token at t). An example with
    no label position has loss 0 and contributes no gradient.
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"reduction must be one of {LOSS_REDUCTIONS}, not {reduction!r}")
    b, t, v = logits.shape
    # Shift the labels, not the logits: logits stay one contiguous [B*T, V] block (no copy),
    # and the last position gets no target.
    target = torch.full((b, t), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    target[:, :-1] = labels[:, 1:]
    mask = target != IGNORE_INDEX
    # Ignored positions contribute exactly 0 to the loss and to the gradient. Rows made only
    # of padding are never run (examples without a label position are skipped upstream).
    token_loss = F.cross_entropy(logits.reshape(b * t, v).float(), target.reshape(-1), reduction="none",
                                 ignore_index=IGNORE_INDEX).view(b, t)
    counts = mask.sum(dim=1)
    losses = token_loss.sum(dim=1)
    if reduction == "mean":
        losses = losses / counts.clamp(min=1).to(losses.dtype)
    return losses, counts
