import json

import pytest
import torch
from helpers import needs_torchrun, run_cli, torchrun, write_jsonl
from safetensors.torch import load_file

from ghostproj.scoring import load_projections, score


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gpt2_dir, data_file):
    """A bf16 training run in several shards and a float32-free query run made with --like."""
    d = tmp_path_factory.mktemp("runs")
    qdata = d / "query.jsonl"
    write_jsonl(qdata, [{"text": t, "task": g} for t, g in [
        ("the cat sat on the mat", "a"), ("the bank raised rates", "b"), ("bake the bread", "a"),
        ("", "b"), ("planets orbit the sun and the orchestra played", "b")]])
    train, query = d / "train.st", d / "query.st"
    for args in (["--data", data_file, "--out", train, "--shard-size", "3", "--rank", "16", "--layers", "c_attn,c_fc"],
                 ["--data", qdata, "--out", query, "--like", train]):
        code = run_cli(["project", "--model", gpt2_dir, "--max-length", "24", *args])[0]
        assert code == 0
    return train, query


def reference(train, query, metric, normalize="none", center=False, damping=0.1, full=False):
    g = load_projections(train).grads.double()
    v = load_projections(query).grads.double()
    layers = load_projections(train).layers
    if center:
        mu = g.mean(0)
        g, v = g - mu, v - mu

    def norm(x):
        if normalize == "layer":
            x = torch.cat([x[:, l.offset:l.offset + l.size] / x[:, l.offset:l.offset + l.size].norm(dim=1, keepdim=True).clamp(min=1e-300) for l in layers], 1)
        if normalize == "unit" or metric == "cosine":
            x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-300)
        return x

    g, v = norm(g), norm(v)
    if metric.startswith("influence"):
        spans = [(0, g.shape[1])] if full else [(l.offset, l.offset + l.size) for l in layers]
        out = torch.zeros(g.shape[0], v.shape[0], dtype=torch.float64)
        for s, e in spans:
            f = g[:, s:e].T @ g[:, s:e] / g.shape[0]
            lam = damping * f.diagonal().mean()
            out += g[:, s:e] @ torch.linalg.inv(f + lam * torch.eye(e - s, dtype=torch.float64)) @ v[:, s:e].T
        return out
    return g @ v.T


@pytest.mark.parametrize("metric,normalize,center", [
    ("dot", None, False), ("cosine", None, False), ("influence", None, False), ("influence-full", None, False),
    ("dot", "layer", False), ("dot", "unit", True), ("cosine", "layer", True), ("influence", "layer", False),
])
def test_metrics_match_float64(runs, metric, normalize, center):
    train, query = runs
    res = score(train, query, metric=metric, normalize=normalize, center=center, keep_matrix=True, top_k=3,
                reduce="mean", chunk_rows=2)
    ref = reference(train, query, metric, normalize or "none", center, full=(metric == "influence-full"))
    scale = ref.abs().max()
    assert torch.isfinite(res.scores).all()
    assert (res.scores.double() - ref).abs().max() <= 1e-4 * scale
    assert res.train_index.tolist() == list(range(10)) and res.query_index.tolist() == list(range(5))
    # top-k is the best k of each column, best first
    for j in range(5):
        order = torch.argsort(res.scores[:, j], descending=True)[:3]
        assert torch.allclose(res.topk_scores[j], res.scores[order, j])
    assert torch.allclose(res.selection, res.scores.mean(1), atol=1e-6)


def test_zero_vectors_score_zero_under_cosine(runs):
    train, query = runs
    res = score(train, query, metric="cosine", keep_matrix=True)
    assert torch.all(res.scores[:, 3] == 0)  # the empty query
    assert torch.all(res.scores[[2, 3], :] == 0)  # training examples without label positions


def test_layer_subset(runs):
    train, query = runs
    sub = load_projections(train, layers=["h.1.mlp"])
    assert [l.name for l in sub.layers] == ["transformer.h.1.mlp.c_fc"] and sub.grads.shape[1] == 16
    res = score(train, query, metric="dot", normalize="none", layers=["h.1.mlp"], keep_matrix=True)
    full = load_projections(train).grads
    off = [l for l in load_projections(train).layers if l.name == "transformer.h.1.mlp.c_fc"][0].offset
    ref = full[:, off:off + 16].double() @ load_projections(query).grads[:, off:off + 16].double().T
    assert (res.scores.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_mmap_loading(runs):
    train, _ = runs
    p = load_projections(train, mmap=True)
    assert len(p.grads) == 4 and p.grads[0].dtype == torch.bfloat16
    assert torch.equal(torch.cat([g.float() for g in p.grads]), load_projections(train).grads)


def test_score_cli_outputs(capsys, runs, tmp_path):
    train, query = runs
    code, out, err = run_cli(["score", train, query, "--top-k", "4", "--out", tmp_path / "s.safetensors",
                              "--topk-out", tmp_path / "t.jsonl", "--reduce", "max", "--group-field", "task",
                              "--select-out", tmp_path / "sel.jsonl", "--show", "1"], capsys)
    assert code == 0, err
    assert "the cat sat on the mat" in out  # texts shown from the recorded data file
    saved = load_file(str(tmp_path / "s.safetensors"))
    assert saved["scores"].shape == (10, 5) and saved["query_index"].tolist() == list(range(5))
    lines = [json.loads(l) for l in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and len(lines[0]["train"]) == 4
    best = torch.argsort(saved["scores"][:, 0], descending=True)[:4].tolist()
    assert lines[0]["train"] == best
    sel = [json.loads(l) for l in (tmp_path / "sel.jsonl").read_text().splitlines()]
    # max over groups of the group means: groups a = {0, 2}, b = {1, 3, 4}
    s = saved["scores"]
    expect = torch.maximum(s[:, [0, 2]].mean(1), s[:, [1, 3, 4]].mean(1))
    assert torch.allclose(torch.tensor([r["score"] for r in sel]), expect, atol=1e-6)


def test_score_bad_inputs(capsys, runs, tmp_path, gpt2_dir, data_file):
    train, query = runs

    def fails(*args, match):
        code, _, err = run_cli(args, capsys)
        assert code != 0 and match in err and "Traceback" not in err, err

    other = tmp_path / "other.st"
    assert run_cli(["project", "--model", gpt2_dir, "--data", data_file, "--out", other, "--rank", "16",
                    "--layers", "c_attn,c_fc", "--seed", "1", "--max-length", "24"])[0] == 0
    fails("score", train, other, match="projector matrices differ")
    wider = tmp_path / "wider.st"  # same seed and layers, another rank: D differs too, but the cause is named
    assert run_cli(["project", "--model", gpt2_dir, "--data", data_file, "--out", wider, "--rank", "32",
                    "--layers", "c_attn,c_fc", "--max-length", "24"])[0] == 0
    fails("score", train, wider, match="k's (ranks) differ")
    fails("score", train, tmp_path, match="not a ghostproj projection run")
    fails("score", train, query, "--top-k", "0", match="--top-k must be at least 1")
    fails("score", train, query, "--metric", "magic", match="Unknown --metric")
    # a truncated shard is named before anything is read
    shard = sorted(other.glob("grads-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    fails("score", other, other, match=shard.name)
    fails("inspect", other, match=shard.name)


def test_inspect_detects_a_flipped_byte(capsys, runs, tmp_path):
    import shutil

    train, _ = runs
    copy = tmp_path / "copy.st"
    shutil.copytree(train, copy)
    code, out, _ = run_cli(["inspect", copy], capsys)
    assert code == 0 and "complete" in out
    shard = copy / "grads-r000-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run_cli(["inspect", copy], capsys)
    assert code != 0 and "grads-r000-00001.safetensors is damaged" in err


def test_empty_query_set_is_refused(capsys, runs, tmp_path):
    from ghostproj.store import encode_shard

    train, _ = runs
    m = json.loads((train / "manifest.json").read_text())
    empty = tmp_path / "grads-r000-00000.safetensors"
    empty.write_bytes(encode_shard(torch.zeros(0, m["dim"], dtype=torch.bfloat16), torch.zeros(0, dtype=torch.long),
                                   torch.zeros(0), torch.zeros(0, dtype=torch.int32), m["fingerprint"]))
    code, _, err = run_cli(["score", train, empty], capsys)
    assert code == 2 and "The query set is empty" in err


def test_influence_full_refuses_a_huge_fisher(runs, monkeypatch):
    import ghostproj.scoring.influence as influence
    from ghostproj.errors import GhostprojError

    train, query = runs
    monkeypatch.setattr(influence, "MAX_FULL_FISHER_DIM", 32)
    with pytest.raises(GhostprojError, match="influence-full needs a 64 x 64 Fisher"):
        score(train, query, metric="influence-full")
    score(train, query, metric="influence")  # block-diagonal still works


@pytest.mark.parametrize("metric, extra", [("influence", []), ("influence-full", ["--full"])])
def test_a_fisher_computed_once_or_in_parts_scores_like_the_inline_one(capsys, runs, tmp_path, metric, extra):
    train, query = runs
    inline, once, parted = (tmp_path / f"{n}.jsonl" for n in ("inline", "once", "parted"))
    assert run_cli(["score", train, query, "--metric", metric, "--top-k", "3", "--show", "0", "--topk-out", inline,
                    "--select-out", tmp_path / "inline.sel.jsonl", "--reduce", "mean"], capsys)[0] == 0
    fisher = tmp_path / "F.safetensors"
    code, _, err = run_cli(["fisher", train, "--out", fisher, *extra], capsys)
    assert code == 0, err
    assert run_cli(["score", train, query, "--metric", metric, "--fisher", fisher, "--top-k", "3", "--show", "0",
                    "--topk-out", once, "--select-out", tmp_path / "once.sel.jsonl", "--reduce", "mean"],
                   capsys)[0] == 0
    assert once.read_text() == inline.read_text()  # the same sums, in the same order: the same bytes
    assert (tmp_path / "once.sel.jsonl").read_text() == (tmp_path / "inline.sel.jsonl").read_text()
    n_shards = len(list(train.glob("grads-*")))
    parts = [tmp_path / f"F{i}.safetensors" for i in range(n_shards)]
    for i, part in enumerate(parts):
        assert run_cli(["fisher", train, "--out", part, "--num-parts", n_shards, "--part", i, *extra], capsys)[0] == 0
    code, _, err = run_cli(["score", train, query, "--metric", metric, "--fisher", parts[0]], capsys)
    assert code == 2 and "merge the parts first" in err
    merged = tmp_path / "Fm.safetensors"
    assert run_cli(["fisher", "--merge", merged, *parts], capsys)[0] == 0
    assert run_cli(["score", train, query, "--metric", metric, "--fisher", merged, "--top-k", "3", "--show", "0",
                    "--topk-out", parted], capsys)[0] == 0
    got = [json.loads(line) for line in parted.read_text().splitlines()]
    want = [json.loads(line) for line in inline.read_text().splitlines()]
    assert [g["train"] for g in got] == [w["train"] for w in want]  # summed in another order: float64 rounding only
    for g, w in zip(got, want):
        assert torch.allclose(torch.tensor(g["scores"]), torch.tensor(w["scores"]), rtol=1e-5)
    code, _, err = run_cli(["fisher", "--merge", tmp_path / "bad.safetensors", *parts[:-1]], capsys)
    assert code == 2 and "exactly once" in err
    code, _, err = run_cli(["score", train, query, "--metric", metric, "--fisher", fisher, "--normalize", "none"],
                           capsys)
    assert code == 2 and "--normalize layer" in err


def test_top_k_breaks_ties_by_dataset_index_however_the_rows_are_chunked():
    """Duplicate texts tie exactly: the answer must not depend on chunks, shards or processes."""
    import random

    from ghostproj.scoring import StreamingTopK

    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        n, m, k = rng.randint(1, 40), rng.randint(1, 5), rng.randint(1, 8)
        s = torch.randint(0, 4, (n, m), generator=g).float()  # few distinct values: many ties
        index = torch.randperm(1000, generator=g)[:n]
        want = [sorted(range(n), key=lambda r: (-float(s[r, j]), int(index[r])))[:k] for j in range(m)]
        for cuts in (0, 2, 6):
            bounds = sorted({0, n, *(rng.randint(0, n) for _ in range(cuts))})
            best = StreamingTopK(k)
            for a, b in zip(bounds, bounds[1:]):
                best.add(s[a:b], index[a:b])
            vals, ids = best.result()
            assert ids.tolist() == [[int(index[r]) for r in rows] for rows in want]
            assert vals.tolist() == [[float(s[r, j]) for r in rows] for j, rows in enumerate(want)]


@pytest.mark.parametrize("metric", ["cosine", "dot", "influence", "influence-full"])
def test_four_parts_merged_are_byte_identical_to_one_process(capsys, runs, tmp_path, metric):
    train, query = runs
    extra = ["--metric", metric, "--top-k", "4", "--reduce", "max", "--group-field", "task"]
    if metric.startswith("influence"):
        fisher = tmp_path / "F.safetensors"
        assert run_cli(["fisher", train, "--out", fisher, *(["--full"] if metric == "influence-full" else [])],
                       capsys)[0] == 0
        extra += ["--fisher", fisher]
    whole = {name: tmp_path / f"whole.{name}" for name in ("scores.safetensors", "top.jsonl", "sel.jsonl")}
    code, _, err = run_cli(["score", train, query, *extra, "--show", "0", "--out", whole["scores.safetensors"],
                            "--topk-out", whole["top.jsonl"], "--select-out", whole["sel.jsonl"]], capsys)
    assert code == 0, err
    parts = [tmp_path / f"part{i}.safetensors" for i in range(4)]
    for i in (2, 0, 3, 1):  # in any order
        code, _, err = run_cli(["score", train, query, *extra, "--num-parts", "4", "--part", i, "--part-out",
                                parts[i], "--keep-matrix"], capsys)
        assert code == 0, err
    merged = {name: tmp_path / f"merged.{name}" for name in whole}
    code, _, err = run_cli(["merge-scores", *parts, "--out", merged["scores.safetensors"], "--topk-out",
                            merged["top.jsonl"], "--select-out", merged["sel.jsonl"]], capsys)
    assert code == 0, err
    for name in whole:
        assert merged[name].read_bytes() == whole[name].read_bytes(), name
    code, _, err = run_cli(["merge-scores", *parts[:3], "--topk-out", tmp_path / "x.jsonl"], capsys)
    assert code == 2 and "exactly once" in err


def test_parts_refuse_what_needs_the_whole_run(capsys, runs, tmp_path):
    train, query = runs
    code, _, err = run_cli(["score", train, query, "--metric", "influence", "--num-parts", "2", "--part", "0",
                            "--part-out", tmp_path / "p.safetensors"], capsys)
    assert code == 2 and "with --fisher" in err
    code, _, err = run_cli(["score", train, query, "--num-parts", "2", "--part", "0", "--topk-out",
                            tmp_path / "t.jsonl"], capsys)
    assert code == 2 and "--part-out FILE only" in err


@needs_torchrun
def test_torchrun_ranks_score_like_one_process(capsys, runs, tmp_path):
    """Under torchrun each rank scores its part and rank 0 merges: the same files as one
    process, byte for byte (influence with a whole-run Fisher from the ranks' all-reduce)."""
    train, query = runs
    for metric in ("cosine", "influence"):
        extra = ["--metric", metric, "--top-k", "4", "--reduce", "max", "--group-field", "task", "--show", "0"]
        names = ("scores.safetensors", "top.jsonl", "sel.jsonl")
        outputs = {}
        for who in ("one", "ranks"):
            paths = {name: tmp_path / f"{metric}.{who}.{name}" for name in names}
            args = ["score", train, query, *extra, "--out", paths[names[0]], "--topk-out", paths[names[1]],
                    "--select-out", paths[names[2]]]
            if who == "one":
                assert run_cli(args, capsys)[0] == 0
            else:
                res = torchrun(2, args)
                assert res.returncode == 0, res.stderr[-2000:]
            outputs[who] = paths
        if metric == "cosine":
            for name in names:
                assert outputs["ranks"][name].read_bytes() == outputs["one"][name].read_bytes(), name
        else:  # the all-reduced Fisher sums in another order: equal to float64 rounding
            a = load_file(outputs["one"][names[0]])["scores"]
            b = load_file(outputs["ranks"][names[0]])["scores"]
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        assert not list(tmp_path.glob(".*part-*"))  # the rank files are gone


def test_parts_without_a_shard_merge_like_the_others(capsys, runs, tmp_path):
    """More parts than shards: the extra parts score nothing and still merge exactly."""
    train, query = runs  # 4 shards
    common = ["score", train, query, "--metric", "cosine", "--top-k", "3", "--reduce", "mean", "--show", "0"]
    whole = {n: tmp_path / f"whole-{n}" for n in ("top.jsonl", "sel.jsonl")}
    assert run_cli([*common, "--topk-out", whole["top.jsonl"], "--select-out", whole["sel.jsonl"]], capsys)[0] == 0
    parts = [tmp_path / f"p{i}.safetensors" for i in range(6)]
    for i, path in enumerate(parts):
        code, _, err = run_cli([*common, "--num-parts", "6", "--part", str(i), "--part-out", path], capsys)
        assert code == 0, err
    merged = {n: tmp_path / f"merged-{n}" for n in whole}
    code, _, err = run_cli(["merge-scores", *parts, "--topk-out", merged["top.jsonl"], "--select-out",
                            merged["sel.jsonl"]], capsys)
    assert code == 0, err
    for name in whole:
        assert merged[name].read_bytes() == whole[name].read_bytes(), name
