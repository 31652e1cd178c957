"""A run is whole or refused: every reader checks that each example is there exactly once
and that the projector is the one recorded; no output lands on an input; every float
option refuses NaN and infinities."""

import functools
import json
import os
import shutil

import pytest
import torch
from helpers import fails, run_cli, small_run_args, train_and_query, word_rows, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostproj.scoring import load_projections

ROWS = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rows = [dict(row, task=f"t{i % 2}") for i, row in enumerate(word_rows(ROWS, 3, 2, 7))]
    path = tmp_path_factory.mktemp("integrity") / "corpus.jsonl"
    write_jsonl(path, rows)
    return path


project_args = functools.partial(small_run_args, batch_size=3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gpt2_dir, corpus):
    return train_and_query(tmp_path_factory.mktemp("runs"), gpt2_dir, corpus, project_args)


def snapshot(*paths):
    found = {}
    for p in paths:
        for f in ([p] if p.is_file() else sorted(p.rglob("*"))):
            if f.is_file():
                found[str(f)] = f.read_bytes()
    return found


def edit_manifest(run, change):
    m = json.loads((run / "manifest.json").read_text())
    change(m)
    (run / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")


def duplicated(train, dst, keep_digests):
    """A copy of ``train`` as an interrupted run resumed by a faulty version leaves it: shard
    2 holds shard 1's examples again, so those are there twice and shard 2's are missing;
    every file still matches its manifest entry."""
    run = shutil.copytree(train, dst)
    shutil.copy(run / "grads-r000-00001.safetensors", run / "grads-r000-00002.safetensors")

    def change(m):
        m["shards"][2] = dict(m["shards"][1], file="grads-r000-00002.safetensors")
        if not keep_digests:  # a run written before digests were recorded
            for s in m["shards"]:
                s.pop("index_digest")
    edit_manifest(run, change)
    return run


# -- exactly once --------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_digests", [True, False])
def test_every_reader_refuses_a_run_holding_an_example_twice(capsys, runs, tmp_path, gpt2_dir, corpus,
                                                             keep_digests):
    train, query = runs
    bad = duplicated(train, tmp_path / "dup.st", keep_digests)
    words = "some example is there twice and another is missing"
    fails(capsys, "score", bad, query, "--show", "0", match=words)
    fails(capsys, "score", bad, query, "--num-parts", "2", "--part", "0", "--part-out", tmp_path / "p0",
          match=words)
    fails(capsys, "fisher", bad, "--out", tmp_path / "f.safetensors", match=words)
    fails(capsys, "index", "build", bad, "--out", tmp_path / "idx", match=words)
    fails(capsys, "inspect", bad, match=words)
    fails(capsys, "inspect", "--merge", tmp_path / "merged", bad, match=words)
    with pytest.raises(Exception, match=words):
        load_projections(bad)
    # a rerun of its project command finds the shard that holds the wrong examples and recomputes it
    code, out, err = run_cli(project_args(gpt2_dir, corpus, bad), capsys)
    assert code == 0 and "grads-r000-00002.safetensors holds other examples" in err and "repaired" in out, err
    for name in ("grads-r000-00002.safetensors", "manifest.json"):
        assert (bad / name).read_bytes() == (train / name).read_bytes(), name
    assert run_cli(["score", bad, query, "--show", "0"], capsys)[0] == 0


def test_a_run_missing_rows_is_refused_by_count(capsys, runs, tmp_path):
    train, query = runs
    run = shutil.copytree(train, tmp_path / "short.st")
    edit_manifest(run, lambda m: m["data"].update(count=ROWS + 1))
    fails(capsys, "score", run, query, "--show", "0", match=f"hold {ROWS} rows for the {ROWS + 1} examples")


# -- the projector -------------------------------------------------------------------------------
def flip_projector(run):
    path = run / "projector.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-16:] = bytes(b ^ 0xFF for b in raw[-16:])  # same size, other values
    path.write_bytes(bytes(raw))


def test_a_damaged_projector_is_refused_everywhere_and_rebuilt_by_a_rerun(capsys, runs, tmp_path, gpt2_dir,
                                                                          corpus):
    train, query = runs
    run = shutil.copytree(train, tmp_path / "proj.st")
    flip_projector(run)
    words = "projector.safetensors is damaged"
    fails(capsys, "inspect", run, match=words)
    fails(capsys, "score", run, query, "--show", "0", match=words)
    fails(capsys, "index", "build", run, "--out", tmp_path / "idx", match=words)
    fails(capsys, "project", "--model", gpt2_dir, "--data", corpus, "--out", tmp_path / "q", "--like", run,
          match=words)
    code, out, err = run_cli(project_args(gpt2_dir, corpus, run), capsys)
    assert code == 0 and "rebuilt it from seed 0" in err and "repaired" in out, err
    assert snapshot(run).values().__len__() == snapshot(train).values().__len__()
    for f in train.iterdir():
        assert (run / f.name).read_bytes() == f.read_bytes(), f.name
    (run / "projector.safetensors").unlink()
    fails(capsys, "score", run, query, "--show", "0", match="projector.safetensors is missing")
    assert run_cli(project_args(gpt2_dir, corpus, run), capsys)[0] == 0
    assert (run / "projector.safetensors").read_bytes() == (train / "projector.safetensors").read_bytes()


def test_a_damaged_middle_shard_names_the_rerun_that_repairs_it(capsys, runs, tmp_path, gpt2_dir, corpus):
    train, query = runs
    run = shutil.copytree(train, tmp_path / "mid.st")
    shard = run / "grads-r000-00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-8:] = bytes(8)
    shard.write_bytes(bytes(raw))
    err = fails(capsys, "score", run, query, "--show", "0", "--chunk-rows", "4", match="sha256 differs")
    assert "--verify" in err
    code, out, err = run_cli(project_args(gpt2_dir, corpus, run, "--verify"), capsys)  # what the message says
    assert code == 0 and "repaired" in out, err
    assert shard.read_bytes() == (train / shard.name).read_bytes()


# -- outputs never land on inputs ----------------------------------------------------------------
def test_no_output_lands_on_what_the_command_reads(capsys, runs, tmp_path, gpt2_dir, corpus):
    train, query = runs
    fisher = tmp_path / "fisher.safetensors"
    assert run_cli(["fisher", train, "--out", fisher], capsys)[0] == 0
    linked = tmp_path / "linked.jsonl"
    os.symlink(corpus, linked)
    hard = tmp_path / "hard.safetensors"
    os.link(gpt2_dir / "model.safetensors", hard)
    before = snapshot(train, query, corpus, gpt2_dir, fisher)
    select = ["--reduce", "max", "--group-field", "task", "--overwrite", "--show", "0"]
    for args in (
        ["score", train, query, *select, "--select-out", corpus],  # the query data, read for --group-field
        ["score", train, query, *select, "--select-out", linked],  # the same, through a symbolic link
        ["score", train, query, "--out", gpt2_dir / "model.safetensors", "--overwrite"],  # the runs' model
        ["score", train, query, "--out", hard, "--overwrite"],  # the same file, through a hard link
        ["score", train, query, "--out", fisher, "--fisher", fisher, "--overwrite"],  # its own --fisher
        ["fisher", train, "--out", corpus, "--overwrite"],
        ["index", "build", train, "--out", gpt2_dir, "--overwrite"],
        ["index", "build", train, "--out", tmp_path, "--fisher", fisher, "--overwrite"],  # would replace the Fisher
        ["project", "--model", gpt2_dir, "--data", corpus, "--out", train / "inner"],
        ["project", "--model", gpt2_dir, "--data", corpus, "--out", train, "--like", train],
        ["inspect", "--merge", train, train],
    ):
        err = fails(capsys, *args, match="write the output elsewhere")
        assert any(w in err for w in ("which this command reads", "one of the inputs", "inside the projection run")), \
            (args, err)
    assert snapshot(train, query, corpus, gpt2_dir, fisher) == before


# -- non-finite numbers --------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_float_options_refuse_non_finite_values(capsys, runs, tmp_path, value):
    train, query = runs
    fails(capsys, "score", train, query, "--damping", value, match=f"--damping must be a finite number, got {value}")
    fails(capsys, "index", "build", train, "--out", tmp_path / "idx", "--damping", value,
          match="--damping must be a finite number")
    fails(capsys, "evaluate", "--fraction", value, match="--fraction must be a finite number")
    fails(capsys, "naive-check", "--tolerance", value, match="--tolerance must be a finite number")
    assert not (tmp_path / "idx").exists()


def test_the_python_api_refuses_a_non_finite_damping(runs):
    from ghostproj import score
    from ghostproj.errors import GhostprojError

    with pytest.raises(GhostprojError, match="finite"):
        score(*runs, metric="influence", damping=float("nan"))


def test_top_k_never_names_a_row_that_does_not_exist():
    from ghostproj.scoring.topk import StreamingTopK

    best = StreamingTopK(3)
    best.add(torch.tensor([[float("nan")], [float("nan")]]), torch.tensor([4, 7]))
    _, ids = best.result()
    assert set(ids.flatten().tolist()) <= {4, 7, -1}


# -- smaller defects -----------------------------------------------------------------------------
def test_what_differs_between_runs_is_named(capsys, runs, tmp_path, gpt2_dir, corpus):
    train, _ = runs
    other = tmp_path / "other.st"
    assert run_cli(project_args(gpt2_dir, corpus, other, "--layers", "c_fc"), capsys)[0] == 0
    fails(capsys, "score", train, other, "--show", "0", match="layers differ")


def test_silent_no_ops_are_refused(capsys, runs, tmp_path, gpt2_dir, corpus):
    train, query = runs
    part = tmp_path / "part0"
    assert run_cli(["score", train, query, "--metric", "dot", "--num-parts", "2", "--part", "0", "--part-out", part,
                    "--show", "0"], capsys)[0] == 0
    fails(capsys, "merge-scores", part, match="writes nothing without --out")
    fails(capsys, "score", train, query, "--num-parts", "0", "--part-out", tmp_path / "p", match="--num-parts")
    fails(capsys, "score", train, query, "--part-out", tmp_path / "p", match="give --num-parts 2 or more")
    code, _, err = run_cli(project_args(gpt2_dir, corpus, tmp_path / "wide", "--rank-in", "100000",
                                        "--rank-out", "2", "--layers", "c_fc"), capsys)
    assert code == 0 and "--rank-in 100000 exceeds the width of 2 layer(s)" in err, err


def test_jsonl_errors_at_the_end_of_a_line_name_that_column(capsys, tmp_path, gpt2_dir):
    data = tmp_path / "cut.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "cut"\n')
    fails(capsys, "project", "--model", gpt2_dir, "--data", data, "--out", tmp_path / "x",
          match="line 2 is not valid JSON (Expecting ',' delimiter at the end of the line, column 15)")


def test_help_shows_the_index_extra(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "ghostproj[index]" in out


@settings(max_examples=60, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["file", "dir"]), route=st.sampled_from(
    ["same", "symlink", "hardlink", "dotdot", "inside", "symlinked-parent", "elsewhere"]), depth=st.integers(0, 2))
def test_the_output_guard_sees_through_every_name_for_an_input(tmp_path_factory, kind, route, depth):
    """Generated ways to name an input (or a place inside one) as an output: each is refused
    whatever --overwrite says, and a new file elsewhere is accepted."""
    from ghostproj.errors import GhostprojError
    from ghostproj.store.outputs import check_output_dir, check_outputs

    root = tmp_path_factory.mktemp("guard")
    base = root.joinpath(*[f"d{i}" for i in range(depth)])
    base.mkdir(parents=True, exist_ok=True)
    source = base / ("data.jsonl" if kind == "file" else "model")
    if kind == "file":
        source.write_text("{}\n")
    else:
        source.mkdir()
        (source / "model.safetensors").write_bytes(b"weights")
    target = source if kind == "file" else source / "model.safetensors"
    if route == "symlink":
        (root / "alias").symlink_to(target)
        out = root / "alias"
    elif route == "hardlink":
        os.link(target, root / "linked")
        out = root / "linked"
    elif route == "dotdot":
        (base / "sub").mkdir()
        out = base / "sub" / ".." / target.relative_to(base)
    elif route == "inside":
        out = (source / "new.jsonl") if kind == "dir" else target
    elif route == "symlinked-parent":
        (root / "via").symlink_to(target.parent, target_is_directory=True)
        out = root / "via" / target.name
    elif route == "elsewhere":
        out = root / "fresh.jsonl"
    else:
        out = target
    before = target.read_bytes()
    if route == "elsewhere":
        check_outputs([(str(out), "--out")], [str(source)], overwrite=True)
        return
    with pytest.raises(GhostprojError, match="write the output elsewhere"):
        check_outputs([(str(out), "--out")], [str(source)], overwrite=True)
    if route != "hardlink":  # a directory output is named by its path
        with pytest.raises(GhostprojError, match="write the output elsewhere"):
            check_output_dir(str(out), "--out", [str(source)])
    assert target.read_bytes() == before
