"""Scoring in K parts and merging them, against one process.

Writes N_train x D bfloat16 training shards and M query vectors (random, as
bench_score.py), then in one run times, each command in its own process:
  (a) one `ghostproj score` (top-k and --reduce mean selection outputs);
  (b) K `ghostproj score --num-parts K --part i` one after another, then `merge-scores`;
and prints (b) / (a): the total cost of splitting the work (on K machines the wall time
is about one K-th of the parts' sum plus the merge), the merge's own share, and whether
the merged files equal the single process's byte for byte.

    python benchmarks/bench_parts.py                  # N = 200,000, M = 1,000, D = 4,096, K = 4
    python benchmarks/bench_parts.py --n-train 40000  # a quick run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_score import write_run


def timed(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ghostproj", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=200_000)
    ap.add_argument("--n-query", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--keep", help="Keep the generated runs in this directory.")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ghostproj-bench-parts-"))
    train, query = root / "train.st", root / "query.st"
    if not train.exists():
        write_run(train, args.n_train, args.dim, 0)
        write_run(query, args.n_query, args.dim, 1)
    # cosine, as the recorded figures were measured (influence parts would also need --fisher)
    common = [str(train), str(query), "--metric", "cosine", "--top-k", "10", "--reduce", "mean", "--show", "0",
              "--overwrite"]
    single = timed("score", *common, "--topk-out", str(root / "one.jsonl"), "--select-out", str(root / "one.sel"))
    parts = [root / f"part{i}.safetensors" for i in range(args.parts)]
    each = [timed("score", *common, "--num-parts", str(args.parts), "--part", str(i), "--part-out", str(p))
            for i, p in enumerate(parts)]
    merge = timed("merge-scores", *map(str, parts), "--topk-out", str(root / "m.jsonl"), "--select-out",
                  str(root / "m.sel"), "--overwrite")
    same = all((root / f"m{s}").read_bytes() == (root / f"one{s}").read_bytes() for s in (".jsonl", ".sel"))
    print(f"N={args.n_train} M={args.n_query} D={args.dim} K={args.parts}")
    print(f"one process: {single:.1f} s; parts: {', '.join(f'{t:.1f}' for t in each)} s; merge: {merge:.1f} s")
    print(f"K parts + merge / one process: {(sum(each) + merge) / single:.2f} "
          f"(merge alone {merge / single:.2f}); slowest part + merge / one process: "
          f"{(max(each) + merge) / single:.2f}; byte-identical: {same}")


if __name__ == "__main__":
    main()
