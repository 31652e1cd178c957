"""Projected per-example gradients of a two-layer MLP, three ways.

    python examples/ghost_gradproj_mlp.py --mode project      # vectors + similarities
    python examples/ghost_gradproj_mlp.py --mode naive_check  # engine == slow exact computation
    python examples/ghost_gradproj_mlp.py --mode non_interf   # attaching changes nothing in training
    ... --proj_rank_total 512    # total budget k_in * k_out summed over both layers
"""

import argparse
import copy

import torch
from torch import nn

from ghostproj import GradProjectionEngine

ap = argparse.ArgumentParser()
ap.add_argument("--mode", choices=["project", "non_interf", "naive_check"], default="project")
ap.add_argument("--proj_rank_total", type=int, default=256)
args = ap.parse_args()

torch.manual_seed(0)
centers = torch.randn(3, 20) * 2
y = torch.randint(0, 3, (16,))
x = centers[y] + torch.randn(16, 20)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))
layers = ["0", "2"]
rank = args.proj_rank_total // len(layers)  # per-layer budget


def loss_sum(out, target):
    return nn.functional.cross_entropy(out, target, reduction="sum")  # keeps examples separate


if args.mode == "project":
    with GradProjectionEngine(model, layers, rank=rank) as engine:
        loss_sum(model(x), y).backward()
        g = engine.collect()
    unit = g / g.norm(dim=1, keepdim=True)
    sim = unit @ unit.T
    same = (y[:, None] == y[None, :]) & ~torch.eye(16, dtype=torch.bool)
    print(f"vectors {tuple(g.shape)}; layers " + ", ".join(f"{i.name} ({i.k_out}x{i.k_in})" for i in engine.layers))
    print(f"mean cosine, same class {sim[same].mean():.3f}; different class {sim[~same & ~torch.eye(16, dtype=torch.bool)].mean():.3f}")

elif args.mode == "naive_check":
    engine = GradProjectionEngine(model, layers, rank=rank)
    with engine:
        loss_sum(model(x), y).backward()
        got = engine.collect()
    worst = 0.0
    for i in range(16):
        model.zero_grad()
        loss_sum(model(x[i:i + 1]), y[i:i + 1]).backward()
        ref = torch.cat([(engine.projectors[l.name].p_out @ model.get_submodule(l.name).weight.grad
                          @ engine.projectors[l.name].p_in.T).reshape(-1) for l in engine.layers])
        worst = max(worst, float((got[i] - ref).norm() / ref.norm()))
    print(f"max relative error engine vs naive: {worst:.2e}")
    assert worst < 1e-4

else:
    plain = copy.deepcopy(model)
    watched = copy.deepcopy(model)
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(watched.parameters(), lr=0.1)
    engine = GradProjectionEngine(watched, layers, rank=rank, freeze_weights=False).attach()
    for _ in range(5):
        for m, opt in ((plain, opt_a), (watched, opt_b)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        engine.collect()
    engine.detach()
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(plain.parameters(), watched.parameters()))
    print(f"max parameter difference after 5 steps with vs without the engine: {diff:.1e}")
    assert diff == 0.0
