"""In-run dot products: a training step with GradDotProdEngine attached / a plain training step.

GPT-2 with n_layer=4, n_embd=256, T=128, a batch of B=16 training + M=4 validation examples.
The plain step trains on the same 20-example batch with every weight requiring grad; the
engine step also yields every training example's dot product with the validation gradient
and leaves the training-only gradient in .grad. Goal: <= 1.3 for the ghost and the
materialized path. Times are medians over repeated steps in one run.

    python benchmarks/bench_inrun.py [--device cuda]
"""

from __future__ import annotations

import argparse
import platform

import torch
from gpt2 import add_model_args, build_gpt2
from timing import median_time

from ghostproj.engines.dotprod import GradDotProdEngine
from ghostproj.engines.losses import causal_lm_losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--val-batch", type=int, default=4)
    args = ap.parse_args()
    device = torch.device(args.device)
    model = build_gpt2(args.layers, args.embd, args.vocab, args.seq, device).train()
    n = args.train_batch + args.val_batch
    ids = torch.randint(0, args.vocab, (n, args.seq), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def plain_step():
        opt.zero_grad(set_to_none=True)
        losses, _ = causal_lm_losses(model(input_ids=ids).logits, ids)
        losses.sum().backward()
        opt.step()

    t_plain = median_time(plain_step, device, args.repeats)
    print(f"machine: {platform.machine()} {args.device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), torch {torch.__version__}")
    print(f"GPT-2 L{args.layers} E{args.embd} V{args.vocab}, T={args.seq}, B={args.train_batch} + M={args.val_batch}")
    print(f"plain training step: {t_plain * 1000:.0f} ms")
    for method in ("ghost", "materialize"):
        engine = GradDotProdEngine(model, val_batch_size=args.val_batch, method=method)
        engine.attach()

        def engine_step(engine=engine):
            losses, _ = causal_lm_losses(model(input_ids=ids).logits, ids)
            losses.sum().backward()
            engine.aggregate()
            engine.prepare_gradients()
            opt.step()
            engine.clear_gradients()

        t = median_time(engine_step, device, args.repeats)
        engine.detach()
        print(f"engine step, {method:11s}: {t * 1000:.0f} ms = {t / t_plain:.2f} x plain   (goal <= 1.3)")


if __name__ == "__main__":
    main()
