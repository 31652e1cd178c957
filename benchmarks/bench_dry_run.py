"""`project --dry-run` against the memory `project` really takes: for each model and
setting, the dry run's estimated total per device (parameters + activations + engine)
÷ the measured peak of the same `project` on the CPU. The goal is within 25% (0.75–1.25).

The measured peak is the most memory torch's CPU allocator held at once during the whole
`project` (model load included), from the profiler's allocation events, in a fresh process
per run: the CPU's counterpart of a GPU's max_memory_allocated. The process's resident
memory is not the measure: glibc keeps freed blocks and per-thread arenas, which on this
machine add 30% to a plain run's step and 300% to a checkpointed one's.

    python benchmarks/bench_dry_run.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = """
import json, sys
from ghostproj.jobs.project import ProjectOptions, run_project
from ghostproj.memory_trace import allocator_peak

print(allocator_peak(lambda: run_project(ProjectOptions(**json.loads(sys.argv[1])))))
"""

ESTIMATE = """
import json, sys
from ghostproj.jobs.dry_run import run_dry_run
from ghostproj.jobs.project import ProjectOptions

r = run_dry_run(ProjectOptions(**json.loads(sys.argv[1])))
print(json.dumps({"batch": r.batch, **{e.setting: e.total for e in r.estimates}}))
"""


def build(d: Path, kind: str, layers: int, width: int, length: int, examples: int) -> None:
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    from ghostproj.jobs.demo import train_tokenizer

    words = "the cat sat on the mat while stocks fell as the bank raised rates planets orbit the sun".split()
    tok = train_tokenizer([" ".join(words)] * 50, vocab_size=300)
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=length, n_embd=width, n_layer=layers,
                                           n_head=4, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    elif kind == "qwen3-moe":  # 8 experts, 2 per token
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, moe_intermediate_size=width // 2,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
            num_experts_per_tok=2, max_position_embeddings=length, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width,
                                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=length, bos_token_id=0, eos_token_id=0,
                                             pad_token_id=0))
    model.save_pretrained(d / kind)
    tok.save_pretrained(d / kind)
    with open(d / f"{kind}.jsonl", "w") as f:
        for i in range(examples):  # mixed lengths up to about the context: batches are padded
            n = length // 8 + (i * length // 2) // max(1, examples - 1)
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(n))}) + "\n")


def child(code: str, options: dict) -> str:
    return subprocess.run([sys.executable, "-c", code, json.dumps(options)], check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=16)
    args = ap.parse_args()
    cases = [  # (model, layers, width, length, batch size, token budget, dtype, --layers)
        ("gpt2", 12, 128, 1024, 4, None, "float32", None),
        ("llama", 8, 256, 512, 8, None, "float32", None),
        ("llama", 8, 256, 512, 8, 2048, "float32", None),
        ("llama", 8, 256, 512, 8, None, "bfloat16", None),
        ("qwen3-moe", 4, 128, 512, 8, None, "float32", ["re:."]),
    ]
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for kind, layers, width, length, batch, budget, dtype, chosen in cases:
            if not (d / kind).exists():
                build(d, kind, layers, width, length, args.examples)
            for checkpointing in (False, True):
                opts = {"model": str(d / kind), "data": str(d / f"{kind}.jsonl"), "max_length": length,
                        "batch_size": batch, "token_budget": budget, "rank": 64, "device": "cpu",
                        "gradient_checkpointing": checkpointing, "show_progress": False, "dtype": dtype,
                        "layers": chosen}
                estimates = json.loads(child(ESTIMATE, opts))
                setting = "--gradient-checkpointing" if checkpointing else "plain"
                n = len(ratios)
                measured = int(child(MEASURE, dict(opts, out=str(d / f"run{n}"))))
                ratio = estimates[setting] / measured
                ratios.append(ratio)
                print(f"{kind} L{layers} E{width} {dtype:8s} batch {estimates['batch'][0]}x{estimates['batch'][1]:<5d}"
                      f"{f'budget {budget}' if budget else f'B={batch}':11s} {setting:26s} "
                      f"estimated {estimates[setting] / 2**20:7.1f} MiB  measured {measured / 2**20:7.1f} MiB  "
                      f"ratio {ratio:.2f}", flush=True)
    print(f"estimate / measured: {min(ratios):.2f}–{max(ratios):.2f} over {len(ratios)} runs (goal 0.75–1.25)")


if __name__ == "__main__":
    main()
