"""Projection speed on a GPU, where our users run it and where the host, not the kernels,
sets the pace. Two parts, each printing ratios measured side by side in one run:

kernels   GPT-2-small shape (L12 E768 V50257) and SmolLM2-135M shape (Llama, 30 blocks of
          width 576, 210 projected layers), bf16, B=16, T=512, rank 256 per layer:
          wall time and GPU-busy time (sum of kernel times, torch profiler) and kernel
          launches of a plain training step, the floor (forward + backward through
          activations only) and projection. With --compile, the same with the model's
          forward and backward compiled by torch.compile (--compile gpt2,smollm2).
          Goals: GPT-2 project/train <= 0.85 (wall); SmolLM2 project/floor <= 1.15 (wall).
end-to-end  4 x --docs documents of ~340 tokens on the SmolLM2 shape at one token budget:
          docs/s of a plain eager training pass (forward + backward) over the same batches,
          of the engine alone over those batches, of `ghostproj project` (marginal: the
          extra documents over the extra time between a half and a full run, so model load
          and start-up cancel), and of `bergson build` when it is installed (same layers,
          16 x 16 per layer, same token budget, also marginal).
          Goals: project >= 1.2x the training pass and >= 1.5x bergson; the CLI's marginal
          docs/s within 5% of the engine's own.

    python benchmarks/bench_gpu.py [--out DIR] [--docs 1024] [--budget 8192] [--compile gpt2,smollm2] [--bergson]

``--smoke`` runs every part at toy sizes (on the CPU too), to check the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from gpt2 import build_gpt2
from llama import SMOLLM2_135M, build_llama
from steps import step_modes
from timing import median_time, sync

from ghostproj.data import collate, read_records, token_budget_batches, tokenize_records
from ghostproj.engines.losses import causal_lm_losses
from ghostproj.engines.projection import GradProjectionEngine

RESULTS: dict = {}


def record(key: str, value) -> None:
    RESULTS[key] = value
    if ARGS.out:
        Path(ARGS.out).mkdir(parents=True, exist_ok=True)
        (Path(ARGS.out) / "bench_gpu.json").write_text(json.dumps(RESULTS, indent=1))


def gpu_busy(fn, device) -> tuple[float, int]:
    """(milliseconds of kernel time, kernels launched) in one call."""
    if device.type != "cuda":
        return float("nan"), 0
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    busy, kernels = 0.0, 0
    for e in prof.events():
        if e.device_type.name == "CUDA":
            busy += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            kernels += 1
    return busy / 1000, kernels


def kernels(name: str, model, first_block, device, batch: int, seq: int, vocab: int, compiled: bool,
            modes=("train", "floor", "project")) -> None:
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    call = torch.compile(model) if compiled else None
    fns, engine = step_modes(model, ids, first_block, compiled=call)
    fns = {mode: fns[mode] for mode in modes}
    label = f"{name}{' compiled' if compiled else ''}"
    row = {"layers": len(engine.layers)}
    for mode, fn in fns.items():
        t0 = time.perf_counter()
        fn()  # first call: compilation, if any
        sync(device)
        first = time.perf_counter() - t0
        row[mode] = {"wall_ms": median_time(fn, device, ARGS.repeats, warmup=3) * 1000, "first_call_s": first}
        row[mode]["gpu_ms"], row[mode]["kernels"] = gpu_busy(fn, device)
        print(f"  {label:22s} {mode:8s} wall {row[mode]['wall_ms']:8.1f} ms   GPU-busy {row[mode]['gpu_ms']:7.1f} ms"
              f"   {row[mode]['kernels']:6d} kernels   (first call {first:.1f} s)", flush=True)
    line = f"  {label:22s}"
    for base in ("train", "floor"):
        if base in row:
            row[f"project/{base}"] = row["project"]["wall_ms"] / row[base]["wall_ms"]
            line += f" project/{base} = {row[f'project/{base}']:.2f}  "
    print(line, flush=True)
    engine.detach()
    record(f"kernels: {label}", row)


# -- end to end ---------------------------------------------------------------------------
WORDS = None


def documents(n: int, words_per_doc: int, seed: int = 0) -> list[str]:
    global WORDS
    rng = random.Random(seed)
    if WORDS is None:
        letters = "abcdefghijklmnopqrstuvwxyz"
        WORDS = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 7))) for _ in range(3000)]
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(words_per_doc // 2, words_per_doc * 3 // 2)))
            for _ in range(n)]


def end_to_end(device) -> None:
    from ghostproj.cli import main as cli_main
    from ghostproj.jobs.demo import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    shape = dict(SMOLLM2_135M)
    if ARGS.smoke:
        shape.update(layers=2, width=64, intermediate=128, heads=4, kv_heads=2, vocab=2048)
    texts = documents(ARGS.docs, ARGS.words)
    tokenizer = train_tokenizer(texts[:2000], vocab_size=min(8000, shape["vocab"]))
    model = build_llama(positions=8192, device=device, dtype=torch.bfloat16, **shape)
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    half = ARGS.docs // 2
    for path, rows in ((work / "docs.jsonl", texts), (work / "half.jsonl", texts[:half])):
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))

    examples = tokenize_records(read_records(work / "docs.jsonl"), tokenizer, 8192)
    tokens = sum(len(e.input_ids) for e in examples)
    batches = [collate(b, tokenizer.pad_token_id).to(device) for b in token_budget_batches(examples, ARGS.budget)]
    row = {"docs": len(examples), "mean_tokens": tokens / len(examples), "budget": ARGS.budget,
           "batches": len(batches)}
    print(f"  {len(examples)} documents, {tokens / len(examples):.0f} tokens each on average, "
          f"{len(batches)} batches at a budget of {ARGS.budget}", flush=True)

    def train_pass(some):
        for p in model.parameters():
            p.requires_grad_(True)
        for b in some:
            for p in model.parameters():
                p.grad = None
            logits = model(**b.model_inputs()).logits
            causal_lm_losses(logits, b.labels)[0].sum().backward()

    engine = GradProjectionEngine(model, None, rank=256)

    def engine_pass(some):
        with engine:
            for b in some:
                logits = model(**b.model_inputs()).logits
                causal_lm_losses(logits, b.labels)[0].sum().backward()
                engine.collect().cpu()

    for name, fn in (("train pass", train_pass), ("engine", engine_pass)):
        fn(batches)  # warm-up over every batch shape: first launches, allocator, the engine's caches
        sync(device)
        t0 = time.perf_counter()
        fn(batches)
        sync(device)
        row[name] = len(examples) / (time.perf_counter() - t0)
        print(f"  {name:34s} {row[name]:8.1f} docs/s", flush=True)
        record("end-to-end", row)
    for p in model.parameters():
        p.grad = None
    del batches

    def in_process(argv) -> float:
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                cli_main(argv)
            except SystemExit as exc:
                if exc.code not in (0, None):
                    raise RuntimeError(f"ghostproj {' '.join(argv)} exited {exc.code}") from None
        return time.perf_counter() - t0

    def fresh_process(cmd: list[str], site: str | None = None) -> float:
        env = dict(os.environ)
        if site:  # its own packages, seen by it alone
            env["PYTHONPATH"] = os.pathsep.join([site, env.get("PYTHONPATH", "")])
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=env)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd[:4])} failed: {done.stderr[-2000:]}")
        return time.perf_counter() - t0

    def ours(data: Path, out: str) -> list[str]:
        return ["project", "--data", str(data), "--out", str(work / out), "--model", str(model_dir),
                "--token-budget", str(ARGS.budget), "--dtype", "bfloat16", "--device", device.type, "--rank", "256",
                "--max-length", "8192", "--no-resume", "--shard-size", "256"]

    # In one warm process (every batch shape seen once before): the whole command on all
    # documents, less the same command on 16 of them (model load, tokenizer, start-up).
    # Shards of 256 rows, so that writing overlaps the projection as in a long run, rather
    # than one shard written after the last batch.
    (work / "tiny.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:16]))
    in_process(ours(work / "docs.jsonl", "warm.st"))
    t_tiny = in_process(ours(work / "tiny.jsonl", "tiny.st"))
    t_full = in_process(ours(work / "docs.jsonl", "full.st"))
    row["ghostproj project, warm process"] = (len(examples) - 16) / max(t_full - t_tiny, 1e-9)
    print(f"  {'ghostproj project, warm process':34s} {row['ghostproj project, warm process']:8.1f} docs/s",
          flush=True)
    # Fresh processes, as a user runs either tool: half the documents, then all of them;
    # marginal docs/s = the extra documents over the extra time (start-up cancels).
    tools = {"ghostproj project": (lambda data, out: [sys.executable, "-m", "ghostproj"] + ours(data, out), None)}
    if ARGS.bergson:
        tools["bergson build"] = (lambda data, out: [
            sys.executable, "-m", "bergson", "build", str(work / out), "--model", str(model_dir), "--precision", "bf16",
            "--dataset", str(data), "--projection_dim", "16", "--token_batch_size", str(ARGS.budget),
            "--nproc_per_node", "1", "--overwrite", "true"], ARGS.bergson_site)
    for tool, (cmd, site) in tools.items():
        try:
            t_half = fresh_process(cmd(work / "half.jsonl", f"{tool.split()[0]}-half"), site)
            t_all = fresh_process(cmd(work / "docs.jsonl", f"{tool.split()[0]}-all"), site)
        except (RuntimeError, OSError) as exc:
            row[f"{tool} error"] = str(exc)[-1500:]
            print(f"  {tool} could not run: {str(exc)[-600:]}", flush=True)
            continue
        row[f"{tool}, fresh processes (marginal)"] = (len(examples) - half) / max(t_all - t_half, 1e-9)
        row[f"{tool}, whole run"] = len(examples) / t_all
        print(f"  {tool + ', fresh processes':34s} {row[f'{tool}, fresh processes (marginal)']:8.1f} docs/s marginal,"
              f" {row[f'{tool}, whole run']:.1f} docs/s for the whole run", flush=True)
        record("end-to-end", row)
    warm = row["ghostproj project, warm process"]
    row["project/train pass"] = warm / row["train pass"]
    row["CLI/engine"] = warm / row["engine"]
    line = f"  project / training pass = {row['project/train pass']:.2f}x (goal >= 1.2), CLI / engine = " \
           f"{row['CLI/engine']:.2f} (goal >= 0.95)"
    if "bergson build, whole run" in row and "ghostproj project, whole run" in row:
        for kind in (", fresh processes (marginal)", ", whole run"):
            row[f"project/bergson{kind}"] = row[f"ghostproj project{kind}"] / row[f"bergson build{kind}"]
        line += (f", project / bergson = {row['project/bergson, fresh processes (marginal)']:.2f}x marginal, "
                 f"{row['project/bergson, whole run']:.2f}x whole run (goal >= 1.5)")
    print(line, flush=True)
    record("end-to-end", row)


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="directory for bench_gpu.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--docs", type=int, default=1024)
    ap.add_argument("--words", type=int, default=340, help="mean words (about tokens) per document")
    ap.add_argument("--budget", type=int, default=8192)
    ap.add_argument("--compile", default="", help="comma-separated shapes (gpt2, smollm2) to time compiled too")
    ap.add_argument("--compile-modes", default="project,train", help="which steps to compile and time")
    ap.add_argument("--bergson", action="store_true", help="also time `bergson build` (must be importable)")
    ap.add_argument("--bergson-site", help="a directory holding bergson and its dependencies")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-end-to-end", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="toy sizes, to check the script")
    ARGS = ap.parse_args()
    device = torch.device(ARGS.device)
    info = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    from ghostproj.engines.fp32 import mm_out_float32_supported

    tensor_core = device.type == "cuda" and mm_out_float32_supported(device, torch.bfloat16)
    record("machine", {"device": info, "torch": torch.__version__, "bf16 products with float32 results": tensor_core})
    print(f"device: {info}, torch {torch.__version__}, bf16 tensor-core products with float32 results: "
          f"{tensor_core}", flush=True)
    b, t = (2, 32) if ARGS.smoke else (16, 512)
    if ARGS.smoke:
        ARGS.docs, ARGS.words, ARGS.budget, ARGS.repeats = min(ARGS.docs, 32), 20, 256, 2
    if not ARGS.skip_kernels:
        print("kernels (bf16, B=16, T=512, rank 256 per layer):", flush=True)
        gpt2 = build_gpt2(2, 64, 512, t, device, torch.bfloat16) if ARGS.smoke else \
            build_gpt2(12, 768, 50257, t, device, torch.bfloat16)
        kernels("GPT-2 small", gpt2, gpt2.transformer.h[0], device, b, t, gpt2.config.vocab_size, False)
        del gpt2
        shape = dict(SMOLLM2_135M, layers=2, width=64, intermediate=128, heads=4, kv_heads=2, vocab=512) \
            if ARGS.smoke else SMOLLM2_135M
        llama = build_llama(positions=t, device=device, dtype=torch.bfloat16, **shape)
        kernels("SmolLM2-135M", llama, llama.model.layers[0], device, b, t, shape["vocab"], False)
        if not ARGS.skip_end_to_end:
            del llama
    if not ARGS.skip_end_to_end:
        print("end to end (SmolLM2-135M shape, bf16):", flush=True)
        end_to_end(device)
    for name in filter(None, ARGS.compile.split(",")):
        print(f"compiled (torch.compile, default mode): {name}", flush=True)
        modes = ARGS.compile_modes.split(",")
        if name == "gpt2":
            gpt2 = build_gpt2(2, 64, 512, t, device, torch.bfloat16) if ARGS.smoke else \
                build_gpt2(12, 768, 50257, t, device, torch.bfloat16)
            kernels("GPT-2 small", gpt2, gpt2.transformer.h[0], device, b, t, gpt2.config.vocab_size, True, modes)
            del gpt2
        else:
            shape = dict(SMOLLM2_135M, layers=2, width=64, intermediate=128, heads=4, kv_heads=2, vocab=512) \
                if ARGS.smoke else SMOLLM2_135M
            llama = build_llama(positions=t, device=device, dtype=torch.bfloat16, **shape)
            kernels("SmolLM2-135M", llama, llama.model.layers[0], device, b, t, shape["vocab"], True, modes)
            del llama
        torch._dynamo.reset()


ARGS = None

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
