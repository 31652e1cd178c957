"""Scaling curves of the projection cost: time per example as sequence length, batch size,
rank and number of layers grow, each against the training step of the same shape, so the
cost model is visible. Prints the numbers and writes a PNG (when matplotlib is installed).

    python benchmarks/bench_scaling.py [--png FILE (default: scaling.png beside this script)] [--device cuda]
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from gpt2 import build_gpt2
from timing import median_time

from ghostproj.engines.losses import causal_lm_losses
from ghostproj.engines.projection import GradProjectionEngine

BASE = {"seq": 128, "batch": 16, "rank": 256, "layers": 4}
SWEEPS = {"seq": [32, 64, 128, 256], "batch": [4, 8, 16, 32], "rank": [16, 64, 256, 1024], "layers": [1, 2, 4, 8]}


def measure(cfg, device):
    model = build_gpt2(cfg["layers"], 256, 8192, max(cfg["seq"], 256), device)
    ids = torch.randint(0, 8192, (cfg["batch"], cfg["seq"]), device=device)
    engine = GradProjectionEngine(model, ["c_attn", "c_proj", "c_fc"], rank=cfg["rank"])

    def project():
        with engine:
            causal_lm_losses(model(input_ids=ids).logits, ids)[0].sum().backward()
            engine.collect()

    def train():
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        causal_lm_losses(model(input_ids=ids).logits, ids)[0].sum().backward()

    t_project = median_time(project, device, repeats=3, warmup=1)
    t_train = median_time(train, device, repeats=3, warmup=1)
    return t_project / cfg["batch"], t_project / t_train


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--png", default=str(Path(__file__).with_name("scaling.png")), help="where to write the plot")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"machine: {platform.machine()}, {args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"GPT-2 E256 V8192, all Conv1D layers projected; base {BASE}")
    results = {}
    for knob, values in SWEEPS.items():
        rows = []
        for v in values:
            cfg = dict(BASE, **{knob: v})
            per_example, ratio = measure(cfg, device)
            rows.append((v, per_example, ratio))
            print(f"  {knob:6s} = {v:5d}: {per_example * 1000:7.2f} ms/example, {ratio:.2f} x training step")
        results[knob] = rows
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written")
        return
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (knob, rows) in zip(axes, results.items()):
        xs = [r[0] for r in rows]
        ax.plot(xs, [r[1] * 1000 for r in rows], "o-", label="ms / example")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(knob)
        ax.set_ylabel("ms per example")
        ax.set_ylim(bottom=0)  # differences of a few ms stay small on the plot, as they are
        twin = ax.twinx()
        twin.plot(xs, [r[2] for r in rows], "s--", color="tab:orange", label="x training step")
        twin.set_ylim(0, 1.2)
        twin.set_ylabel("project / training step")
        ax.set_title(f"{knob} (others at base)")
    fig.suptitle(f"ghostproj project cost, {args.device}")
    fig.tight_layout()
    fig.savefig(args.png, dpi=90)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
