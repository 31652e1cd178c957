"""Kronecker factors, projection in their eigenbasis and EK-FAC scores, each against an
independent float64 reference: examples one at a time, full autograd, explicit
per-example gradients."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import fails, kron_reference, rel_err, run_cli, write_jsonl

from ghostproj import GradProjectionEngine, score
from ghostproj.data.readers import DataSpec, load_examples
from ghostproj.engines.projector import LayerProjector
from ghostproj.models import load_model
from ghostproj.scoring import load_projections
from ghostproj.store.factors_file import load_factors
from ghostproj.store.projector_file import load_projectors

ROWS = [
    {"prompt": "the doctor", "completion": " treated the fever"},
    {"prompt": "the bank raised", "completion": " rates again"},
    {"prompt": "a", "completion": " cat sat on the mat and looked at the bird"},
    {"prompt": "planets orbit", "completion": " the sun"},
    {"prompt": "compile the code and run", "completion": " the tests"},
    {"prompt": "bake", "completion": " the bread for forty minutes"},
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("factors") / "pc.jsonl"
    write_jsonl(path, ROWS)  # mixed lengths, masked prompts: padded batches with positions that carry no loss
    return path


def examples_of(model_dir, data, max_length=24):
    _, tok = load_model(str(model_dir), device="cpu")
    return load_examples(DataSpec(str(data)), tok, max_length).examples


def reference_factors(model, examples, names, reduction="mean", targets=None):
    """Per layer (sum x x^T, sum g g^T over every position, sum_n ||G_n||^2) in float64, from
    each example alone with the weights trainable: G_n is the weight's own .grad."""
    modules = dict(model.named_modules())
    model = model.double()
    sums = {n: [0.0, 0.0, 0.0] for n in names}
    seen, seen_examples = {}, []
    hooks = []
    for n in names:
        def fwd(mod, args, out, n=n):
            seen[n] = [args[0].detach()]
            out.register_hook(lambda g: seen[n].append(g.detach()))
        hooks.append(modules[n].register_forward_hook(fwd))
    try:
        for ex in examples:
            ids = torch.tensor([ex.input_ids])
            labels = ids[0, 1:].clone() if targets is None else targets[len(seen_examples)]
            labels[~torch.tensor(ex.loss_mask[1:])] = -100
            seen_examples.append(ex)
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids).logits[0, :-1]
            F.cross_entropy(logits, labels, ignore_index=-100, reduction=reduction).backward()
            for n in names:
                x, g = (t[0] for t in seen[n])
                sums[n][0] += x.t() @ x
                sums[n][1] += g.t() @ g
                sums[n][2] += float(modules[n].weight.grad.square().sum())
    finally:
        for h in hooks:
            h.remove()
        model.float()
    return sums


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_factors_equal_a_float64_reference(capsys, tmp_path, data, which, gpt2_dir, llama_dir):
    model_dir = gpt2_dir if which == "gpt2" else llama_dir  # HF Conv1D, and nn.Linear
    out = tmp_path / "f.safetensors"
    code, _, err = run_cli(["factors", "--model", model_dir, "--data", data, "--out", out, "--max-length", "24",
                            "--batch-size", "4"], capsys)
    assert code == 0, err
    totals, record = load_factors(out)
    model, _ = load_model(str(model_dir), device="cpu")
    examples = examples_of(model_dir, data)
    ref = reference_factors(model, examples, list(totals.layers))
    assert totals.examples == len(ROWS) and len(totals.layers) >= 6
    for name, f in totals.layers.items():
        a, g, sq = ref[name]
        assert torch.allclose(f.a, a, rtol=1e-5, atol=1e-6 * float(a.abs().max())), name
        assert torch.allclose(f.g, g, rtol=1e-4, atol=1e-5 * float(g.abs().max())), name
        assert f.sq_norms == pytest.approx(sq, rel=1e-4), name
        assert f.positions == sum(len(e.input_ids) for e in examples)


def test_parts_merge_into_the_one_process_factors(capsys, tmp_path, data, gpt2_dir):
    args = ["factors", "--model", gpt2_dir, "--data", data, "--max-length", "24", "--batch-size", "2"]
    assert run_cli([*args, "--out", tmp_path / "all.safetensors"], capsys)[0] == 0
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"p{i}.safetensors")
        assert run_cli([*args, "--out", parts[-1], "--num-shards", "2", "--shard-id", str(i)], capsys)[0] == 0
    fails(capsys, "factors", "--merge", "--out", tmp_path / "m.safetensors", parts[0], match="missing")
    code, _, err = run_cli(["factors", "--merge", "--out", tmp_path / "m.safetensors", *parts], capsys)
    assert code == 0, err
    whole, merged = load_factors(tmp_path / "all.safetensors")[0], load_factors(tmp_path / "m.safetensors")[0]
    assert merged.examples == whole.examples
    for name, f in whole.layers.items():
        assert torch.allclose(merged.layers[name].a, f.a, rtol=1e-5, atol=1e-6 * float(f.a.abs().max())) \
            and merged.layers[name].positions == f.positions


@pytest.fixture(scope="module")
def eigen_runs(tmp_path_factory, data, gpt2_dir):
    d = tmp_path_factory.mktemp("eigen")
    common = ["--model", gpt2_dir, "--max-length", "24", "--store-dtype", "float32"]
    assert run_cli(["factors", "--model", gpt2_dir, "--data", data, "--out", d / "f.safetensors", "--max-length",
                    "24"])[0] == 0
    assert run_cli(["project", *common, "--data", data, "--out", d / "train.st", "--factors", d / "f.safetensors",
                    "--rank", "16"])[0] == 0
    assert run_cli(["project", *common, "--data", data, "--out", d / "query.st", "--like", d / "train.st"])[0] == 0
    return d


def test_eigenbasis_vectors_are_the_top_block_of_the_naive_gradient(eigen_runs, data, gpt2_dir):
    run = load_projections(eigen_runs / "train.st")
    names = [i.name for i in run.layers]
    shapes = {i.name: ((i.k_in, i.k_out), (i.n_in, i.n_out)) for i in run.layers}
    matrices = load_projectors(eigen_runs / "train.st" / "projector.safetensors", names, shapes)
    totals, _ = load_factors(eigen_runs / "f.safetensors")
    for name, (p_in, p_out) in matrices.items():  # the rows are A's and G's leading eigenvectors
        for p, sums in ((p_in, totals.layers[name].a), (p_out, totals.layers[name].g)):
            vals = torch.linalg.eigvalsh(sums).flip(0)[: p.shape[0]]
            assert torch.allclose(p.double() @ sums @ p.double().t(), torch.diag(vals), atol=1e-6 * float(vals[0]))
    model, _ = load_model(str(gpt2_dir), device="cpu")
    engine = GradProjectionEngine(model, [f"re:^{n}$" for n in names], ranks={n: s[0] for n, s in shapes.items()},
                                  projectors={n: LayerProjector(*m) for n, m in matrices.items()})
    ref = kron_reference(model, examples_of(gpt2_dir, data), engine)
    assert rel_err(run.grads, ref) <= 1e-5


def test_ekfac_scores_follow_the_formula(eigen_runs):
    train, query = load_projections(eigen_runs / "train.st"), load_projections(eigen_runs / "query.st")
    base = train.manifest.factors["lambda_base"]
    damping = 0.3
    got = score(eigen_runs / "train.st", eigen_runs / "query.st", metric="influence", normalize="none",
                damping=damping, keep_matrix=True)
    weights = []
    for info in train.layers:
        block = train.grads[:, info.offset:info.offset + info.size].double()
        weights.append(1 / (block.square().mean(0) + damping * base[info.name]))
    want = (train.grads.double() * torch.cat(weights)) @ query.grads.double().t()
    assert torch.allclose(got.scores.double(), want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_at_full_rank_the_scores_are_full_space_ekfac(capsys, tmp_path, data, gpt2_dir):
    """k = n keeps the whole eigenbasis: the scores are EK-FAC computed from explicit
    per-example gradients, in no projection at all."""
    layer = "transformer.h.1.mlp.c_proj"  # 256 -> 64
    d = tmp_path
    common = ["--model", gpt2_dir, "--max-length", "24", "--store-dtype", "float32"]
    assert run_cli(["factors", "--model", gpt2_dir, "--data", data, "--out", d / "f.safetensors", "--max-length",
                    "24", "--layers", layer], capsys)[0] == 0
    assert run_cli(["project", *common, "--data", data, "--out", d / "t.st", "--factors", d / "f.safetensors",
                    "--layers", layer, "--rank-in", "256", "--rank-out", "64"], capsys)[0] == 0
    assert run_cli(["project", *common, "--data", data, "--out", d / "q.st", "--like", d / "t.st"], capsys)[0] == 0
    got = score(d / "t.st", d / "q.st", metric="influence", normalize="none", damping=0.1, keep_matrix=True).scores
    model, _ = load_model(str(gpt2_dir), device="cpu")
    model.double()
    examples = examples_of(gpt2_dir, data)
    grads = []
    module = dict(model.named_modules())[layer]
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        labels = ids[0, 1:].clone()
        labels[~torch.tensor(ex.loss_mask[1:])] = -100
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(input_ids=ids).logits[0, :-1], labels, ignore_index=-100).backward()
        grads.append(module.weight.grad.t().clone())  # (n_out, n_in)
    totals, _ = load_factors(d / "f.safetensors")
    q_a = torch.linalg.eigh(totals.layers[layer].a)[1]
    q_g = torch.linalg.eigh(totals.layers[layer].g)[1]
    rot = torch.stack([q_g.t() @ g @ q_a for g in grads])  # each gradient in the Kronecker eigenbasis
    lam = rot.square().mean(0)
    damping = 0.1 * lam.mean()  # the mean over the whole space: rotations keep norms
    flat = rot.reshape(len(grads), -1)
    want = (flat / (lam.reshape(-1) + damping)) @ flat.t()
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    assert not np.isclose(float(want[0, 1]), float((flat @ flat.t())[0, 1]))  # the weighting is not a no-op


def test_bad_factor_inputs_are_one_sentence(capsys, tmp_path, data, gpt2_dir, llama_dir, eigen_runs):
    f = eigen_runs / "f.safetensors"
    base = ["project", "--data", data, "--max-length", "24", "--factors", f]
    fails(capsys, *base, "--model", llama_dir, "--out", tmp_path / "a", match="cover the layers")
    fails(capsys, *base, "--model", gpt2_dir, "--out", tmp_path / "b", "--layers", "c_fc", match="cover the layers")
    other = tmp_path / "other"
    model, tok = load_model(str(gpt2_dir), device="cpu")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(0.01)
    model.save_pretrained(other)
    tok.save_pretrained(other)
    fails(capsys, *base, "--model", other, "--out", tmp_path / "c", match="another model")
    fails(capsys, *base, "--model", gpt2_dir, "--out", tmp_path / "d", "--projector", "rademacher",
          match="cannot be combined with --projector")
    fails(capsys, "project", "--model", gpt2_dir, "--data", data, "--out", tmp_path / "e", "--factors",
          data, match="not a factors file")
    gaussian = tmp_path / "g.st"
    assert run_cli(["project", "--model", gpt2_dir, "--data", data, "--out", gaussian, "--rank", "16",
                    "--max-length", "24"], capsys)[0] == 0
    fails(capsys, "score", gaussian, eigen_runs / "query.st", match="projector matrices differ")
    fails(capsys, "score", eigen_runs / "train.st", eigen_runs / "query.st", "--metric", "influence-full",
          match="use --metric influence")
    fails(capsys, "factors", "--model", gpt2_dir, "--data", data, "--out", data, "--overwrite",
          match="one of the inputs")


def test_every_scorer_gives_the_same_ekfac_answer(capsys, tmp_path, eigen_runs):
    """score, score with a Fisher file in parts then merge-scores, and an exact index: one
    answer for an eigenbasis run."""
    import json

    train, query = eigen_runs / "train.st", eigen_runs / "query.st"

    def topk(path):
        return [json.loads(line) for line in path.read_text().splitlines()]

    assert run_cli(["score", train, query, "--top-k", "3", "--show", "0", "--topk-out", tmp_path / "a.jsonl"],
                   capsys)[0] == 0
    fisher = tmp_path / "fisher.safetensors"
    assert run_cli(["fisher", train, "--out", fisher], capsys)[0] == 0  # raw coordinates, whatever --normalize
    parts = [tmp_path / f"p{i}" for i in range(2)]
    for i, part in enumerate(parts):
        code, _, err = run_cli(["score", train, query, "--fisher", fisher, "--top-k", "3", "--num-parts", "2",
                                "--part", str(i), "--part-out", part, "--show", "0"], capsys)
        assert code == 0, err
    assert run_cli(["merge-scores", *parts, "--topk-out", tmp_path / "b.jsonl"], capsys)[0] == 0
    code, _, err = run_cli(["index", "build", train, "--out", tmp_path / "idx", "--factory", "Flat", "--check", "0"],
                           capsys)
    assert code == 0, err
    assert run_cli(["index", "query", tmp_path / "idx", query, "--top-k", "3", "--topk-out", tmp_path / "c.jsonl"],
                   capsys)[0] == 0
    want = topk(tmp_path / "a.jsonl")
    for other in ("b.jsonl", "c.jsonl"):
        got = topk(tmp_path / other)
        assert [g["train"] for g in got] == [w["train"] for w in want], other
        for g, w in zip(got, want):
            assert g["scores"] == pytest.approx(w["scores"], rel=1e-4, abs=1e-6), other


def test_naive_check_and_fidelity_take_the_factors(capsys, tmp_path, data, gpt2_dir, eigen_runs):
    f = eigen_runs / "f.safetensors"
    code, out, err = run_cli(["naive-check", "--model", gpt2_dir, "--data", data, "--max-length", "24",
                              "--rank", "16", "--factors", f], capsys)
    assert code == 0 and "OK" in out, err
    fails(capsys, "naive-check", "--model", gpt2_dir, "--data", data, "--factors", f, "--layers", "c_fc",
          match="cover the layers")
    fails(capsys, "naive-check", "--model", gpt2_dir, "--data", data, "--factors", f, "--bias",
          match="cannot be combined")
    one = tmp_path / "c_fc.safetensors"
    assert run_cli(["factors", "--model", gpt2_dir, "--data", data, "--out", one, "--max-length", "24",
                    "--layers", "h.0.mlp.c_fc"], capsys)[0] == 0
    code, out, err = run_cli(["fidelity", "--model", gpt2_dir, "--data", data, "--max-length", "24", "--layers",
                              "h.0.mlp.c_fc", "--factors", one, "--ranks", "16,16384", "--no-dense"], capsys)
    assert code == 0, err
    rows = [line.replace("│", " ").split() for line in out.splitlines() if "eigenbasis" in line]
    assert [r[0] for r in rows] == ["16", "16384"]
    full = rows[1]  # the whole basis: a rotation, so inner products are exact
    assert float(full[3]) == pytest.approx(1.0, abs=1e-3) and float(full[4]) <= 1e-3
    assert float(rows[0][3]) < 0.999  # a 16-coordinate truncation is not


def test_true_fisher_factors_use_labels_drawn_from_the_model(capsys, tmp_path, data, gpt2_dir):
    """--fisher-labels sampled: the reference takes each example's labels as the run drew
    them (batch size 1: batch i is example i, drawn from its own float32 logits)."""
    from ghostproj.jobs.factors import sampled_labels

    out = tmp_path / "true.safetensors"
    code, _, err = run_cli(["factors", "--model", gpt2_dir, "--data", data, "--out", out, "--max-length", "24",
                            "--batch-size", "1", "--fisher-labels", "sampled", "--seed", "3"], capsys)
    assert code == 0, err
    totals, record = load_factors(out)
    assert record["fisher_labels"] == {"kind": "sampled", "seed": 3}
    model, _ = load_model(str(gpt2_dir), device="cpu")
    examples = examples_of(gpt2_dir, data)
    targets = []
    for i, ex in enumerate(examples):
        ids = torch.tensor([ex.input_ids])
        labels = torch.where(torch.tensor([ex.loss_mask]), ids, -100)
        with torch.no_grad():
            drawn = sampled_labels(model(input_ids=ids).logits, labels, torch.Generator().manual_seed(3 * 1_000_003 + i))
        targets.append(drawn[0, 1:].clone())
    ref = reference_factors(model, examples, list(totals.layers), targets=targets)
    empirical = reference_factors(model, examples, list(totals.layers))
    for name, f in totals.layers.items():
        a, g, sq = ref[name]
        assert torch.allclose(f.a, a, rtol=1e-5, atol=1e-6 * float(a.abs().max())), name
        assert torch.allclose(f.g, g, rtol=1e-4, atol=1e-5 * float(g.abs().max())), name
        assert f.sq_norms == pytest.approx(sq, rel=1e-4), name
        assert not torch.allclose(f.g, empirical[name][1], rtol=1e-2)  # other labels, another G
