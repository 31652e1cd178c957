"""In-run gradient dot products on a two-layer MLP.

Each step trains on 8 synthetic examples while a fixed validation batch of 4 rides along
in the same forward/backward pass; the engine reports, per parameter and summed, how much
each training example's gradient agrees with the validation gradient, and leaves in .grad
only the training gradient.

    python examples/ghost_mlp.py
"""

import torch
from torch import nn

from ghostproj import GradDotProdEngine

torch.manual_seed(0)
centers = torch.randn(3, 10) * 2


def sample(n):
    y = torch.randint(0, 3, (n,))
    return centers[y] + torch.randn(n, 10), y


model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
x_val, y_val = sample(4)

engine = GradDotProdEngine(module=model, val_batch_size=len(x_val), loss_reduction="sum")
engine.attach()
for step in range(10):
    x, y = sample(8)
    loss = nn.functional.cross_entropy(model(torch.cat([x, x_val])), torch.cat([y, y_val]), reduction="sum")
    loss.backward()
    print(f"step {step}")
    for name, p in model.named_parameters():
        print(f"  {name:10s} " + " ".join(f"{v:+.3f}" for v in p.grad_dot_prod.tolist()))
    dots = engine.aggregate()  # [8]: this step's examples, in batch order
    print("  summed     " + " ".join(f"{v:+.3f}" for v in dots.tolist()))
    engine.prepare_gradients()  # .grad = gradient of the training part's mean loss
    optimizer.step()
    engine.clear_gradients()
engine.detach()

with torch.no_grad():
    val_loss = nn.functional.cross_entropy(model(x_val), y_val)
print(f"final validation loss {val_loss:.4f}")
