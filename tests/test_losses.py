import torch
from helpers import tiny_gpt2

from ghostproj.data import Example, collate
from ghostproj.engines.losses import causal_lm_losses


def test_per_example_loss_is_batch_independent(tokenizer):
    torch.manual_seed(0)
    m = tiny_gpt2(len(tokenizer))
    exs = [Example(i, tokenizer(t)["input_ids"]) for i, t in enumerate(
        ["the cat sat on the mat", "bake the bread for forty minutes and the orchestra played", "planets"])]
    batch = collate(exs)
    for reduction in ("mean", "sum"):
        losses, counts = causal_lm_losses(m(**batch.model_inputs()).logits, batch.labels, reduction)
        for i, e in enumerate(exs):
            alone = collate([e])
            out = m(input_ids=alone.input_ids, labels=alone.input_ids)  # HF mean loss of one example
            expect = out.loss * (len(e.input_ids) - 1 if reduction == "sum" else 1)
            assert torch.allclose(losses[i], expect, rtol=1e-5, atol=1e-6)
            assert counts[i] == len(e.input_ids) - 1


def test_no_label_positions_give_zero_loss_and_no_nan():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.tensor([[1, 2, 3, 4], [1, -100, -100, -100]])
    losses, counts = causal_lm_losses(logits, labels)
    assert counts.tolist() == [3, 0] and losses[1] == 0
    losses.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() == 0
