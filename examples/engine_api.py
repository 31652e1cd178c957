"""Project per-example gradients of the embedded demo model with the Python API, then
compare examples by cosine similarity.

    python examples/engine_api.py
"""

import torch

from ghostproj import GradProjectionEngine, causal_lm_losses
from ghostproj.data import Example, collate
from ghostproj.jobs.demo import ensure_demo
from ghostproj.models import load_model

assets = ensure_demo(print)
model, tokenizer = load_model(str(assets.model), device="cpu")
texts = [
    "The chef simmered the garlic over low heat.",
    "The baker roasted the onions over low heat.",
    "The striker scored a penalty in the last minute.",
    "The goalkeeper kicked the ball in the last minute.",
]
examples = [Example(i, tokenizer(t)["input_ids"]) for i, t in enumerate(texts)]
batch = collate(examples, tokenizer.pad_token_id)

# Projection mode: weights are frozen while attached, so no weight gradient is computed.
with GradProjectionEngine(model, layers=None, rank=256) as engine:
    logits = model(**batch.model_inputs()).logits
    losses, _ = causal_lm_losses(logits, batch.labels)  # one loss per example
    losses.sum().backward()  # the sum keeps each example's gradient its own
    vectors = engine.collect()  # [4, D] float32

unit = vectors / vectors.norm(dim=1, keepdim=True)
print(f"D = {engine.dim}; cosine similarities:")
torch.set_printoptions(precision=2)
print(unit @ unit.T)
