"""Projection cost against a training step, the activations-only floor and a naive loop.

GPT-2 (n_layer=4, n_embd=256, T=128, B=16 by default), every Conv1D layer projected at
rank 256 per layer. All times are medians over repeated calls in one run; ratios are what
matter (absolute times only as context).

  train      forward + backward, every weight requiring grad (a plain training step)
  floor      forward + backward through activations only (weights frozen)
  project    ghostproj engine, all Conv1D layers (goal <= 0.80 x train, <= 1.1 x floor)
  top-half   engine on the upper half of the blocks only (goal <= 0.60 x train)
  top-floor  forward + backward through the activations of the upper half only: the
             least any top-half projection can cost
  naive      batch size 1, full autograd, explicit P_out G P_in^T, at B=32
             (goal: engine >= 5x faster)
  memory     peak memory of project / train, each in a fresh process (goal <= 1.1)

    python benchmarks/bench_project.py [--device cuda] [--vocab 50257] [--dtype bfloat16] [--profile]

``--profile`` also prints where the time of a training step, a top-half projection and
one naive example goes (torch.profiler, operators by self time), which is how a gap to a
goal gets its cause named.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time

import torch
from gpt2 import add_model_args, build_gpt2
from timing import median_time, peak_memory, sync

from ghostproj.engines.losses import causal_lm_losses
from ghostproj.engines.projection import GradProjectionEngine


def build(args, device):
    return build_gpt2(args.layers, args.embd, args.vocab, args.seq, device, getattr(torch, args.dtype))


def steps(model, ids, args):
    """The callables being compared, keyed by mode."""
    def loss():
        return causal_lm_losses(model(input_ids=ids).logits, ids)[0].sum()

    def train():
        for p in model.parameters():
            p.requires_grad_(True)
            p.grad = None
        loss().backward()

    def make_floor(first_block):
        def floor():
            for p in model.parameters():
                p.requires_grad_(False)
            # gradient enters at this block's input; no weight gradient anywhere
            h = model.transformer.h[first_block]
            handle = h.register_forward_pre_hook(lambda m, a, kw: ((a[0].detach().requires_grad_(True),) + a[1:], kw)
                                                 if a else None, with_kwargs=True)
            try:
                loss().backward()
            finally:
                handle.remove()
        return floor

    def make_project(patterns):
        engine = GradProjectionEngine(model, patterns, rank=args.rank)

        def project():
            with engine:
                loss().backward()
                engine.collect()
        return project, engine

    project_all, engine = make_project(["c_attn", "c_proj", "c_fc"])
    upper = [f"h.{i}." for i in range(args.layers // 2, args.layers)]
    project_top, _ = make_project(upper)
    return {"train": train, "floor": make_floor(0), "project": project_all, "top-half": project_top,
            "top-floor": make_floor(args.layers // 2)}, engine


def naive_loop(model, ids, engine):
    """Each example alone, full autograd on the weights, explicit Kronecker projection."""
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(True)
    out = []
    for i in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        one = ids[i:i + 1]
        causal_lm_losses(model(input_ids=one).logits, one)[0].sum().backward()
        row = []
        for info in engine.layers:
            g = modules[info.name].weight.grad.t().float()  # a bf16 model's gradient meets float32 matrices
            p = engine.projectors[info.name]
            row.append((p.p_out.to(g.device) @ g @ p.p_in.to(g.device).t()).reshape(-1))
        out.append(torch.cat(row))
    return torch.stack(out)


def profile(fns: dict, device: torch.device, rows: int = 12) -> None:
    """Operators by self time for each callable, one warm call each."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, fn in fns.items():
        fn()
        sync(device)
        with torch_profile(activities=activities) as prof:
            fn()
            sync(device)
        events = prof.key_averages()
        total = sum(getattr(e, key) for e in events)
        print(f"\nprofile: {name} ({total / 1000:.1f} ms of operator self time)")
        for e in sorted(events, key=lambda e: getattr(e, key), reverse=True)[:rows]:
            share = getattr(e, key) / max(total, 1)
            print(f"  {share * 100:5.1f}%  {getattr(e, key) / 1000:8.2f} ms  {e.count:5d} calls  {e.key}")


def memory_child(args) -> None:
    """Run one mode in this fresh process and print its peak memory above the idle model
    (CUDA: the allocator's peak; CPU: resident memory sampled every millisecond)."""
    device = torch.device(args.device)
    model = build(args, device)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    fns, _ = steps(model, ids, args)
    fns[args.child]()  # warm-up: allocator caches, lazy initialisation
    peaks = []
    for _ in range(3):  # resident memory is noisy on the CPU: the median of three calls
        for p in model.parameters():  # each measured step allocates its own gradients
            p.grad = None
        peaks.append(peak_memory(fns[args.child], device))
    print(json.dumps({"peak": sorted(peaks)[1]}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--profile", action="store_true", help="print where the time goes")
    ap.add_argument("--compile", action="store_true", help="also time project with a torch.compile'd model")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return memory_child(args)
    device = torch.device(args.device)
    model = build(args, device)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    fns, engine = steps(model, ids, args)
    t = {name: median_time(fn, device, args.repeats) for name, fn in fns.items()}
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"machine: {platform.machine()}, {gpu}, torch {torch.__version__}")
    print(f"GPT-2 L{args.layers} E{args.embd} V{args.vocab}, T={args.seq}, B={args.batch}, rank {args.rank}/layer, "
          f"D={engine.dim}")
    for name in fns:
        print(f"  {name:9s} {t[name] * 1000:8.1f} ms")
    print(f"project / train    = {t['project'] / t['train']:.2f}   (goal <= 0.80)")
    print(f"project / floor    = {t['project'] / t['floor']:.2f}   (goal <= 1.10)")
    print(f"top-half / train   = {t['top-half'] / t['train']:.2f}   (goal <= 0.60; its floor alone is "
          f"{t['top-floor'] / t['train']:.2f}, top-half / top-floor = {t['top-half'] / t['top-floor']:.2f})")

    ids32 = torch.randint(0, args.vocab, (32, args.seq), device=device)
    _, engine32 = steps(model, ids32, args)

    def engine_b32():
        with engine32:
            causal_lm_losses(model(input_ids=ids32).logits, ids32)[0].sum().backward()
            return engine32.collect()
    t_engine = median_time(engine_b32, device, args.repeats)
    t0 = time.perf_counter()
    ref = naive_loop(model, ids32, engine32)
    sync(device)
    t_naive = time.perf_counter() - t0
    got = engine_b32()
    err = ((got.double() - ref.double().to(got.device)).norm(dim=1) / ref.double().to(got.device).norm(dim=1)).max()
    print(f"naive loop (B=32) / engine (B=32) = {t_naive / t_engine:.1f}x   (goal >= 5; max rel err {err:.1e})")

    peaks = {}
    for mode in ("train", "project"):
        cmd = [sys.executable, __file__, "--child", mode] + [f"--{k}={v}" for k, v in vars(args).items()
                                                            if k not in ("child", "repeats", "profile", "compile")]
        peaks[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["peak"]
    print(f"peak memory above the model: train {peaks['train'] / 2**20:.0f} MiB, project {peaks['project'] / 2**20:.0f} MiB"
          f" -> project / train = {peaks['project'] / max(peaks['train'], 1):.2f}   (goal <= 1.1)")

    if args.compile:
        compiled = torch.compile(model)
        engine_c = GradProjectionEngine(model, ["c_attn", "c_proj", "c_fc"], rank=args.rank)

        def project_compiled():  # attached once, as `project --compile` does: the graph holds the engine
            if engine.attached:
                engine.detach()
            if not engine_c.attached:
                engine_c.attach()
            engine_c.prepare(ids.shape[0], ids.device)
            causal_lm_losses(compiled(input_ids=ids).logits, ids)[0].sum().backward()
            engine_c.collect()
        t0 = time.perf_counter()
        project_compiled()
        sync(device)
        first = time.perf_counter() - t0
        t_c = median_time(project_compiled, device, args.repeats)
        engine_c.detach()
        t_e = median_time(fns["project"], device, args.repeats)
        print(f"project compiled / eager = {t_c / t_e:.2f}   (first call, compiling: {first:.1f} s)")

    if args.profile:
        one = ids32[:1]
        profile({"train": fns["train"], "top-half": fns["top-half"], "engine B=32": engine_b32,
                 "naive, one example": lambda: naive_loop(model, one, engine32)}, device)


if __name__ == "__main__":
    main()
