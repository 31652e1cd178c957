"""Project a GPT-2's per-example gradients to disk, load them back and compare examples.

    python examples/ghost_gradproj_lm.py                       # the embedded demo model
    python examples/ghost_gradproj_lm.py --model DIR --data FILE.jsonl
    ... --proj_layers mlp.c_fc,mlp.c_proj --proj_rank_total 2048
"""

import argparse
import json
import tempfile
from pathlib import Path

from ghostproj import ProjectOptions, load_projections, run_project
from ghostproj.engines.layers import select_layers
from ghostproj.jobs.demo import ensure_demo
from ghostproj.models import load_model

ap = argparse.ArgumentParser()
ap.add_argument("--model")
ap.add_argument("--data")
ap.add_argument("--proj_layers", default="mlp.c_fc,mlp.c_proj")
ap.add_argument("--proj_rank_total", type=int, default=1024, help="summed over the projected layers")
ap.add_argument("--out", help="run directory (default: a temporary one)")
args = ap.parse_args()

if args.model is None or args.data is None:
    demo = ensure_demo(print)
    args.model, args.data = args.model or str(demo.model), args.data or str(demo.query)
out = Path(args.out or tempfile.mkdtemp(prefix="ghostproj-lm-")) / "run.st"
patterns = [p for p in args.proj_layers.split(",") if p]

# the per-layer budget: count the layers the patterns select, then split the total evenly
model, _ = load_model(args.model, device="cpu")
n_layers = len(select_layers(model, patterns))
summary = run_project(ProjectOptions(model=args.model, data=args.data, out=str(out), layers=patterns,
                                     rank=max(1, args.proj_rank_total // n_layers), store_dtype="float32",
                                     show_progress=False))
print(f"projected {summary.examples} examples over {n_layers} layers: D = {summary.dim}, written to {out}")

runs = load_projections(out)  # vectors, dataset indices, losses, token counts, manifest
g = runs.grads / runs.grads.norm(dim=1, keepdim=True).clamp(min=1e-12)
sim = g @ g.T
sim.fill_diagonal_(-2)
best = sim.argmax(dim=1)
rows = [json.loads(line) for line in open(args.data)]
for i in range(3):
    j = int(best[i])
    print(f"example {int(runs.index[i])}: {rows[int(runs.index[i])].get('text', '')!r}")
    print(f"   most similar gradient: {int(runs.index[j])} {rows[int(runs.index[j])].get('text', '')!r} "
          f"(cosine {float(sim[i, j]):.3f})")
