import math

import torch
from helpers import run_cli, tiny_gpt2

from ghostproj import GradProjectionEngine
from ghostproj.data import Example
from ghostproj.jobs.fidelity import (
    Agreement,
    dense_projection,
    exact_layer_grads,
    run_fidelity,
)


def examples(tokenizer):
    texts = ["the cat sat on the mat", "bake the bread for forty minutes", "planets orbit the sun",
             "the doctor treated the fever", "stocks fell as the bank raised rates"]
    return [Example(i, tokenizer(t)["input_ids"]) for i, t in enumerate(texts)]


def test_full_rank_orthonormal_projection_is_exact(tokenizer):
    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer))
    # c_proj is 64 x 64: rank 4096 with orthonormal matrices is a rotation, so nothing is lost
    rep = run_fidelity(model, examples(tokenizer), ["h.0.attn.c_proj"], [4096], dense=False,
                       projector="orthonormal")
    a = rep.ranks[0].total
    assert rep.ranks[0].dim == 4096 and a.ip_corr > 0.99999 and a.ip_rel_err < 1e-6 and a.cos_abs_err < 1e-6
    assert rep.recommended == 4096


def test_small_ranks_are_worse_and_dense_is_measured(tokenizer):
    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer))
    rep = run_fidelity(model, examples(tokenizer), ["h.1.mlp"], [4, 1024], dense=True)
    small, large = rep.ranks
    assert small.total.ip_rel_err > large.total.ip_rel_err
    # the dense column is the agreement of the exact inner products with a dense projection
    # of each layer's exact gradients (recomputed here), and JL-accurate: relative error of
    # the inner products within 3 sqrt(2 / D)
    layers = GradProjectionEngine(model, ["h.1.mlp"], rank=1024).layers
    exact = exact_layer_grads(model, examples(tokenizer), [i.name for i in layers])
    dense = torch.cat([dense_projection(exact[i.name], i.size, n) for n, i in enumerate(layers)], dim=1)
    direct = Agreement.of(torch.cat([exact[i.name] for i in layers], dim=1), dense)
    assert abs(large.dense_total.ip_corr - direct.ip_corr) <= 1e-9
    assert abs(large.dense_total.ip_rel_err - direct.ip_rel_err) <= 1e-9
    assert large.dense_total.ip_rel_err <= 3 * math.sqrt(2 / large.dim)
    assert large.total.ip_rel_err <= 3 * math.sqrt(2 / large.dim)


def test_dense_projection_and_agreement():
    g = torch.randn(6, 5000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = dense_projection(g, 4000, seed=1)
    assert abs(Agreement.of(g, g).ip_corr - 1.0) <= 1e-12
    assert Agreement.of(g, p).ip_rel_err < 0.1  # JL: inner products kept to ~1/sqrt(k)


def test_exact_grads_match_autograd(tokenizer):
    """Against a gradient written here from scratch: the model's own HF loss (mean token
    cross-entropy) of each example alone, the Conv1D weight transposed to (n_out, n_in)."""
    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer))
    ex = examples(tokenizer)[:3]
    g = exact_layer_grads(model, ex, ["transformer.h.0.mlp.c_fc"])["transformer.h.0.mlp.c_fc"]
    assert g.shape == (3, 256 * 64)
    weight = model.transformer.h[0].mlp.c_fc.weight
    for i, e in enumerate(ex):
        ids = torch.tensor([e.input_ids])
        grad, = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, weight)
        ref = grad.t().reshape(-1).double()
        assert (g[i] - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_fidelity_cli(capsys, gpt2_dir, data_file):
    code, out, err = run_cli(["fidelity", "--model", gpt2_dir, "--data", data_file, "--ranks", "16,64",
                              "--layers", "c_fc", "--max-length", "24", "--samples", "6"], capsys)
    assert code == 0, err
    assert "kronecker" in out and "dense" in out and "per layer" in out
    code, _, err = run_cli(["fidelity", "--model", gpt2_dir, "--data", data_file, "--ranks", "a,b"], capsys)
    assert code == 2 and "--ranks must be" in err
