"""What optimizer-aware vectors (`project --optimizer-state`) cost against plain projection.

The Adam direction is elementwise in each example's full per-layer gradient, so this mode
forms B x n_out x n_in gradients per layer before projecting; plain projection never does.
Times the engine step (forward, backward, vectors) of both on the same batches, alternating,
on the benchmark GPT-2 (all Conv1D layers, rank 256), and prints the ratio.

    python benchmarks/bench_adam.py [--layers 4 --embd 256 --vocab 8192 --seq 128] [--batch 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from gpt2 import add_model_args, build_gpt2
from safetensors.torch import save_file

from ghostproj.engines.adam import AdamDirectionEngine
from ghostproj.engines.losses import causal_lm_losses
from ghostproj.engines.projection import GradProjectionEngine


def moments_file(model, path: Path) -> None:
    """Plausible Adam moments: the squared and plain gradient of one batch, scaled."""
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (4, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    tensors = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            tensors[f"{name}.exp_avg"] = (0.1 * p.grad).contiguous()
            tensors[f"{name}.exp_avg_sq"] = (0.001 * p.grad * p.grad + 1e-12).contiguous()
    model.zero_grad(set_to_none=True)
    save_file(tensors, str(path), metadata={"beta1": "0.9", "beta2": "0.999", "eps": "1e-8"})


def step(model, engine, ids) -> None:
    with engine:
        engine.prepare(ids.shape[0], ids.device)
        losses, _ = causal_lm_losses(model(input_ids=ids).logits, ids)
        losses.sum().backward()
        engine.collect()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = build_gpt2(args.layers, args.embd, args.vocab, args.seq, args.device)
    path = Path(tempfile.mkdtemp()) / "moments.safetensors"
    moments_file(model, path)
    plain = GradProjectionEngine(model, rank=args.rank)
    adam = AdamDirectionEngine(model, rank=args.rank, optimizer_state=str(path))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    for engine in (plain, adam):
        step(model, engine, ids)  # warm-up
    times = {"plain": [], "adam": []}
    for _ in range(args.repeats):
        for name, engine in (("plain", plain), ("adam", adam)):
            t0 = time.perf_counter()
            step(model, engine, ids)
            times[name].append(time.perf_counter() - t0)
    p, a = min(times["plain"]), min(times["adam"])
    print(f"GPT-2 L{args.layers} E{args.embd} V{args.vocab}, B={args.batch}, T={args.seq}, rank {args.rank}, "
          f"{len(plain.layers)} layers")
    print(f"plain projection: {p * 1000:.0f} ms/step; Adam directions: {a * 1000:.0f} ms/step; ratio {a / p:.2f}")


if __name__ == "__main__":
    main()
