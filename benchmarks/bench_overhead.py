"""Host overhead of the projection engine, measured where it dominates: a deep, narrow
Llama (30 layers, width 64, vocabulary 512, B=4, T=32) on one CPU thread. Its GEMMs are
so small that the time is the per-operator and per-hook cost, as on a fast GPU.

  train    forward + backward, every weight requiring grad
  floor    forward + backward through activations only (weights frozen, gradient enters
           at the first block's input)
  project  the engine on every Linear of the blocks (210 layers), collect() included

Prints project/train (goal <= 0.95), project/floor (goal <= 1.25) and the operators the
engine dispatches per projected layer over the floor (torch profiler: leaf aten
operators, views, aliases and bare allocations excluded; goal <= 3).

    python benchmarks/bench_overhead.py [--threads 1] [--repeats 30] [--layers 30] [--list-ops]
"""

from __future__ import annotations

import argparse
import collections
import platform

import torch
from llama import build_llama
from steps import step_modes
from timing import median_time

# Operators that only make a new view or alias of existing storage: no data moves.
VIEW_OPS = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::_unsafe_view", "aten::as_strided",
    "aten::t", "aten::transpose", "aten::permute", "aten::expand", "aten::unsqueeze", "aten::squeeze",
    "aten::select", "aten::slice", "aten::detach", "aten::detach_", "aten::alias", "aten::view_as",
    "aten::flatten", "aten::unflatten", "aten::narrow", "aten::split", "aten::split_with_sizes", "aten::chunk",
    "aten::unbind", "aten::numpy_T", "aten::matrix_H", "aten::lift_fresh", "aten::result_type",
    "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::contiguous", "aten::expand_as",
}
# Operators that only allocate or do nothing for real tensors.
# (aten::to and aten::_to_copy that reach no aten::copy_ are conversions to what the tensor
# already is.)
NO_WORK_OPS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg",
               "aten::to", "aten::_to_copy"}


def operator_counts(fn) -> collections.Counter:
    """Leaf aten operators of one call (those that call no other aten operator: the ones
    that compute or copy), views, aliases, bare allocations and no-ops excluded. Composite
    operators (matmul, linear, to) are counted through the leaves they dispatch to."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = collections.Counter()
    for e in prof.events():
        if not e.name.startswith("aten::") or e.name in VIEW_OPS or e.name in NO_WORK_OPS:
            continue
        if any(c.name.startswith("aten::") and c.name not in VIEW_OPS | NO_WORK_OPS for c in e.cpu_children):
            continue
        counts[e.name] += 1
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--list-ops", action="store_true", help="print the extra operators by name")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model = build_llama(args.layers, args.width, args.vocab, args.seq)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    fns, engine = step_modes(model, ids, model.model.layers[0], ["re:layers\\.\\d+\\."], args.rank)
    # Interleave the modes so slow drift of the machine hits all of them alike.
    times = {name: [] for name in fns}
    for _ in range(3):
        for name, fn in fns.items():
            times[name].append(median_time(fn, device, max(1, args.repeats // 3), warmup=2))
    t = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
    n_layers = len(engine.layers)
    ops_project, ops_floor = operator_counts(fns["project"]), operator_counts(fns["floor"])
    extra = {name: ops_project[name] - ops_floor[name] for name in ops_project | ops_floor}
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} CPU thread(s), torch {torch.__version__}")
    print(f"Llama L{args.layers} E{args.width} V{args.vocab}, T={args.seq}, B={args.batch}, "
          f"{n_layers} layers projected at rank {args.rank}")
    for name in fns:
        print(f"  {name:8s} {t[name] * 1000:8.2f} ms")
    print(f"project / train = {t['project'] / t['train']:.2f}   (goal <= 0.95)")
    print(f"project / floor = {t['project'] / t['floor']:.2f}   (goal <= 1.25)")
    print(f"extra non-view operators per projected layer = {sum(extra.values()) / n_layers:.1f}   (goal <= 3)")
    if args.list_ops:
        for name, count in sorted(extra.items(), key=lambda kv: -kv[1]):
            if count:
                print(f"  {count / n_layers:+6.2f}  {name}")


if __name__ == "__main__":
    main()
