"""Gradient checkpointing: peak memory and time of `project` with and without it, at
T=1024 on a deep, narrow GPT-2 whose activations dominate its memory, and what a batch
three times as large does to examples/s when checkpointing pays for it.

Each configuration runs `ghostproj project` in a fresh process; its peak resident memory
(ru_maxrss) is what the process needed, weights and Python included. Prints one line per
configuration and the ratios against the plain run.

    python benchmarks/bench_checkpointing.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def build(d: Path, layers: int, width: int, length: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ghostproj.jobs.demo import train_tokenizer

    words = "the cat sat on the mat while stocks fell as the bank raised rates planets orbit the sun".split()
    tok = train_tokenizer([" ".join(words)] * 50, vocab_size=300)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=length, n_embd=width, n_layer=layers, n_head=4,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    GPT2LMHeadModel(cfg).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    with open(d / "data.jsonl", "w") as f:
        for i in range(48):  # every example fills the context
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(2 * length))}) + "\n")


def run(d: Path, tag: str, length: int, batch: int, checkpointing: bool) -> tuple[float, float]:
    """(seconds, peak MiB) of one `project` in a child process."""
    cmd = [sys.executable, "-m", "ghostproj", "project", "--model", str(d / "model"), "--data", str(d / "data.jsonl"),
           "--out", str(d / tag), "--max-length", str(length), "--batch-size", str(batch), "--rank", "64",
           "--device", "cpu"] + (["--gradient-checkpointing"] if checkpointing else [])
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        build(d, args.layers, args.width, args.length)
        b = args.batch_size
        rows = [("plain", b, False), ("checkpointed", b, True), ("checkpointed, 3x batch", 3 * b, True)]
        results = {}
        for tag, batch, gc in rows:
            seconds, peak = run(d, tag.replace(" ", "").replace(",", ""), args.length, batch, gc)
            results[tag] = (seconds, peak)
            print(f"{tag:24s} B={batch:3d}  {48 / seconds:6.2f} examples/s  peak {peak:7.0f} MiB", flush=True)
        (t0, m0), (t1, m1), (t2, m2) = results.values()
        print(f"checkpointed / plain: time x{t1 / t0:.2f}, peak memory x{m1 / m0:.2f}; "
              f"3x batch checkpointed / plain: examples/s x{t0 / t2:.2f}, peak memory x{m2 / m0:.2f} "
              f"(GPT-2 L{args.layers} E{args.width}, T={args.length}, 48 examples)")


if __name__ == "__main__":
    main()
