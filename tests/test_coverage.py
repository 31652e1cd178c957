"""Every run says what share of the model its layers hold, by kind of module, and a layer
pattern that names weights no layer type can project is refused rather than skipped."""

import json

import pytest
import torch
from helpers import run_cli, tiny_gpt2, tiny_llama, tiny_qwen3_moe
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


def test_a_mixture_of_experts_is_covered_whole(tmp_path, tokenizer, data_file, capsys):
    torch.manual_seed(0)
    model = tiny_qwen3_moe(len(tokenizer))
    cov = engine_coverage(model, GradProjectionEngine(model, rank=16))
    assert cov.by_kind["experts"].covered == cov.by_kind["experts"].total == 2 * 4 * (32 * 32 + 32 * 16)
    assert cov.by_kind["router"].fraction == 1.0 and cov.unsupported == {}
    everything = engine_coverage(model, GradProjectionEngine(model, ["re:."], rank=16))  # embeddings and head too
    assert everything.parameters.fraction >= 0.95 and everything.matrices.covered == everything.matrices.total
    model.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    code, out, err = run_cli(["project", "--model", tmp_path / "moe", "--data", data_file, "--out", tmp_path / "r",
                              "--rank", "16", "--max-length", "24"], capsys)
    assert code == 0, err
    assert "0% of embeddings" in out and "of experts" not in out and "of router" not in out  # whole kinds: not listed
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert manifest["coverage"]["by_kind"]["experts"] == [cov.by_kind["experts"].total] * 2
    code, out, _ = run_cli(["inspect", tmp_path / "r"], capsys)
    assert code == 0 and "0% of embeddings" in out


class Scale(torch.nn.Module):
    """A module with a weight matrix that no layer type covers."""

    def __init__(self, n):
        super().__init__()
        self.table = torch.nn.Parameter(torch.eye(n))

    def forward(self, x):
        return x @ self.table


def test_weights_no_layer_type_covers_are_named_and_a_pattern_naming_them_is_refused(tokenizer):
    torch.manual_seed(0)
    model = tiny_llama(len(tokenizer))
    model.model.layers[0].mlp.scale = Scale(64)  # in the block, out of the way of its forward
    cov = engine_coverage(model, GradProjectionEngine(model, rank=16))
    assert cov.unsupported == {"Scale": 1}
    with pytest.raises(GhostprojError, match="'layers.0' names model.layers.0.mlp.scale \\(Scale\\), whose weights "
                                             "no layer type covers"):
        GradProjectionEngine(model, ["layers.0"], rank=16)


def test_a_pattern_of_only_unsupported_modules_is_refused():
    model = tiny_qwen3_moe(300)
    with pytest.raises(GhostprojError, match="'norm' matches only unsupported layer types"):
        GradProjectionEngine(model, ["norm"], rank=4)
