"""The GPT-2 the benchmarks measure, built from a config with seeded weights, and the
command-line options that shape it."""

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


def add_model_args(ap) -> None:
    """--layers/--embd/--vocab/--seq (defaults: the benchmark model of the goals), --repeats
    and --device."""
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
