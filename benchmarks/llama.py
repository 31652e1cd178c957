"""The Llama shapes the benchmarks measure, built from a config with seeded weights."""

from __future__ import annotations

import torch

# SmolLM2-135M's shape: 30 blocks of width 576, 7 Linear layers each (210 projected layers).
SMOLLM2_135M = dict(layers=30, width=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152, tied=True)


def build_llama(layers: int, width: int, vocab: int, positions: int, intermediate: int | None = None,
                heads: int = 4, kv_heads: int = 2, tied: bool = False, device="cpu", dtype=torch.float32):
    """A Llama in eval mode (no dropout); ``tied``: input and output embeddings share a weight."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=intermediate or 2 * width,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=positions, tie_word_embeddings=tied,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
