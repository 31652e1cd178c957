"""Attribution inside transformers.Trainer, on the GPT-2 of bench_project.py (n_layer=4,
n_embd=256, T=128, B=16): a Trainer step with GradientStoreCallback (every step observed,
rank 256 per layer) / a plain Trainer step (goal <= 1.25), the rate at which the store writes
to disk, and an InRunValuationTrainer step carrying M=4 validation rows / a plain step
(goal <= 1.35). Step times are medians over the steps of one run each (the first steps,
which warm up, left out); every run trains the same data.

    python benchmarks/bench_trainer.py [--steps 12] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from gpt2 import add_model_args, build_gpt2
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from ghostproj.integrations.transformers import GradientStoreCallback, InRunValuationTrainer


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times, self._t0 = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


def run(model, dataset, batch: int, steps: int, device: str, callbacks: list, out: Path, trainer=Trainer,
        **extra) -> list[float]:
    timer = StepTimes()
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=1e-4, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=device == "cpu", seed=0, dataloader_num_workers=0)
    trainer(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
            callbacks=[timer, *callbacks], **extra).train()
    return timer.times[2:]


def main():
    import datasets

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rank", type=int, default=256)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(1, args.vocab, ((args.batch + 4) * args.steps, args.seq), generator=g)
    dataset = datasets.Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist(),
                                          "attention_mask": torch.ones_like(rows).tolist()})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = run(build_gpt2(args.layers, args.embd, args.vocab, args.seq, args.device).train(), dataset,
                    args.batch, args.steps, args.device, [], tmp / "plain")
        store = GradientStoreCallback(tmp / "store", dataset, rank=args.rank)
        stored = run(build_gpt2(args.layers, args.embd, args.vocab, args.seq, args.device).train(), dataset,
                     args.batch, args.steps, args.device, [store], tmp / "stored")
        written = sum(p.stat().st_size for p in store.windows[0].glob("*.safetensors"))
        plain_wider = run(build_gpt2(args.layers, args.embd, args.vocab, args.seq, args.device).train(), dataset,
                          args.batch + 4, args.steps, args.device, [], tmp / "plain20")
        in_run = run(build_gpt2(args.layers, args.embd, args.vocab, args.seq, args.device).train(), dataset,
                     args.batch, args.steps, args.device, [], tmp / "inrun", trainer=InRunValuationTrainer,
                     validation_dataset=dataset.select(range(4)))
    t_plain, t_store = statistics.median(plain), statistics.median(stored)
    print(f"GPT-2 L{args.layers} E{args.embd} V{args.vocab}, T={args.seq}, B={args.batch}, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"plain Trainer step {t_plain * 1000:.0f} ms; with GradientStoreCallback {t_store * 1000:.0f} ms: "
          f"ratio {t_store / t_plain:.2f}   (goal <= 1.25)")
    t_in_run, t_wider = statistics.median(in_run), statistics.median(plain_wider)
    print(f"in-run valuation (M=4 validation rows in every step) {t_in_run * 1000:.0f} ms: {t_in_run / t_plain:.2f} "
          f"x the plain step of B={args.batch}, {t_in_run / t_wider:.2f} x a plain step of the same B+M={args.batch + 4} "
          "rows   (goal <= 1.35, as the in-run engine alone)")
    print(f"store: {written / 2**20:.1f} MiB for {args.batch * args.steps} examples, "
          f"{written / 2**20 / (sum(stored) + 2 * t_store):.1f} MiB/s of training time (written by a background "
          "thread)")


if __name__ == "__main__":
    main()
