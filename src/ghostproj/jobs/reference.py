"""The slow exact computation every check compares with: each example alone (batch size 1,
no padding), full autograd on the chosen layers' weights, the loss written independently
of :mod:`ghostproj.engines.losses`."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import IGNORE_INDEX, Example, collate
from ..engines.layer_types import projectable_type


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """The loss of one unpadded example: next-token cross-entropy over its label positions."""
    target = labels[0, 1:]
    keep = target != IGNORE_INDEX
    return F.cross_entropy(logits[0, :-1][keep].float(), target[keep], reduction=reduction)


def per_example_weight_grads(model: nn.Module, examples: list[Example], names: list[str] | dict[str, nn.Module],
                             loss_reduction: str = "mean", bias: bool = False
                             ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(row, {layer: G float64 [n_out, n_in] (+ a bias column with ``bias``)}) for each example
    that has a label position, by autograd on that example alone; every parameter's
    ``requires_grad`` is restored afterwards. ``names`` are module names, or {layer: its
    module} where a layer is a part of one (an engine's ``modules``)."""
    modules = names if isinstance(names, dict) else {n: m for n, m in model.named_modules() if n in set(names)}
    names = list(modules)
    saved = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    targets = []
    for n in names:
        targets.append(projectable_type(modules[n]).part_parameter(modules[n], n))
        if bias and projectable_type(modules[n]).has_bias_column:
            targets.append(modules[n].bias)
    for t in targets:
        t.requires_grad_(True)
    device = next(model.parameters()).device
    try:
        for row, ex in enumerate(examples):
            if ex.n_label_positions == 0:
                continue
            batch = collate([ex]).to(device)
            for t in targets:
                t.grad = None
            reference_loss(model(input_ids=batch.input_ids).logits, batch.labels, loss_reduction).backward()
            grads = {}
            for n in names:
                m = modules[n]
                g = projectable_type(m).part_grad(m, n).double().cpu()
                if bias and projectable_type(m).has_bias_column:
                    g = torch.cat([g, m.bias.grad.double().cpu()[:, None]], dim=1)
                grads[n] = g
            yield row, grads
    finally:
        for t in targets:
            t.grad = None
        for p, flag in saved:
            p.requires_grad_(flag)
