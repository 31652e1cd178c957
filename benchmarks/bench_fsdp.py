"""`project --fsdp` on 2 CPU ranks (gloo): parameter memory a rank holds once the model is
sharded ÷ the whole model, the most a rank other than 0 holds while the weights load, the
dry run's estimate ÷ what a rank's allocator really held over a run, and examples/s against
plain torchrun (each rank a whole copy), on a GPT-2 of L8 E256 at T=128.

    python benchmarks/bench_fsdp.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARE = """
import sys, torch, torch.distributed as td
from ghostproj.distributed import load_sharded
from ghostproj.memory_trace import allocator_peak
from ghostproj.models import load_model

model = load_model(sys.argv[1], meta=True)[0]
whole = sum(p.numel() * p.element_size() for p in model.parameters())
peak = allocator_peak(lambda: load_sharded(model, sys.argv[1], "float32", None, torch.device("cpu")))
mine = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
if td.get_rank() == 1:
    print(mine / whole, whole, peak / whole)
td.destroy_process_group()
"""

# One rank's allocator peak over a whole `project --fsdp`, against the dry run's estimate.
STEP = """
import json, sys, torch.distributed as td
from ghostproj.jobs.dry_run import run_dry_run
from ghostproj.jobs.project import ProjectOptions, run_project
from ghostproj.memory_trace import allocator_peak

opts = ProjectOptions(**json.loads(sys.argv[1]))
peak = allocator_peak(lambda: run_project(opts))
if td.get_rank() == 1:  # rank 0 also holds the checkpoint in host memory while loading
    estimate = next(e.total for e in run_dry_run(ProjectOptions(**json.loads(sys.argv[1]), dry_run=False)).estimates
                    if e.setting == "--fsdp over 2 ranks")
    print(estimate, peak)
"""


def torchrun(args: list[str], script: str | None = None) -> subprocess.CompletedProcess:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    target = ["-m", "ghostproj"] if script is None else [script]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([launcher, "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
                           *target, *args], check=True, capture_output=True, text=True, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=256)
    args = ap.parse_args()
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ghostproj.jobs.demo import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        words = "the cat sat on the mat while stocks fell as the bank raised rates planets orbit the sun".split()
        tok = train_tokenizer([" ".join(words)] * 50, vocab_size=300)
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=256, n_layer=8,
                                   n_head=4)).save_pretrained(d / "model")
        tok.save_pretrained(d / "model")
        with open(d / "data.jsonl", "w") as f:
            for i in range(args.examples):
                f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(120))}) + "\n")
        (d / "share.py").write_text(SHARE)
        share, whole, loading = map(float, torchrun([str(d / "model")], str(d / "share.py")).stdout.split())
        (d / "step.py").write_text(STEP)
        step_opts = {"model": str(d / "model"), "data": str(d / "data.jsonl"), "max_length": 128, "batch_size": 8,
                     "device": "cpu", "fsdp": True, "show_progress": False, "out": str(d / "measured")}
        estimate, measured = map(float, torchrun([json.dumps(step_opts)], str(d / "step.py")).stdout.split()[-2:])
        common = ["project", "--model", str(d / "model"), "--data", str(d / "data.jsonl"), "--max-length", "128",
                  "--batch-size", "8", "--device", "cpu"]
        times = {}
        for tag, extra in (("torchrun", []), ("torchrun --fsdp", ["--fsdp"])):
            t = time.perf_counter()
            torchrun(common + ["--out", str(d / tag.replace(" ", ""))] + extra)
            times[tag] = time.perf_counter() - t
        print(f"parameters a rank holds / the whole model: {share:.3f} ({whole / 2**20:.1f} MiB whole); "
              f"rank 1's peak while loading: {loading:.3f} of the model")
        print(f"--dry-run estimate for --fsdp over 2 ranks / rank 1's allocator peak over the run: "
              f"{estimate / measured:.2f} ({estimate / 2**20:.1f} vs {measured / 2**20:.1f} MiB)")
        for tag, t in times.items():
            print(f"{tag:16s} {args.examples / t:6.1f} examples/s ({t:.1f} s, process start-up included)")
        print(f"fsdp / plain time: x{times['torchrun --fsdp'] / times['torchrun']:.2f} (GPT-2 L8 E256, T=128, 2 ranks)")


if __name__ == "__main__":
    main()
