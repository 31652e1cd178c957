"""Projecting bf16 activations: extra memory and time of slice-wise float32 upcasting
against one whole float32 copy, on one Llama-7B-shaped MLP input.

The engine accumulates in float32. Upcasting a whole [B, T, 11008] bf16 activation first
costs a float32 copy twice its size; the engine's route (``ghostproj.engines.fp32.Projection``)
upcasts slices of at most 64 MiB on the CPU and, on a GPU, makes no copy at all (a
tensor-core product with a float32 result). Each variant runs in a fresh process; its peak memory above the input is
read from the allocator (CUDA) or from resident memory sampled every millisecond (CPU).

    python benchmarks/bench_precision.py [--device cuda] [--tokens 8192] [--width 11008]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import torch
from timing import median_time, peak_memory

from ghostproj.engines.fp32 import Projection


def child(args) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.width, device=device).to(torch.bfloat16)
    w = torch.randn(args.width, args.rank, device=device) / args.rank ** 0.5

    def whole():
        return x.float() @ w

    projection = Projection(w, torch.bfloat16)

    def sliced():
        return projection.rows(x)

    fn = whole if args.child == "whole" else sliced
    seconds = median_time(fn, device, repeats=3, warmup=1)
    peak = peak_memory(fn, device)
    print(json.dumps({"peak": peak, "seconds": seconds}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=8192, help="B x T rows")
    ap.add_argument("--width", type=int, default=11008)
    ap.add_argument("--rank", type=int, default=64, help="k_in")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    res = {}
    for variant in ("whole", "sliced"):
        cmd = [sys.executable, __file__, "--child", variant, f"--device={args.device}", f"--tokens={args.tokens}",
               f"--width={args.width}", f"--rank={args.rank}"]
        res[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    size = args.tokens * args.width * 2
    print(f"machine: {platform.machine()}, {gpu}, torch {torch.__version__}")
    print(f"bf16 input [{args.tokens}, {args.width}] = {size / 2**20:.0f} MiB, projected to k={args.rank}")
    for v in ("whole", "sliced"):
        print(f"  {v:6s} peak above input {res[v]['peak'] / 2**20:7.0f} MiB   {res[v]['seconds'] * 1000:7.1f} ms")
    print(f"sliced / whole: memory {res['sliced']['peak'] / max(res['whole']['peak'], 1):.2f}, "
          f"time {res['sliced']['seconds'] / res['whole']['seconds']:.2f}")


if __name__ == "__main__":
    main()
