"""Streaming score throughput and memory.

Writes N_train x D bfloat16 training shards and M query vectors (random, in a temporary
directory), then in one run:
  (a) times `ghostproj score` (a subprocess, top-k output only) and an in-memory
      torch.matmul of the same shapes, and prints the GFLOP/s ratio (goal >= 0.7);
  (b) prints the score process's peak RSS (goal < 2 GB).

    python benchmarks/bench_score.py                 # N=200,000, M=1,000, D=4,096
    python benchmarks/bench_score.py --n-train 20000 # a quick run
    python benchmarks/bench_score.py --device cuda   # GPU score / an in-memory GPU matmul
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ghostproj.store import FORMAT_VERSION, RunWriter, write_manifest


def write_run(path: Path, rows: int, dim: int, seed: int, chunk: int = 4096) -> None:
    path.mkdir(parents=True)
    manifest = {
        "format": FORMAT_VERSION, "fingerprint": "bench", "fingerprint_parts": {},
        "layers": [{"name": f"layer{i}", "type": "Linear", "n_in": 64, "n_out": 64, "k_in": 16, "k_out": 16,
                    "offset": i * 256} for i in range(dim // 256)],
        "dim": dim, "store_dtype": "bfloat16", "shards": [], "complete": False, "data": {"count": rows},
    }
    write_manifest(path, manifest)
    writer = RunWriter(path, manifest, shard_size=16384)
    g = torch.Generator().manual_seed(seed)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        writer.add(torch.randn(n, dim, generator=g), torch.arange(start, start + n), torch.zeros(n),
                   torch.ones(n, dtype=torch.int32))
    writer.finish({})


def _matmul_seconds(n: int, d: int, m: int, device: torch.device) -> float:
    """One in-memory [n, d] @ [d, m]: float32 on the CPU; on a GPU bf16 operands with a
    float32 result (the product score runs there), timed after a warm-up."""
    if device.type != "cuda":
        a, b = torch.randn(n, d), torch.randn(d, m)
        torch.matmul(a[:1024], b)  # warm up
        t0 = time.perf_counter()
        torch.matmul(a, b)
        return time.perf_counter() - t0
    a = torch.randn(n, d, device=device, dtype=torch.bfloat16)
    b = torch.randn(d, m, device=device, dtype=torch.bfloat16)
    torch.mm(a, b, out_dtype=torch.float32)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    torch.mm(a, b, out_dtype=torch.float32)
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=200_000)
    ap.add_argument("--n-query", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--metric", default="dot")
    ap.add_argument("--normalize", default="layer", help="as score's --normalize (default: score's default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where score runs, and the matmul it is compared "
                                                    "with (on a GPU: bf16 operands, float32 result, as score)")
    ap.add_argument("--keep", help="Keep the generated runs in this directory.")
    ap.add_argument("--generate-into", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_into:
        root = Path(args.generate_into)
        write_run(root / "train.st", args.n_train, args.dim, 0)
        write_run(root / "query.st", args.n_query, args.dim, 1)
        return

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ghostproj-bench-"))
    train, query = root / "train.st", root / "query.st"
    try:
        t0 = time.perf_counter()
        if not train.exists():
            # In a process of its own, so this process stays small while it starts the scorer.
            subprocess.run([sys.executable, __file__, "--generate-into", str(root), f"--n-train={args.n_train}",
                            f"--n-query={args.n_query}", f"--dim={args.dim}"], check=True)
        print(f"wrote {args.n_train} + {args.n_query} bf16 vectors of D={args.dim} in {time.perf_counter() - t0:.0f} s")

        cmd = [sys.executable, "-m", "ghostproj", "score", str(train), str(query), "--metric", args.metric,
               "--normalize", args.normalize, "--device", args.device, "--top-k", "10", "--show", "0", "--topk-out", str(root / "top.jsonl"), "--overwrite"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not the generator's
        t_score = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            raise SystemExit(f"ghostproj score failed with exit code {proc.returncode}")
        peak_gb = usage.ru_maxrss * 1024 / 1e9

        flop = 2.0 * args.n_train * args.n_query * args.dim
        t_mm = _matmul_seconds(args.n_train, args.dim, args.n_query, torch.device(args.device))

        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        print(f"score ({args.metric}, --normalize {args.normalize}, top-10, sha256 verified, whole process): {t_score:.1f} s = {flop / t_score / 1e9:.1f} GFLOP/s")
        print(f"in-memory torch.matmul [{args.n_train}x{args.dim}] @ [{args.dim}x{args.n_query}]: {t_mm:.1f} s = "
              f"{flop / t_mm / 1e9:.1f} GFLOP/s")
        print(f"ratio score / matmul GFLOP/s: {t_mm / t_score:.2f}   (goal >= 0.7)")
        print(f"score peak RSS: {peak_gb:.2f} GB   (goal < 2 GB)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
