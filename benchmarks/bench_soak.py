"""Memory soak: project a few thousand examples and record peak RSS at 10%, 50% and 100%
of the run (goal: flat within 10% from 10% to 100%).

    python benchmarks/bench_soak.py [--examples 6000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from timing import rss

from ghostproj.data.demo_corpus import stdlib_texts
from ghostproj.jobs.demo import ensure_demo
from ghostproj.jobs.project import ProjectOptions, run_project


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=6000)
    ap.add_argument("--shard-size", type=int, default=256)
    args = ap.parse_args()
    demo = ensure_demo(print)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "soak.jsonl"
        texts = stdlib_texts(min_words=6, members=True)
        rows = [texts[i % len(texts)] for i in range(args.examples)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = Path(tmp) / "soak.st"
        samples: list[tuple[int, int]] = []  # (rows written, rss)
        done = threading.Event()

        def watch():
            while not done.is_set():
                try:
                    written = sum(s["rows"] for s in json.loads((out / "manifest.json").read_text())["shards"])
                except (OSError, ValueError, KeyError):
                    written = 0
                samples.append((written, rss()))
                time.sleep(0.02)

        thread = threading.Thread(target=watch)
        thread.start()
        t0 = time.perf_counter()
        run_project(ProjectOptions(model=str(demo.model), data=str(data), out=str(out), batch_size=16,
                                   shard_size=args.shard_size, max_length=64, show_progress=False))
        done.set()
        thread.join()
        elapsed = time.perf_counter() - t0
    peaks = {}
    for frac in (0.1, 0.5, 1.0):
        upto = [r for w, r in samples if w <= frac * args.examples]
        peaks[frac] = max(upto) if upto else float("nan")
    print(f"{args.examples} examples (embedded demo model, shards of {args.shard_size}) in {elapsed:.1f} s")
    for frac, peak in peaks.items():
        print(f"peak RSS up to {frac:>4.0%}: {peak / 2**20:7.1f} MiB")
    growth = peaks[1.0] / peaks[0.1] - 1
    print(f"growth from 10% to 100%: {growth:+.1%}   (goal: within 10%)")


if __name__ == "__main__":
    main()
