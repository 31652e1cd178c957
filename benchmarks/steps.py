"""The three steps the engine benchmarks compare, over one batch of token ids:

  train    forward + backward, every weight requiring grad (a plain training step)
  floor    forward + backward through activations only: weights frozen, the gradient
           entering at ``first_block``'s input (the least any projection can cost)
  project  the engine attached once for a run of calls, as `ghostproj project` does;
           collect() included
"""

from __future__ import annotations

import torch

from ghostproj.engines.losses import causal_lm_losses
from ghostproj.engines.projection import GradProjectionEngine


def step_modes(model, ids, first_block: torch.nn.Module, layers=None, rank: int = 256, compiled=None):
    """({'train', 'floor', 'project'}: callables, the engine). ``compiled`` is the model to
    call instead (the same model under torch.compile); the engine wraps the eager modules."""
    call = compiled if compiled is not None else model

    def loss():
        return causal_lm_losses(call(input_ids=ids).logits, ids)[0].sum()

    engine = GradProjectionEngine(model, layers, rank=rank)

    def train():
        if engine.attached:
            engine.detach()
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        loss().backward()

    def floor():
        if engine.attached:
            engine.detach()
        for p in model.parameters():
            p.requires_grad_(False)
        handle = first_block.register_forward_pre_hook(
            lambda m, a, kw: ((a[0].detach().requires_grad_(True),) + a[1:], kw) if a else
            ((), {**kw, "hidden_states": kw["hidden_states"].detach().requires_grad_(True)}), with_kwargs=True)
        try:
            loss().backward()
        finally:
            handle.remove()

    def project():
        if not engine.attached:
            engine.attach()
        engine.prepare(ids.shape[0], ids.device)  # the step begins outside any compiled graph
        loss().backward()
        engine.collect()
    return {"train": train, "floor": floor, "project": project}, engine
