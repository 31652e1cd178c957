"""Token-budget batching against fixed batch size on a corpus of widely varying lengths.

Both runs project the same examples with the embedded demo model; the token budget equals
the fixed run's batch size times the longest example, so both use at most the same
memory per batch. Prints examples/s of each, their ratio, and the padding each carried.

    python benchmarks/bench_token_budget.py
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from ghostproj.data import fixed_size_batches, token_budget_batches
from ghostproj.data.demo_corpus import stdlib_texts
from ghostproj.data.readers import DataSpec, load_examples
from ghostproj.jobs.demo import ensure_demo
from ghostproj.jobs.project import ProjectOptions, run_project
from ghostproj.models import load_model


def padding(batches) -> float:
    real = sum(len(e.input_ids) for b in batches for e in b)
    padded = sum(len(b) * max(len(e.input_ids) for e in b) for b in batches)
    return 1 - real / padded


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    demo = ensure_demo(print)
    rng = random.Random(0)
    texts = [r["text"] for r in stdlib_texts(min_words=6, max_words=12, members=True)]
    rows = []
    for _ in range(args.examples):  # 1 to 6 short docstrings: ~10 to ~100 tokens
        rows.append({"text": " ".join(rng.choice(texts) for _ in range(rng.choice([1, 1, 1, 2, 3, 6])))})
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "varied.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        _, tok = load_model(str(demo.model), device="cpu")
        examples = load_examples(DataSpec(str(data)), tok, 64).examples
        longest = max(len(e.input_ids) for e in examples)
        budget = args.batch_size * longest
        results = {}
        for name, extra in (("fixed", {}), ("budget", {"token_budget": budget})):
            t0 = time.perf_counter()
            run_project(ProjectOptions(model=str(demo.model), data=str(data), out=str(Path(tmp) / name),
                                       batch_size=args.batch_size, max_length=64, show_progress=False, **extra))
            results[name] = time.perf_counter() - t0
    pad_fixed = padding(list(fixed_size_batches(examples, args.batch_size)))
    pad_budget = padding(list(token_budget_batches(examples, budget)))
    print(f"{args.examples} examples, lengths {min(len(e.input_ids) for e in examples)}-{longest} tokens")
    print(f"fixed batch size {args.batch_size}: {args.examples / results['fixed']:.0f} examples/s, padding {pad_fixed:.0%}")
    print(f"token budget {budget}:  {args.examples / results['budget']:.0f} examples/s, padding {pad_budget:.0%}")
    print(f"speed-up of token-budget batching: {results['fixed'] / results['budget']:.2f}x")


if __name__ == "__main__":
    main()
