"""A CLI that never lies and never loses a run: safe outputs, verified reads, repairing
resume, validated manifests, and one clear sentence for every bad input."""

import functools
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from helpers import fails, run_cli, small_run_args, train_and_query, word_rows, write_jsonl

from ghostproj.scoring import load_projections

ROWS = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("safety") / "corpus.jsonl"
    write_jsonl(path, word_rows(ROWS, 5, 3, 9))
    return path


project_args = functools.partial(small_run_args, batch_size=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gpt2_dir, corpus):
    """A complete training run (5 shards) and a query run projected --like it."""
    return train_and_query(tmp_path_factory.mktemp("runs"), gpt2_dir, corpus, project_args)


def snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def flip_one_value(shard):
    """Change one bf16 value of the 'grads' tensor in place; the size stays the same."""
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    at = 8 + n + header["grads"]["data_offsets"][0] + 2 * 5
    raw[at:at + 2] = torch.tensor([1e30], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    shard.write_bytes(bytes(raw))


# -- outputs never replace inputs ------------------------------------------------------------
def test_score_outputs_never_land_on_inputs_or_existing_files(capsys, runs, tmp_path):
    train, query = runs
    before = snapshot(train)
    fails(capsys, "score", train, query, "--topk-out", train / "manifest.json", match="lies inside")
    fails(capsys, "score", train, query, "--topk-out", train / "topk.jsonl", match="lies inside")
    shard = sorted(train.glob("grads-*"))[0]
    fails(capsys, "score", shard, query, "--out", shard, match="one of the inputs")
    assert snapshot(train) == before
    existing = tmp_path / "scores.safetensors"
    existing.write_text("precious")
    fails(capsys, "score", train, query, "--out", existing, match="pass --overwrite")
    assert existing.read_text() == "precious"
    same = tmp_path / "same.jsonl"
    fails(capsys, "score", train, query, "--topk-out", same, "--select-out", same, "--reduce", "mean",
          match="name the same file")
    code, _, err = run_cli(["score", train, query, "--out", existing, "--overwrite", "--show", "0"], capsys)
    assert code == 0, err
    assert existing.read_bytes()[:8] != b"precious"


# -- verified reads ------------------------------------------------------------------------------
def test_score_stops_on_a_shard_changed_in_place(capsys, runs, tmp_path):
    train, query = runs
    bad = copy_run(train, tmp_path / "bad.st")
    shard = sorted(bad.glob("grads-*"))[2]
    flip_one_value(shard)
    err = fails(capsys, "score", bad, query, "--show", "0", "--chunk-rows", "3", match=shard.name)
    assert "sha256" in err and "rerun the project command" in err
    for mmap in (False, True):
        with pytest.raises(Exception, match="sha256"):
            load_projections(bad, mmap=mmap)
    assert load_projections(bad, verify=False).grads.abs().max() > 1e29  # the damage is real
    assert load_projections(train).grads.shape == (ROWS, load_projections(train).grads.shape[1])


# -- repairing resume ------------------------------------------------------------------------------
def test_rerun_recomputes_damaged_and_missing_shards(capsys, runs, gpt2_dir, corpus, tmp_path):
    train, _ = runs
    good = snapshot(train)
    # a finished run with a deleted shard, with and without --no-resume
    for extra in ((), ("--no-resume",)):
        run = copy_run(train, tmp_path / f"deleted{len(extra)}")
        (run / "grads-r000-00001.safetensors").unlink()
        code, out, err = run_cli(project_args(gpt2_dir, corpus, run, *extra), capsys)
        assert code == 0 and "repaired" in out and "grads-r000-00001.safetensors was damaged (it is missing)" in err
        assert snapshot(run) == good
    # a killed run whose last shard was truncated: resumed, repaired, identical
    run = copy_run(train, tmp_path / "killed")
    m = json.loads((run / "manifest.json").read_text())
    for s in m["shards"][3:]:
        (run / s["file"]).unlink()
    m["shards"], m["complete"] = m["shards"][:3], False
    m.pop("summary")
    (run / "manifest.json").write_text(json.dumps(m))
    shard = run / m["shards"][2]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])
    code, out, err = run_cli(project_args(gpt2_dir, corpus, run), capsys)
    assert code == 0 and "done" in out and "was damaged (its size differs" in err, err
    for name, data in good.items():
        if name != "manifest.json":
            assert (run / name).read_bytes() == data, name
    # a value changed in a middle shard: found with --verify
    run = copy_run(train, tmp_path / "flipped")
    flip_one_value(run / "grads-r000-00002.safetensors")
    code, out, _ = run_cli(project_args(gpt2_dir, corpus, run), capsys)
    assert code == 0 and "already holds this complete run" in out  # only the last shard is hashed by default
    code, out, err = run_cli(project_args(gpt2_dir, corpus, run, "--verify"), capsys)
    assert code == 0 and "sha256 differs" in err and "repaired" in out
    assert snapshot(run) == good
    assert run_cli(["inspect", run], capsys)[0] == 0


def test_manifest_summary_records_bytes_and_seconds(runs):
    train, _ = runs
    m = json.loads((train / "manifest.json").read_text())
    assert m["summary"]["bytes"] == sum(s["bytes"] for s in m["shards"]) > 0
    assert m["summary"]["seconds"] > 0


# -- damaged manifests ------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, match", [
    (lambda m: m["layers"][1].update(offset=10_000), "starts at column 10000"),
    (lambda m: m["layers"][0].pop("k_out"), "layer entry 0 lacks 'k_out'"),
    (lambda m: m.update(dim=m["dim"] + 1), "add up to"),
    (lambda m: m["shards"][0].update(rows="many"), "has a bad 'rows' ('many' is not a count)"),
    (lambda m: m.update(layers="all"), "bad 'layers' ('all' is not a list)"),
    (lambda m: m["shards"][0].update(file="../../etc/passwd"), "not a plain shard file name"),
    (lambda m: m.update(coverage={"parameters": "most"}), "'coverage' is not [covered, total] counts"),
])
def test_damaged_manifests_are_one_sentence(capsys, runs, tmp_path, edit, match):
    train, query = runs
    run = copy_run(train, tmp_path / "edited")
    m = json.loads((run / "manifest.json").read_text())
    edit(m)
    (run / "manifest.json").write_text(json.dumps(m))
    fails(capsys, "score", run, query, match=match)
    fails(capsys, "inspect", run, match=match)


def test_like_run_without_bias_or_with_wrong_projector_is_refused(capsys, runs, gpt2_dir, corpus, tmp_path):
    train, _ = runs
    run = copy_run(train, tmp_path / "nobias")
    m = json.loads((run / "manifest.json").read_text())
    m.pop("bias")
    (run / "manifest.json").write_text(json.dumps(m))
    fails(capsys, "project", "--model", gpt2_dir, "--data", corpus, "--out", tmp_path / "q", "--like", run,
          match="lacks 'bias'")
    run = copy_run(train, tmp_path / "badproj")
    from ghostproj.engines.projector import LayerProjector
    from ghostproj.store.projector_file import save_projectors

    name = m["layers"][0]["name"]
    save_projectors(run / "projector.safetensors", {name: LayerProjector(torch.zeros(3, 3), torch.zeros(3, 3))}, {})
    fails(capsys, "project", "--model", gpt2_dir, "--data", corpus, "--out", tmp_path / "q2", "--like", run,
          match="projector.safetensors is damaged: its sha256 differs")
    assert not (tmp_path / "q2").exists() or not any((tmp_path / "q2").glob("grads-*"))
    # a run written before the projector's sha256 was recorded: the file's own checks still hold
    m = json.loads((run / "manifest.json").read_text())
    m["projector"].pop("sha256")
    (run / "manifest.json").write_text(json.dumps(m))
    fails(capsys, "project", "--model", gpt2_dir, "--data", corpus, "--out", tmp_path / "q3", "--like", run,
          match="holds no projector for layer")


def test_inspect_a_lone_shard_and_exit_codes(capsys, runs, tmp_path):
    train, _ = runs
    lone = tmp_path / "lone.safetensors"
    shutil.copy(sorted(train.glob("grads-*"))[0], lone)
    code, out, err = run_cli(["inspect", lone], capsys)
    assert code == 0 and "outside its run directory" in out, err
    run = copy_run(train, tmp_path / "unfinished")
    m = json.loads((run / "manifest.json").read_text())
    m["complete"] = False
    (run / "manifest.json").write_text(json.dumps(m))
    code, out, _ = run_cli(["inspect", run], capsys)
    assert code == 3 and "INCOMPLETE" in out
    assert run_cli(["inspect", train], capsys)[0] == 0


# -- bad inputs ------------------------------------------------------------------------------------
def test_bad_patterns_and_data_get_one_sentence(capsys, runs, gpt2_dir, corpus, tmp_path, monkeypatch):
    train, query = runs
    fails(capsys, "project", "--model", gpt2_dir, "--data", corpus, "--out", tmp_path / "x", "--layers",
          "re:[unclosed", match="not a valid regular expression")
    fails(capsys, "score", train, query, "--layers", "re:(", match="not a valid regular expression")
    ctrl = tmp_path / "ctrl.jsonl"
    ctrl.write_bytes(b'{"text": "fine"}\n{"text": "tab\there"}\n')
    fails(capsys, "project", "--model", gpt2_dir, "--data", ctrl, "--out", tmp_path / "x",
          match="line 2 is not valid JSON (Invalid control character at column")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    err = fails(capsys, "project", "--model", gpt2_dir, "--data", latin, "--out", tmp_path / "x",
                match="line 2 is not UTF-8")
    assert "pass a JSONL" not in err
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).endswith(".safetensors"))
    fails(capsys, "project", "--model", gpt2_dir, "--data", corpus, "--out", tmp_path / "x",
          match="permission denied")
    damaged = tmp_path / "damaged"
    shutil.copytree(gpt2_dir, damaged)
    weights = bytearray((damaged / "model.safetensors").read_bytes())
    weights[200:260] = b"x" * 60  # inside the header
    (damaged / "model.safetensors").write_bytes(bytes(weights))
    monkeypatch.undo()
    fails(capsys, "project", "--model", damaged, "--data", corpus, "--out", tmp_path / "x",
          match=f"The weights in {damaged} are damaged")


def test_silent_acceptances_are_said(capsys, runs, gpt2_dir, tmp_path):
    train, query = runs
    blank = tmp_path / "blank.jsonl"
    write_jsonl(blank, [{"text": "the cat sat"}, {"text": "   "}, {"text": "bake the bread"}, {"text": ""}])
    code, _, err = run_cli(["project", "--model", gpt2_dir, "--data", blank, "--out", tmp_path / "b",
                            "--rank", "1000000000", "--layers", "c_fc", "--max-length", "24"], capsys)
    assert code == 0, err
    assert "2 examples are empty or whitespace only (line 2, 4)" in err
    assert "--rank 1000000000 exceeds the full size of 2 layer(s)" in err
    code, _, err = run_cli(["score", train, query, "--top-k", "500", "--show", "0"], capsys)
    assert code == 0 and f"keeping all {ROWS}" in err


# -- Ctrl-C ------------------------------------------------------------------------------------------
def test_ctrl_c_says_what_was_kept_and_prints_pending_notes(tmp_path, gpt2_dir, corpus):
    out = tmp_path / "int"
    big = tmp_path / "big.jsonl"
    write_jsonl(big, [json.loads(line) for line in corpus.read_text().splitlines()] * 20)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "ghostproj", *map(str, project_args(gpt2_dir, big, out))],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(out.glob("grads-*")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "rerun the same command to resume" in err
    assert "Expected output" in err  # the note made before the interrupt still reaches the user
    assert "Traceback" not in err


# -- help ------------------------------------------------------------------------------------------
def test_version_short_help_and_panels(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.startswith("ghostproj ")
    code, out, _ = run_cli(["project", "-h"], capsys)
    assert code == 0
    for panel in ("Model", "Data", "Projection", "Output", "Run"):
        assert f"─ {panel} " in out, panel
    assert "default: (256)" in out and "default: (--no-bias)" in out
    code, out, _ = run_cli(["score", "--help"], capsys)
    assert code == 0 and "default: layer" in out


def test_score_defaults_to_layer_normalization(capsys, runs, tmp_path):
    train, query = runs
    outs = {}
    for name, extra in (("default", []), ("layer", ["--normalize", "layer"]), ("none", ["--normalize", "none"])):
        outs[name] = tmp_path / f"{name}.jsonl"
        assert run_cli(["score", train, query, "--topk-out", outs[name], "--show", "0", *extra], capsys)[0] == 0
    assert outs["default"].read_text() == outs["layer"].read_text() != outs["none"].read_text()


def test_top_level_help_lists_the_exit_codes(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "Exit codes" in out and "3 inspect" in " ".join(out.split())


def test_ctrl_c_in_factors_says_the_checkpoint_is_kept(capsys, monkeypatch, gpt2_dir, corpus):
    import ghostproj.jobs.factors as factors_job
    from ghostproj.cli.app import Interrupted  # what Ctrl-C raises (the SIGINT handler of main)

    def interrupted(opts, summary=None):
        raise Interrupted
    monkeypatch.setattr(factors_job, "run_factors", interrupted)
    code, _, err = run_cli(["factors", "--model", gpt2_dir, "--data", corpus, "--out", "f.safetensors"], capsys)
    assert code == 130 and "running sums last saved" in err and "rerun the same command to resume" in err
