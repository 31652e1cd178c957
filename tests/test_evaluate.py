import json
import math

import numpy as np
import pytest
import torch
from helpers import TORCHRUN_MISSING, kron_reference, needs_torchrun, rel_err, run_cli, torchrun, write_jsonl
from test_scoring import reference

from ghostproj.scoring import score
from ghostproj.scoring.lds import (
    average_ranks,
    estimate_lds,
    resamples,
    spearman_columns,
    subset_predictions,
)


def test_average_ranks_share_ties_and_spearman_is_pearson_of_ranks():
    a = np.array([[3.0], [1.0], [3.0], [2.0]])
    assert average_ranks(a)[:, 0].tolist() == [3.5, 1.0, 3.5, 2.0]
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 4))
    y[:, 1] = x[:, 1] ** 3  # monotone: exactly 1
    rho = spearman_columns(x, y)
    assert rho[1] == pytest.approx(1.0)
    for j in range(4):
        rx, ry = average_ranks(x)[:, j], average_ranks(y)[:, j]
        assert rho[j] == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert np.isnan(spearman_columns(x, np.ones((20, 4)))).all()  # a constant outcome has no correlation


def _members(subsets, n, rng):
    m = np.zeros((subsets, n), dtype=bool)
    for s in range(subsets):
        m[s, rng.choice(n, n // 2, replace=False)] = True
    return m


def test_the_exact_datamodel_of_a_linear_model_has_lds_one_and_random_scores_none():
    """Least squares, one small gradient step from w0 on each subset: the query losses move by
    -lr * sum_{i in S} grad_j . grad_i to first order, so gradient dot products are the
    exact datamodel (LDS 1), and unrelated scores get LDS about 0."""
    rng = np.random.default_rng(1)
    n, m, d, subsets, lr = 200, 30, 8, 32, 1e-4
    x, y = rng.normal(size=(n, d)), rng.normal(size=n)
    xq, yq = rng.normal(size=(m, d)), rng.normal(size=m)
    w0 = rng.normal(size=d)
    grad_train = (x @ w0 - y)[:, None] * x  # d/dw of (x.w - y)^2 / 2
    grad_query = (xq @ w0 - yq)[:, None] * xq
    members = _members(subsets, n, rng)
    losses = np.empty((subsets, m))
    for s in range(subsets):
        w = w0 - lr * grad_train[members[s]].sum(axis=0)
        losses[s] = 0.5 * (xq @ w - yq) ** 2
    draws = resamples(subsets, m, 200, 0)
    exact = estimate_lds(grad_train @ grad_query.T, members, losses, draws)
    assert exact.value > 0.99 and exact.low <= 1.0 <= exact.high + 1e-9
    unrelated = estimate_lds(rng.normal(size=(n, m)), members, losses, draws)
    assert unrelated.low < 0.0 < unrelated.high
    flipped = estimate_lds(-grad_train @ grad_query.T, members, losses, draws)
    assert flipped.value < -0.99  # the sign convention: a positive score lowers the query's loss


def test_lds_matches_the_known_spearman_of_correlated_normal_outcomes():
    """Outcomes whose Pearson correlation with the prediction is rho: the expected Spearman
    over S subsets is 6/(pi (S+1)) (asin(rho) + (S-2) asin(rho/2)); the estimate's interval
    holds it."""
    rng = np.random.default_rng(2)
    n, m, subsets, rho = 400, 300, 32, 0.6
    scores = rng.normal(size=(n, m))
    members = _members(subsets, n, rng)
    pred = members.astype(float) @ scores
    z = (pred - pred.mean(0)) / pred.std(0)
    outcome = rho * z + math.sqrt(1 - rho ** 2) * rng.normal(size=z.shape)
    est = estimate_lds(scores, members, -outcome, resamples(subsets, m, 300, 0))
    expected = 6 / (math.pi * (subsets + 1)) * (math.asin(rho) + (subsets - 2) * math.asin(rho / 2))
    assert est.low <= expected <= est.high
    assert np.allclose(est.per_query, lds_per_query(scores, members, -outcome))


@pytest.fixture(scope="module")
def checkpoint_runs(tmp_path_factory, gpt2_dir, data_file):
    """The score tests' two runs, at the saved model and at a perturbed copy of it."""
    from transformers import GPT2LMHeadModel

    d = tmp_path_factory.mktemp("ckpt")
    other = d / "model2"
    model = GPT2LMHeadModel.from_pretrained(gpt2_dir)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(other)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gpt2_dir).save_pretrained(other)
    qdata = d / "query.jsonl"
    write_jsonl(qdata, [{"text": t} for t in ("the cat sat on the mat", "the bank raised rates", "bake the bread")])
    pairs = []
    for name, model_dir in (("a", gpt2_dir), ("b", other)):
        train, query = d / f"{name}-train", d / f"{name}-query"
        for args in (["--data", data_file, "--out", train, "--shard-size", "3", "--rank", "16",
                      "--layers", "c_attn,c_fc"], ["--data", qdata, "--out", query, "--like", train]):
            assert run_cli(["project", "--model", model_dir, "--max-length", "24", *args])[0] == 0
        pairs.append((train, query))
    return pairs


@pytest.mark.parametrize("metric,normalize,center", [("dot", "none", False), ("cosine", "layer", False),
                                                     ("influence", "none", False), ("dot", "unit", True),
                                                     ("influence-full", "layer", False)])
def test_checkpoint_ensemble_scores_are_the_sum_of_each_checkpoints_scores(checkpoint_runs, metric, normalize,
                                                                           center):
    (ta, qa), (tb, qb) = checkpoint_runs
    res = score([ta, tb], [qa, qb], metric=metric, normalize=normalize, center=center, keep_matrix=True, top_k=2,
                reduce="mean", chunk_rows=2)
    full = metric == "influence-full"
    ref = reference(ta, qa, metric, normalize, center, full=full) + reference(tb, qb, metric, normalize, center,
                                                                              full=full)
    assert (res.scores.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    single = score(ta, qa, metric=metric, normalize=normalize, center=center, keep_matrix=True)
    assert not torch.allclose(single.scores, res.scores)  # the second checkpoint counts
    for j in range(ref.shape[1]):
        assert torch.allclose(res.topk_scores[j], res.scores[torch.argsort(res.scores[:, j], descending=True)[:2], j])


def test_checkpoint_ensembles_refuse_what_does_not_add_up(capsys, checkpoint_runs):
    (ta, qa), (tb, qb) = checkpoint_runs
    code, _, err = run_cli(["score", ta, qa, tb], capsys)
    assert code == 2 and "even number" in err
    code, _, err = run_cli(["score", ta, qa, tb, tb], capsys)  # the training set as checkpoint 2's queries
    assert code == 2 and "query run holds other examples" in err
    code, _, err = run_cli(["score", ta, qa, tb, qb, "--fisher", ta / "nope.safetensors"], capsys)
    assert code == 2 and "one --fisher file per checkpoint (2)" in err
    code, _, err = run_cli(["score", ta, qa, tb, qb, "--top-k", "2"], capsys)
    assert code == 0, err


def test_checkpoint_ensembles_in_parts_with_fisher_files_and_under_torchrun_give_the_one_process_answer(
        capsys, tmp_path, checkpoint_runs):
    (ta, qa), (tb, qb) = checkpoint_runs
    whole = {n: tmp_path / f"whole-{n}" for n in ("top.jsonl", "sel.jsonl")}
    base = ["score", ta, qa, tb, qb, "--top-k", "3", "--reduce", "mean", "--show", "0"]
    assert run_cli([*base, "--topk-out", whole["top.jsonl"], "--select-out", whole["sel.jsonl"]], capsys)[0] == 0
    fishers = []
    for name, train in (("a", ta), ("b", tb)):
        assert run_cli(["fisher", train, "--out", tmp_path / f"F{name}.safetensors"], capsys)[0] == 0
        fishers.append(str(tmp_path / f"F{name}.safetensors"))
    with_files = tmp_path / "files-top.jsonl"
    assert run_cli([*base, "--fisher", ",".join(fishers), "--topk-out", with_files], capsys)[0] == 0
    assert with_files.read_bytes() == whole["top.jsonl"].read_bytes()
    part_files = [tmp_path / f"p{i}.safetensors" for i in range(2)]
    for i, path in enumerate(part_files):
        code, _, err = run_cli([*base, "--fisher", ",".join(fishers), "--num-parts", "2", "--part", str(i),
                                "--part-out", path], capsys)
        assert code == 0, err
    merged = {n: tmp_path / f"merged-{n}" for n in whole}
    assert run_cli(["merge-scores", *part_files, "--topk-out", merged["top.jsonl"], "--select-out",
                    merged["sel.jsonl"]], capsys)[0] == 0
    for name in whole:
        assert merged[name].read_bytes() == whole[name].read_bytes(), name
    if TORCHRUN_MISSING:
        return
    ranked = tmp_path / "ranked-top.jsonl"
    proc = torchrun(2, ["score", ta, qa, tb, qb, "--top-k", "3", "--show", "0", "--device", "cpu",
                        "--topk-out", ranked])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for mine, theirs in zip(ranked.read_text().splitlines(), whole["top.jsonl"].read_text().splitlines()):
        a, b = json.loads(mine), json.loads(theirs)
        assert a["train"] == b["train"] and a["scores"] == pytest.approx(b["scores"], rel=1e-5)


def test_checkpoints_with_their_own_seeds_average_the_projection_error_away(capsys, tmp_path, gpt2_dir, data_file):
    """Why evaluate gives each checkpoint its own seed, and score says so when they share
    one: four projections of the same gradients with one seed repeat one error; with four
    seeds their mean is nearer the exact inner products (by about 1/2 in expectation)."""
    common = ["project", "--model", gpt2_dir, "--data", data_file, "--max-length", "24", "--layers", "c_attn,c_fc",
              "--store-dtype", "float32"]
    exact = tmp_path / "exact"  # orthonormal at full rank: a rotation of each layer's gradient
    assert run_cli([*common, "--out", exact, "--projector", "orthonormal", "--rank-in", "256", "--rank-out", "256"],
                   capsys)[0] == 0
    runs = []
    for seed in range(4):
        runs.append(tmp_path / f"seed-{seed}")
        assert run_cli([*common, "--out", runs[-1], "--rank", "16", "--seed", str(seed)], capsys)[0] == 0
    truth = score(exact, exact, metric="dot", normalize="none", keep_matrix=True).scores.double()
    norms = truth.diagonal().clamp_min(0).sqrt()
    scale = norms[:, None] * norms[None, :]
    labelled = scale > 0  # (the empty text has no gradient)

    def error(result):  # root mean square over pairs of examples, relative to |g_i| |g_j|
        return float((((result.scores.double() / 4 - truth) / scale)[labelled] ** 2).mean().sqrt())

    shared = score([runs[0]] * 4, [runs[0]] * 4, metric="dot", normalize="none", keep_matrix=True)
    own = score(runs, runs, metric="dot", normalize="none", keep_matrix=True)
    assert error(own) < 0.7 * error(shared)
    assert any("Checkpoint(s) 2, 3, 4 use an earlier checkpoint's projection matrices" in n for n in shared.notes)
    assert not own.notes
    code, _, err = run_cli(["score", runs[0], runs[0], runs[0], runs[0], "--show", "0"], capsys)
    assert code == 0 and "project each checkpoint with its own --seed" in " ".join(err.split())


def _evaluate_args(gpt2_dir, data_file, query_file, out, *extra):
    return ["evaluate", "--model", gpt2_dir, "--train", data_file, "--query", query_file, "--out", out,
            "--subsets", "5", "--epochs", "1", "--checkpoints", "2", "--replicates", "50", "--rank", "16",
            "--max-length", "24", "--removal-queries", "2", "--removal-k", "2", "--batch-size", "4", *extra]


@pytest.fixture(scope="module")
def query_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("evq") / "query.jsonl"
    write_jsonl(path, [{"text": t} for t in ("the cat sat on the mat", "", "the bank raised rates again",
                                              "bake the bread for an hour", "planets orbit the sun")])
    return path


def test_evaluate_reports_every_setting_and_resumes_without_retraining(capsys, tmp_path, gpt2_dir, data_file,
                                                                        query_file):
    out = tmp_path / "ev"
    code, text, err = run_cli(_evaluate_args(gpt2_dir, data_file, query_file, out, "--num-parts", "2", "--part", "1"),
                              capsys)
    assert code == 0, err
    assert "trained 2 subset model(s)" in text  # subsets 1 and 3
    assert sorted(p.name for p in (out / "subsets").iterdir()) == ["subset-0001.safetensors",
                                                                   "subset-0003.safetensors"]
    assert not (out / "lds.json").exists()
    code, text, err = run_cli(_evaluate_args(gpt2_dir, data_file, query_file, out), capsys)
    assert code == 0, err
    assert "3 subset model(s) trained now" in text
    assert "1 of 5 queries have no label token" in err
    report = json.loads((out / "lds.json").read_text())
    assert report["queries"] == 4  # the empty query has no label token
    got = {(s["metric"], s["normalize"], s["checkpoints"]) for s in report["settings"]}
    assert got == {(m, n, c) for m in ("cosine", "dot", "influence") for n in ("none", "layer") for c in (1, 2)}
    for s in report["settings"]:
        assert s["interval95"][0] <= s["lds"] <= s["interval95"][1] and len(s["per_query"]) == 4
    assert report["recommended"] == "influence, --normalize layer, 2 checkpoint(s)"
    low, high = report["recommended_minus_baseline"][1:]
    assert low <= report["recommended_minus_baseline"][0] <= high
    assert report["removal"][0]["setting"] == "random" and len(report["removal"]) >= 2
    assert (out / "lds.png").stat().st_size > 1000
    (out / "subsets" / "subset-0002.safetensors").unlink()
    code, text, err = run_cli(_evaluate_args(gpt2_dir, data_file, query_file, out), capsys)
    assert code == 0, err
    assert "1 subset model(s) trained now" in text
    assert json.loads((out / "lds.json").read_text()) == report  # retraining is deterministic
    code, text, err = run_cli(_evaluate_args(gpt2_dir, data_file, query_file, out, "--metrics", "dot,inrun,tracin"), capsys)
    assert code == 0, err
    assert "0 subset model(s) trained now" in text  # other metrics only rescore
    inrun = [s for s in json.loads((out / "lds.json").read_text())["settings"] if s["metric"] == "inrun"]
    assert len(inrun) == 1 and -1.0 <= inrun[0]["lds"] <= 1.0
    tracin = [s for s in json.loads((out / "lds.json").read_text())["settings"] if s["metric"] == "tracin"]
    assert len(tracin) == 1 and tracin[0]["checkpoints"] == 2 and -1.0 <= tracin[0]["lds"] <= 1.0
    assert "tracin" in text and "all steps, 2 windows" in text
    args = _evaluate_args(gpt2_dir, data_file, query_file, out, "--metrics", "dot", "--layers", "c_fc")
    args[args.index("--rank") + 1] = "32"
    code, text, err = run_cli(args, capsys)
    assert code == 0, err
    assert "0 subset model(s) trained now" in text  # another rank and layers: new runs, the same models
    assert json.loads((out / "lds.json").read_text())["rank"] == 32
    code, text, err = run_cli(_evaluate_args(gpt2_dir, data_file, query_file, out, "--metrics", "dot,influence",
                                             "--vectors", "grad,adam"), capsys)
    assert code == 0, err
    assert "0 subset model(s) trained now" in text and "(adam)" in text
    kinds = {(s["metric"], s["vectors"]) for s in json.loads((out / "lds.json").read_text())["settings"]}
    assert kinds == {(m, v) for m in ("dot", "influence") for v in ("grad", "adam")}
    runs = out / "runs" / "rank-16-layers-all"
    assert (runs / "ckpt-2-seed-0" / "train-adam" / "manifest.json").exists()
    for c, seed in ((1, 1), (2, 0)):  # a seed per checkpoint, the final model's project's default
        for side in ("train", "query", "train-adam"):
            manifest = json.loads((runs / f"ckpt-{c}-seed-{seed}" / side / "manifest.json").read_text())
            assert manifest["projector"]["seed"] == seed
    code, text, err = run_cli(_evaluate_args(gpt2_dir, data_file, query_file, out, "--metrics", "influence",
                                             "--projection", "gaussian,eigen"), capsys)
    assert code == 0, err
    assert "0 subset model(s) trained now" in text and "(eigenbasis)" in text
    kinds = {(s["metric"], s["vectors"]) for s in json.loads((out / "lds.json").read_text())["settings"]}
    assert kinds == {("influence", "grad"), ("influence", "eigen")}
    for c, seed in ((1, 1), (2, 0)):  # each checkpoint in the eigenbasis of its own factors
        manifest = json.loads((runs / f"ckpt-{c}-seed-{seed}" / "train-eigen" / "manifest.json").read_text())
        assert manifest["projector"]["kind"] == "eigen"
        assert manifest["factors"]["path"] == str((runs / f"ckpt-{c}-seed-{seed}" / "factors.safetensors").resolve())


def test_evaluate_bad_inputs_get_one_sentence(capsys, tmp_path, gpt2_dir, data_file, query_file):
    silent = tmp_path / "silent.jsonl"
    write_jsonl(silent, [{"text": ""}, {"text": "a"}])
    cases = [
        (["--fraction", "1.5"], "--fraction must be between 0 and 1"),
        (["--fraction", "0"], "--fraction must be between 0 and 1"),
        (["--subsets", "3"], "too few"),
        (["--metrics", "cosine,nope"], "Unknown --metrics entry 'nope'"),
        (["--normalize", "weird"], "Unknown --normalize entry 'weird'"),
        (["--vectors", "grad,sgd"], "Unknown --vectors entry 'sgd'"),
        (["--projection", "gaussian,random"], "Unknown --projection entry 'random'"),
        (["--part", "2", "--num-parts", "2"], "--part must be in 0..1"),
    ]
    for extra, message in cases:
        args = _evaluate_args(gpt2_dir, data_file, query_file, tmp_path / "bad", *extra)
        if "--subsets" in extra:
            i = args.index("--subsets")
            del args[i : i + 2]
        code, _, err = run_cli(args, capsys)
        assert code == 2 and message in err, (extra, err)
        assert "Traceback" not in err
    args = _evaluate_args(gpt2_dir, data_file, silent, tmp_path / "bad2")
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "no example with a label token" in err
    out = tmp_path / "ev"
    assert run_cli(_evaluate_args(gpt2_dir, data_file, query_file, out, "--num-parts", "5", "--part", "0"),
                   capsys)[0] == 0
    code, _, err = run_cli(_evaluate_args(gpt2_dir, data_file, query_file, out, "--fraction", "0.4"), capsys)
    assert code == 2 and "other settings (fraction differ)" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, _, err = run_cli(_evaluate_args(gpt2_dir, data_file, query_file, tmp_path / "full"), capsys)
    assert code == 2 and "not an evaluation" in err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


@needs_torchrun
def test_torchrun_ranks_train_their_subsets_and_rank_0_reports_what_one_process_does(capsys, tmp_path, gpt2_dir,
                                                                                     data_file, query_file):
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ("--removal-queries", "0", "--projection", "gaussian,eigen")  # factors summed over the ranks too
    assert run_cli(_evaluate_args(gpt2_dir, data_file, query_file, one, *extra), capsys)[0] == 0
    proc = torchrun(2, _evaluate_args(gpt2_dir, data_file, query_file, two, *extra) + ["--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((two / "subsets").iterdir())) == 5
    a, b = (json.loads((d / "lds.json").read_text()) for d in (one, two))
    assert [s["lds"] for s in a["settings"]] == pytest.approx([s["lds"] for s in b["settings"]], abs=1e-9)


def test_in_run_scores_match_a_naive_training_loop(gpt2_dir, data_file, query_file):
    """Per step: lr * <grad l_i, grad l_q> / B from one backward per example at the step's
    weights, then an AdamW step on the batch's mean loss, exactly as the fine-tuning does."""
    from ghostproj.data import read_records, tokenize_records
    from ghostproj.jobs.retrain import Recipe, epoch_batches, in_run_scores
    from ghostproj.models import load_model

    model, tok = load_model(str(gpt2_dir), device="cpu")
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # the reference runs examples one by one: no dropout masks to line up
    train = tokenize_records(read_records(data_file), tok, 24)
    queries = [e for e in tokenize_records(read_records(query_file), tok, 24) if e.n_label_positions > 0]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe(epochs=2, lr=1e-2, batch_size=4, seed=1)
    got = in_run_scores(model, base, train, queries, recipe, 0)

    def grad(example):
        ids = torch.tensor([example.input_ids])
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:]).backward()
        return torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])

    model.load_state_dict(base)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    live = [r for r, e in enumerate(train) if e.n_label_positions > 0]
    batches = epoch_batches(len(live), recipe)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / len(batches))
    ref = torch.zeros(len(train), len(queries), dtype=torch.float64)
    for rows in batches:
        chosen = [live[r] for r in rows]
        q = torch.stack([grad(e) for e in queries])
        g = torch.stack([grad(train[i]) for i in chosen])
        ref[chosen] += opt.param_groups[0]["lr"] * (g @ q.T) / len(chosen)
        for p, mean_grad in zip(model.parameters(), _split_like(g.mean(0), model)):
            p.grad = mean_grad.to(p.dtype)
        opt.step()
        sched.step()
    assert ref.abs().max() > 0
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def _split_like(flat, model):
    out, at = [], 0
    for p in model.parameters():
        out.append(flat[at : at + p.numel()].view_as(p))
        at += p.numel()
    return out


def test_evaluate_on_a_llama_with_masked_prompts(capsys, tmp_path, llama_dir):
    rows = [{"prompt": f"question {i}:", "completion": f" the answer is {i % 3} and {i % 5}"} for i in range(12)]
    train, query = tmp_path / "train.jsonl", tmp_path / "query.jsonl"
    write_jsonl(train, rows)
    write_jsonl(query, [{"prompt": "question 3:", "completion": " the answer is 0"},
                        {"prompt": "question 7:", "completion": ""}])  # no completion token: left out
    code, _, err = run_cli(["evaluate", "--model", llama_dir, "--train", train, "--query", query, "--out",
                            tmp_path / "ev", "--subsets", "5", "--epochs", "1", "--checkpoints", "1", "--rank", "16",
                            "--max-length", "24", "--removal-queries", "0", "--replicates", "20", "--batch-size", "4",
                            "--metrics", "dot,influence,inrun"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "ev" / "lds.json").read_text())
    assert report["queries"] == 1 and len(report["settings"]) == 2 * 2 + 1


def lds_per_query(scores, members, losses):
    """Reference: each query's Spearman over subsets of predicted and negated actual loss."""
    return spearman_columns(subset_predictions(scores, members), -losses)


def test_tracin_is_the_sum_over_steps_of_lr_weighted_projected_dot_products(capsys, tmp_path, tokenizer, data_file,
                                                                           query_file):
    """With a checkpoint after every step, each window is one step and starts at that step's
    weights, so TracIn-CP is exactly sum_t lr_t / B_t <P g_i(theta_t), P g_q(theta_t)>:
    rebuilt here from the fine-tuning's own checkpoints and the naive projected gradients."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    from ghostproj import GradProjectionEngine
    from ghostproj.data.readers import DataSpec
    from ghostproj.inputs import load_model_and_examples
    from ghostproj.jobs.retrain import Recipe, epoch_batches, fine_tune
    from ghostproj.models import pad_token_id

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model_dir = tmp_path / "model"
    GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    inputs = load_model_and_examples(str(model_dir), [DataSpec(str(data_file)), DataSpec(str(query_file))],
                                     max_length=24, device="cpu", read_first=True)
    model, (train, query) = inputs.model, [s.examples for s in inputs.sets]
    query = [e for e in query if e.n_label_positions > 0]
    recipe = Recipe(epochs=1, lr=1e-3, batch_size=2, seed=0)
    live = [r for r, e in enumerate(train) if e.n_label_positions > 0]
    batches = [[live[r] for r in rows] for rows in epoch_batches(len(live), recipe)]
    assert len(batches) >= 3

    out = tmp_path / "ev"
    args = _evaluate_args(model_dir, data_file, query_file, out, "--metrics", "tracin", "--removal-queries", "0")
    args[args.index("--checkpoints") + 1] = str(len(batches))  # one window per step
    args[args.index("--batch-size") + 1] = "2"
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    got = load_file(out / "tracin" / "rank-16-layers-all.safetensors")["scores"]

    base = {k: v.clone() for k, v in model.state_dict().items()}
    states = [base] + [c.state for c in fine_tune(model, base, train, recipe, pad_token_id(inputs.tokenizer),
                                                  checkpoints=len(batches))]
    want = torch.zeros(len(train), len(query), dtype=torch.float64)
    for t, chosen in enumerate(batches):
        model.load_state_dict(states[t])
        engine = GradProjectionEngine(model, rank=16)  # the matrices of seed 0, as the store's
        g = kron_reference(model, [train[i] for i in chosen], engine)
        q = kron_reference(model, query, engine)
        lr = recipe.lr * (1 - t / len(batches))  # linear decay to zero
        want[chosen] += lr / len(chosen) * g @ q.t()
    assert got.abs().max() > 0
    assert rel_err(got, want) <= 1e-4
