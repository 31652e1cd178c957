"""The GPT-2 the benchmarks measure, built from a config with seeded weights."""

from __future__ import annotations

import torch


def build_gpt2(n_layer: int, n_embd: int, vocab: int, positions: int, device, dtype=torch.float32):
    """A GPT-2 with one head per 64 channels, in eval mode; call ``.train()`` for dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=n_embd, n_layer=n_layer,
                     n_head=max(1, n_embd // 64), bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()
