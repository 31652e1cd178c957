"""Every run says what share of the model its layers hold, by kind of module, and a layer
pattern that names weights no layer type can project is refused rather than skipped."""

import json

import pytest
import torch
from helpers import fails, run_cli, tiny_gpt2, tiny_llama, tiny_qwen3_moe
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostproj import GradProjectionEngine
from ghostproj.engines.coverage import Coverage, engine_coverage
from ghostproj.errors import GhostprojError

E = 64  # the tiny GPT-2's width; per block c_attn E x 3E, attn.c_proj E x E, c_fc E x 4E, mlp.c_proj 4E x E


def test_gpt2_default_layers_cover_its_blocks_weights():
    model = tiny_gpt2(300)
    cov = engine_coverage(model, GradProjectionEngine(model, rank=4))
    blocks = 2 * (E * 3 * E + E * E + E * 4 * E + 4 * E * E)
    everything = sum(p.numel() for p in model.parameters())  # the head is tied to the token embeddings
    assert (cov.parameters.covered, cov.parameters.total) == (blocks, everything)
    assert (cov.matrices.covered, cov.matrices.total) == (8, 10)  # all but the two embeddings
    assert cov.by_kind["embeddings"].covered == 0 and cov.by_kind["embeddings"].total == 300 * E + 64 * E
    assert cov.by_kind["attention"].total - cov.by_kind["attention"].covered == 2 * (3 * E + E)  # their biases
    with_bias = engine_coverage(model, GradProjectionEngine(model, rank=4, bias=True))
    assert with_bias.by_kind["attention"].fraction == with_bias.by_kind["mlp"].fraction == 1.0
    assert f"covers {100 * blocks / everything:.1f}% of the model's parameters (8 of 10 weight matrices)" in cov.describe()
    assert Coverage.from_json(json.loads(json.dumps(cov.to_json()))).describe() == cov.describe()


def test_an_untied_head_is_its_own_kind():
    model = tiny_llama(300)
    cov = engine_coverage(model, GradProjectionEngine(model, rank=4))
    assert cov.by_kind["head"].total == 300 * 64 and cov.by_kind["head"].covered == 0
    assert cov.by_kind["norms"].covered == 0 and cov.by_kind["mlp"].fraction == 1.0


@settings(max_examples=20, deadline=None, derandomize=True)
@given(chosen=st.sets(st.sampled_from(["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "h.0.", "h.1.", "wte",
                                       "wpe"]), min_size=1), bias=st.booleans())
def test_covered_parameters_are_exactly_the_projected_layers(chosen, bias):
    model = tiny_gpt2(300)
    engine = GradProjectionEngine(model, sorted(chosen), rank=4, bias=bias)
    cov = engine_coverage(model, engine)
    modules = dict(model.named_modules())
    want = sum(modules[i.name].weight.numel() + (modules[i.name].bias.numel() if bias and i.type != "Embedding"
                                                 else 0) for i in engine.layers)
    assert cov.parameters.covered == want
    assert sum(s.covered for s in cov.by_kind.values()) == want
    assert sum(s.total for s in cov.by_kind.values()) == cov.parameters.total


def test_a_mixture_of_experts_shows_its_experts_left_out(tmp_path, tokenizer, data_file, capsys):
    torch.manual_seed(0)
    model = tiny_qwen3_moe(len(tokenizer))
    cov = engine_coverage(model, GradProjectionEngine(model, rank=4))
    assert cov.by_kind["experts"].covered == 0 and cov.by_kind["experts"].total == 2 * 4 * (32 * 32 + 32 * 16)
    assert cov.by_kind["router"].covered == 0 and cov.unsupported == {"Qwen3MoeExperts": 4, "Qwen3MoeTopKRouter": 2}
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    code, out, err = run_cli(["project", "--model", tmp_path / "moe", "--data", data_file, "--out", tmp_path / "r",
                              "--rank", "4", "--max-length", "24"], capsys)
    assert code == 0, err
    assert "0% of experts" in out and "no layer type projects (4 Qwen3MoeExperts, 2 Qwen3MoeTopKRouter)" in err
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["coverage"]["by_kind"]["experts"] == [0, cov.by_kind["experts"].total]
    code, out, _ = run_cli(["inspect", tmp_path / "r"], capsys)
    assert code == 0 and "0% of experts" in out
    # a pattern that names the experts with the attention is refused, never half-projected
    fails(capsys, "project", "--model", tmp_path / "moe", "--data", data_file, "--out", tmp_path / "r2",
          "--layers", "layers.0", match="names model.layers.0.mlp.experts (Qwen3MoeExperts), whose weights no "
                                          "layer type covers")
    assert not (tmp_path / "r2").exists()


def test_the_refusal_names_the_module():
    model = tiny_qwen3_moe(300)
    with pytest.raises(GhostprojError, match="'re:layers.1.mlp' names model.layers.1.mlp.experts"):
        GradProjectionEngine(model, ["re:layers.1.mlp", "q_proj"], rank=4)
