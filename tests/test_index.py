"""The approximate index: a flat index answers exactly as score does, an IVF index is
measured by its recall, bad inputs get one sentence, and without FAISS one sentence says
how to install it."""

import json
import sys

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

from ghostproj.scoring.index import recall_at_k, search

faiss = pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gpt2_dir, data_file):
    d = tmp_path_factory.mktemp("index_runs")
    train, query = d / "train.st", d / "query.st"
    for args in (["--data", data_file, "--out", train, "--rank", "16", "--shard-size", "4"],
                 ["--data", data_file, "--out", query, "--like", train]):
        assert run_cli(["project", "--model", gpt2_dir, "--max-length", "24", *args])[0] == 0
    return train, query


def _topk(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("metric,extra", [("cosine", []), ("dot", ["--normalize", "none", "--center"]),
                                          ("influence", [])])
def test_a_flat_index_answers_as_score_does(capsys, runs, tmp_path, metric, extra):
    train, query = runs
    opts = ["--metric", metric, *extra]
    assert run_cli(["index", "build", train, "--out", tmp_path / "idx", *opts], capsys)[0] == 0
    assert run_cli(["index", "query", tmp_path / "idx", query, "--top-k", "3", "--topk-out",
                    tmp_path / "a.jsonl"], capsys)[0] == 0
    assert run_cli(["score", train, query, *opts, "--top-k", "3", "--show", "0", "--topk-out",
                    tmp_path / "b.jsonl", "--out", tmp_path / "s.safetensors"], capsys)[0] == 0
    got, want = _topk(tmp_path / "a.jsonl"), _topk(tmp_path / "b.jsonl")
    matrix = load_file(tmp_path / "s.safetensors")
    row = {int(i): r for r, i in enumerate(matrix["train_index"])}
    assert [g["query"] for g in got] == [w["query"] for w in want]
    for j, (g, w) in enumerate(zip(got, want)):
        assert g["scores"] == pytest.approx(w["scores"], rel=1e-4, abs=1e-5)
        # the same rows, up to rows of exactly equal vectors (texts without a label position)
        assert g["train"] == w["train"] or all(
            torch.isclose(matrix["scores"][row[a], j], matrix["scores"][row[b], j], rtol=1e-5, atol=1e-6)
            for a, b in zip(g["train"], w["train"]))


def test_an_ivf_index_reports_its_recall(capsys, runs, tmp_path):
    train, query = runs
    code, _, err = run_cli(["index", "build", train, "--out", tmp_path / "ivf", "--factory", "IVF4,SQ8",
                            "--nprobe", "4", "--check", "6", "--top-k", "3"], capsys)
    assert code == 0, err
    assert "IVF4,SQ8" in err and "recall@3" in err
    # every list probed: only the 8-bit codes separate it from exact
    recall = float(err.split("recall@3 ")[1].split()[0])
    assert recall >= 0.8
    code, _, err = run_cli(["index", "query", tmp_path / "ivf", query, "--nprobe", "1", "--top-k", "3",
                            "--show", "1"], capsys)
    assert code == 0, err


def test_search_breaks_ties_by_index_and_marks_missing_rows():
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(2))
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    index.add_with_ids(x.numpy(), torch.tensor([7, 3, 5]).numpy())
    scores, ids = search(index, torch.tensor([[1.0, 0.0]]), 2)
    assert ids.tolist() == [[3, 7]] and scores.tolist() == [[1.0, 1.0]]
    assert recall_at_k(torch.tensor([[3, 7]]), torch.tensor([[7, 5]])) == 0.5
    ivf = faiss.index_factory(2, "IVF2,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]]).numpy())
    ivf.add_with_ids(x.numpy(), torch.tensor([7, 3, 5]).numpy())
    scores, ids = search(ivf, torch.tensor([[1.0, 0.0]]), 3, nprobe=1)  # one list holds 2 of the 3
    assert ids.tolist() == [[3, 7, -1]] and scores[0, 2] == float("-inf")


def test_index_bad_inputs(capsys, runs, tmp_path):
    train, query = runs
    idx = tmp_path / "idx"
    assert run_cli(["index", "build", train, "--out", idx], capsys)[0] == 0
    before = (idx / "index.faiss").read_bytes()
    cases = [
        (["index", "build", train, "--out", idx], "--overwrite"),
        (["index", "build", train, "--out", train], "projection run"),
        (["index", "build", train, "--out", tmp_path / "x", "--metric", "influence-full"], "influence-full"),
        (["index", "build", train, "--out", tmp_path / "x", "--factory", "IVFnonsense"], "FAISS cannot build"),
        (["index", "build", train, "--out", tmp_path / "x", "--nprobe", "0"], "--nprobe"),
        (["index", "query", tmp_path / "nothing", query], "not a finished index"),
        (["index", "query", idx, query, "--topk-out", train / "manifest.json"], "inside a projection run"),
        (["index", "query", idx, query, "--top-k", "0"], "--top-k"),
    ]
    for args, words in cases:
        code, _, err = run_cli(args, capsys)
        assert code == 2 and words in err, (args, err)
        assert "Traceback" not in err
    assert (idx / "index.faiss").read_bytes() == before


def test_without_faiss_one_sentence_says_how_to_install(capsys, runs, tmp_path, monkeypatch):
    train, _ = runs
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    code, _, err = run_cli(["index", "build", train, "--out", tmp_path / "idx"], capsys)
    assert code == 2 and "pip install 'ghostproj[index]'" in err
    assert not (tmp_path / "idx").exists()
