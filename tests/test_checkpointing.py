"""--gradient-checkpointing: HF's non-reentrant checkpointing with the engine attached. A
checkpointed layer runs its forward twice, and its gradient is projected once: the vectors
equal those of the plain run, bit for bit, and the naive reference."""

import pytest
import torch
from helpers import kron_reference, rel_err, run_cli, tiny_gpt2, tiny_llama

from ghostproj import GradProjectionEngine
from ghostproj.data import collate
from ghostproj.engines.losses import causal_lm_losses
from ghostproj.models import enable_gradient_checkpointing
from ghostproj.scoring import load_projections


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_a_checkpointed_layer_runs_twice_and_is_projected_once(tokenizer, build):
    from ghostproj.data.batching import Example

    torch.manual_seed(0)
    model = build(len(tokenizer))
    examples = [Example(i, tokenizer(t)["input_ids"], None) for i, t in
                enumerate(["the cat sat on the mat", "planets orbit the sun in their paths", "bake"])]
    examples[1] = Example(1, examples[1].input_ids, [False] * 3 + [True] * (len(examples[1].input_ids) - 3))
    engine = GradProjectionEngine(model, rank=16)
    ref = kron_reference(model, examples, engine)
    assert enable_gradient_checkpointing(model) == 2
    calls = []
    block = next(m for n, m in model.named_modules() if n.endswith(("h.0.mlp", "layers.0.mlp")))
    inner = block.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)
    block.forward = counted
    batch = collate(examples, 0)
    with engine:
        losses, _ = causal_lm_losses(model(**batch.model_inputs()).logits, batch.labels, "mean")
        losses.sum().backward()
        got = engine.collect()
    assert len(calls) == 2  # the forward, and its recomputation in the backward pass
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("model_dir", ["gpt2_dir", "llama_dir"])
def test_project_and_naive_check_with_checkpointing(request, capsys, tmp_path, model_dir, data_file):
    model_dir = request.getfixturevalue(model_dir)
    common = ["--model", model_dir, "--data", data_file, "--rank", "16", "--max-length", "24", "--batch-size", "4",
              "--store-dtype", "float32"]
    for tag, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        code, _, err = run_cli(["project", *common, "--out", tmp_path / tag, *extra], capsys)
        assert code == 0, err
    plain, checkpointed = load_projections(tmp_path / "plain"), load_projections(tmp_path / "checkpointed")
    assert torch.equal(plain.index, checkpointed.index) and torch.equal(plain.grads, checkpointed.grads)
    code, out, err = run_cli(["naive-check", "--model", model_dir, "--data", data_file, "--max-length", "24",
                              "--gradient-checkpointing"], capsys)
    assert code == 0 and "OK" in out, err


def test_a_model_without_checkpointing_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    class Plain(GPT2LMHeadModel):
        supports_gradient_checkpointing = False

    with pytest.raises(Exception, match="does not support gradient checkpointing"):
        enable_gradient_checkpointing(Plain(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)))
