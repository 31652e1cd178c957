"""The indexes: the flat index answers exactly as score does, the scan index re-ranks to
its codes' exact inner products and finds the exact top-k, a FAISS IVF index is measured
by its recall, bad inputs get one sentence, and without FAISS the torch indexes work and
one sentence says how to install it for the rest."""

import json
import shutil
import sys

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file

from ghostproj.scoring.index import recall_at_k, search
from ghostproj.scoring.scan_index import (
    RESIDUAL_LEVELS,
    ScanIndex,
    pack6,
    principal_directions,
    unpack6,
)
from ghostproj.store import RunWriter, write_manifest
from ghostproj.store.manifest import read_manifest


@pytest.fixture
def faiss():
    return pytest.importorskip("faiss")


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


def test_an_ivf_index_reports_its_recall(capsys, runs, tmp_path, faiss):
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


def test_search_breaks_ties_by_index_and_marks_missing_rows(faiss):
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
    before = (idx / "index.safetensors").read_bytes()
    cases = [
        (["index", "build", train, "--out", idx], "--overwrite"),
        (["index", "build", train, "--out", train], "one of the inputs"),
        (["index", "build", train, "--out", tmp_path / "x", "--metric", "influence-full"], "influence-full"),
        (["index", "build", train, "--out", tmp_path / "x", "--factory", "IVFnonsense"], "FAISS cannot build"),
        (["index", "build", train, "--out", tmp_path / "x", "--nprobe", "0"], "--nprobe"),
        (["index", "build", train, "--out", tmp_path / "x", "--factory", "Scan", "--nprobe", "4"],
         "the scan index takes --candidates"),
        (["index", "build", train, "--out", tmp_path / "x", "--nprobe", "4"], "--nprobe applies to FAISS IVF"),
        # a run this small is indexed Flat: --candidates has nothing to set
        (["index", "build", train, "--out", tmp_path / "x", "--candidates", "4"], "not to Flat"),
        (["index", "build", train, "--out", tmp_path / "x", "--factory", "Flat", "--candidates", "4"],
         "--candidates applies to the scan index"),
        (["index", "build", train, "--out", tmp_path / "x", "--factory", "Scan0"], "at least one head direction"),
        (["index", "build", train, "--out", tmp_path / "x", "--candidates", "0"], "--candidates must be"),
        (["index", "query", idx, query, "--nprobe", "2"], "--nprobe applies to FAISS IVF indexes"),
        (["index", "query", idx, query, "--candidates", "2"], "--candidates applies to scan indexes"),
        (["index", "query", tmp_path / "nothing", query], "not a finished index"),
        (["index", "query", idx, query, "--topk-out", train / "manifest.json"], "inside a projection run"),
        (["index", "query", idx, query, "--top-k", "0"], "--top-k"),
    ]
    old = tmp_path / "old"  # an index of the format before influence split its Fisher between the sides
    shutil.copytree(idx, old)
    settings = json.loads((old / "index.json").read_text())
    del settings["version"]
    (old / "index.json").write_text(json.dumps(settings))
    cases.append((["index", "query", old, query], "another version of ghostproj"))
    for args, words in cases:
        code, _, err = run_cli(args, capsys)
        assert code == 2 and words in err, (args, err)
        assert "Traceback" not in err
    assert (idx / "index.safetensors").read_bytes() == before


def test_without_faiss_the_torch_indexes_work_and_one_sentence_says_how_to_install(capsys, runs, tmp_path,
                                                                                      monkeypatch):
    train, query = runs
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    for factory in ("Flat", "Scan4"):
        code, _, err = run_cli(["index", "build", train, "--out", tmp_path / factory, "--factory", factory,
                                "--check", "4"], capsys)
        assert code == 0, err
        assert run_cli(["index", "query", tmp_path / factory, query, "--show", "0"], capsys)[0] == 0
    code, _, err = run_cli(["index", "build", train, "--out", tmp_path / "ivf", "--factory", "IVF4,SQ8"], capsys)
    assert code == 2 and "pip install 'ghostproj[index]'" in err
    assert not (tmp_path / "ivf").exists()


def test_six_bit_codes_pack_three_bytes_to_four_values():
    codes = torch.arange(64).repeat(2).view(8, 16)[torch.randperm(8)]
    packed = pack6(codes)
    assert packed.shape == (8, 12) and packed.dtype == torch.uint8
    assert torch.equal(unpack6(packed).long(), codes)


def test_the_head_holds_seventy_percent_of_the_variance_in_multiples_of_32():
    g = torch.Generator().manual_seed(0)
    spectrum = torch.ones(512)
    spectrum[:40] = 6.0  # 40 directions hold 40 * 36 / (40 * 36 + 472) = 75% of the square sum
    x = torch.randn(4096, 512, generator=g) * spectrum
    basis = principal_directions(x, None)
    assert basis.shape == (64, 512)  # 40 or so, rounded up to 32s
    torch.testing.assert_close(basis @ basis.t(), torch.eye(64), atol=1e-4, rtol=0)
    assert (basis[:40, 40:].abs() < 0.2).all()  # the first 40 lie in the strong directions
    # flat: 70% would be 358 directions, so a quarter of D (the memory budget)
    assert principal_directions(torch.randn(4096, 512, generator=g), None).shape == (128, 512)
    # fewer rows than columns: from the rows' Gram matrix, the same subspace
    small = principal_directions(x[:300], 16)
    assert small.shape == (16, 512) and (small @ basis[:40].t()).norm(dim=1).min() > 0.9


def _clustered(n, d, seed):
    """Rows around 50 centres with a decaying spectrum, like projected gradients."""
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.linspace(1.0, 0.05, d)
    centres = torch.randn(50, d, generator=g) * spectrum
    return centres[torch.randint(0, 50, (n,), generator=g)] + 0.7 * torch.randn(n, d, generator=g) * spectrum


def _decoded(index):
    """Every row as the scan index's codes say it is, in float64: head back through the
    basis plus the residual."""
    rows = torch.arange(index.ntotal)
    head = index.head[rows].double()
    residual = (unpack6(index.residual).double() - RESIDUAL_LEVELS) * index.row_scale.double()[:, None]
    width = index.width
    return ((head * index.head_scale.double()) @ index.basis.double()
            + (residual * index.residual_scale.double())[:, :width])


def _scan(x, ids, head_dims=32, candidates=128):
    return ScanIndex.build(x[::3], x.shape[0], lambda: iter([(ids[:3000], x[:3000]), (ids[3000:], x[3000:])]),
                           head_dims, candidates)


def test_the_scan_index_ranks_by_its_codes_exact_inner_products():
    x, q = _clustered(20_000, 64, 0), _clustered(40, 64, 1)
    ids = torch.randperm(50_000)[: x.shape[0]]  # dataset indices, not positions
    # the codes are within their rounding of every row, an outlier the fitting sample missed included
    x[7] *= 20
    index = _scan(x, ids)
    decoded = _decoded(index)
    error = (decoded - x.double()).norm(dim=1) / x.norm(dim=1)
    assert error.mean() < 0.03 and error.max() < 0.06  # clipped, the outlier would be 0.9 off
    scores, got = index.search(q, 10)
    # every score returned is the exact inner product with the decoded row ...
    position = {int(i): p for p, i in enumerate(ids)}
    rows = torch.tensor([[position[int(i)] for i in r] for r in got])
    naive = torch.einsum("md,mkd->mk", q.double(), decoded[rows])
    torch.testing.assert_close(scores.double(), naive, rtol=1e-4, atol=1e-4)
    # ... best first, and the decoded rows' exact top 10 is found
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    exact = ids[(q.double() @ decoded.t()).topk(10, dim=1).indices]
    assert recall_at_k(got, exact) >= 0.97
    # against the rows themselves, only the codes' rounding is lost
    assert recall_at_k(got, ids[(q @ x.t()).topk(10, dim=1).indices]) >= 0.9
    # every row a candidate: exactly the decoded rows' top 10
    _, everything = index.search(q, 10, candidates=x.shape[0])
    assert torch.equal(everything, exact)


def test_the_scan_index_keeps_k_rows_when_the_thresholds_miss(monkeypatch):
    x, q = _clustered(20_000, 64, 0), _clustered(20, 64, 1)
    ids = torch.arange(x.shape[0])
    index = _scan(x, ids)
    _, want = index.search(q, 10)
    # thresholds no row reaches: every query falls back to its best head scores
    monkeypatch.setattr(ScanIndex, "_thresholds",
                        lambda self, q8, n: torch.full((q8.shape[0], 1), torch.iinfo(torch.int32).max))
    _, got = index.search(q, 10)
    assert got.shape == (20, 10) and (got >= 0).all()
    assert recall_at_k(got, want) >= 0.97


def test_a_row_beyond_the_head_codes_range_is_still_found():
    x = _clustered(20_000, 64, 0)
    x[7] = 0.0
    x[7, 0] = 1000.0  # far past the head scales fitted on every third row (7 is not one of them)
    g = torch.Generator().manual_seed(1)
    q = torch.zeros(30, 64)
    q[:, 1], q[:, 0] = 1.0, 0.05  # row 7 scores 50; the next best about 5
    q += 0.01 * torch.randn(30, 64, generator=g)
    index = _scan(x, torch.arange(20_000))
    assert index.clipped_rows.tolist() == [7]
    scores, got = index.search(q, 3)
    assert (got[:, 0] == 7).all()  # its clipped int8 head score (about 0.4) would not have made it a candidate
    torch.testing.assert_close(scores[:, 0], q @ x[7], rtol=0.05, atol=0)  # 6-bit codes at 20x the scale


def test_the_scan_index_breaks_ties_by_dataset_index():
    x = torch.nn.functional.normalize(_clustered(6_000, 32, 0), dim=1)  # as cosine: each row its own best
    x[100] = x[5000]  # one row twice, under dataset indices 900 and 7
    ids = torch.arange(6_000) + 1000
    ids[100], ids[5000] = 900, 7
    index = _scan(x, ids, head_dims=8, candidates=32)
    _, got = index.search(x[5000:5001], 2)
    assert got.tolist() == [[7, 900]]


def test_a_scan_index_answers_close_to_score(capsys, runs, tmp_path):
    train, query = runs
    code, _, err = run_cli(["index", "build", train, "--out", tmp_path / "scan", "--factory", "Scan8",
                            "--check-query", query, "--check", "8", "--top-k", "3"], capsys)
    assert code == 0, err
    assert "Scan8" in err and "256 candidates" in err
    assert float(err.split("recall@3 ")[1].split()[0]) >= 0.9
    assert run_cli(["index", "query", tmp_path / "scan", query, "--top-k", "3", "--candidates", "4",
                    "--topk-out", tmp_path / "a.jsonl"], capsys)[0] == 0
    assert run_cli(["score", train, query, "--top-k", "3", "--show", "0", "--topk-out", tmp_path / "b.jsonl"],
                   capsys)[0] == 0
    got, want = _topk(tmp_path / "a.jsonl"), _topk(tmp_path / "b.jsonl")
    assert [g["query"] for g in got] == [w["query"] for w in want]
    for g, w in zip(got, want):
        assert g["scores"] == pytest.approx(w["scores"], rel=0.02, abs=0.02)


def _synthetic_run(path, like, rows, seed):
    """A run shaped like ``like`` (its layers and manifest) holding gradient-like rows."""
    # the first of three job-array parts: dataset rows 0, 3, 6, ..., so indices are not positions
    manifest = read_manifest(like).replace(shards=[], complete=False, data={"count": 3 * rows}, summary={},
                                           part={"shard_id": 0, "num_shards": 3, "rows": rows})
    path.mkdir()
    shutil.copy(like / "projector.safetensors", path / "projector.safetensors")
    write_manifest(path, manifest)
    writer = RunWriter(path, manifest, shard_size=2048)
    x = _clustered(rows, manifest.dim, seed) * torch.logspace(0, -3, manifest.dim)  # a head holds most
    writer.add(x, torch.arange(rows) * 3, torch.zeros(rows), torch.ones(rows, dtype=torch.int32))
    writer.finish({})
    return path


def test_a_scan_index_of_thousands_of_rows_round_trips_through_its_files(capsys, runs, tmp_path):
    """The threshold pass (not every row a candidate), saved and loaded, on a layered run
    with --layers and --center, against exact scoring."""
    train = _synthetic_run(tmp_path / "big.st", runs[0], 12_000, 0)
    query = _synthetic_run(tmp_path / "q.st", runs[0], 40, 1)
    opts = ["--metric", "dot", "--normalize", "none", "--center", "--layers", "h.0"]
    code, _, err = run_cli(["index", "build", train, "--out", tmp_path / "idx", "--factory", "Scan16",
                            "--candidates", "200", *opts, "--check-query", query, "--check", "40"], capsys)
    assert code == 0, err
    assert float(err.split("recall@10 ")[1].split()[0]) >= 0.9
    assert run_cli(["index", "query", tmp_path / "idx", query, "--topk-out", tmp_path / "a.jsonl"], capsys)[0] == 0
    assert run_cli(["score", train, query, *opts, "--top-k", "10", "--show", "0", "--topk-out",
                    tmp_path / "b.jsonl"], capsys)[0] == 0
    got, want = _topk(tmp_path / "a.jsonl"), _topk(tmp_path / "b.jsonl")
    assert recall_at_k(torch.tensor([g["train"] for g in got]), torch.tensor([w["train"] for w in want])) >= 0.9
    assert all(t % 3 == 0 for g in got for t in g["train"])  # dataset indices, not positions

