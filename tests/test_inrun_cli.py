import runpy
import sys
from pathlib import Path

import torch
from helpers import run_cli, write_jsonl
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def test_inrun_writes_dots_values_and_model(capsys, tmp_path, gpt2_dir, data_file):
    val = tmp_path / "val.jsonl"
    write_jsonl(val, [{"text": "the cat sat on the mat"}, {"text": "bake the bread"}, {"text": "the doctor"}])
    out = tmp_path / "run"
    code, stdout, err = run_cli(["inrun", "--model", gpt2_dir, "--train", data_file, "--val", val, "--out", out,
                                 "--steps", "3", "--batch-size", "4", "--lr", "0.01", "--optimizer", "sgd",
                                 "--val-size", "2", "--max-length", "24", "--seed", "1"], capsys)
    assert code == 0, err
    assert "most valuable" in stdout
    dots = load_file(str(out / "dots.safetensors"))
    assert dots["step"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    values = load_file(str(out / "values.safetensors"))
    # value = sum over steps of -lr * dot, per example
    expect = torch.zeros(10, dtype=torch.float64)
    expect.index_add_(0, dots["index"], -0.01 * dots["dot"].double())
    assert torch.allclose(values["value"].double(), expect, atol=1e-7)
    assert (out / "model" / "config.json").exists()
    # a second run with the same seed draws the same batches
    code, _, _ = run_cli(["inrun", "--model", gpt2_dir, "--train", data_file, "--val", val, "--out", tmp_path / "r2",
                          "--steps", "3", "--batch-size", "4", "--val-size", "2", "--max-length", "24", "--seed", "1"],
                         capsys)
    assert code == 0
    assert torch.equal(load_file(str(tmp_path / "r2" / "dots.safetensors"))["index"], dots["index"])


def test_inrun_bad_inputs(capsys, tmp_path, gpt2_dir, data_file):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    single = tmp_path / "one.jsonl"
    write_jsonl(single, [{"text": "a b c d"}])
    base = ["inrun", "--model", gpt2_dir, "--train", data_file, "--max-length", "24"]
    for extra, match in (
        (["--val", empty, "--out", tmp_path / "a"], "holds no examples"),
        (["--val", single, "--out", tmp_path / "b", "--val-size", "5"], "larger than the 1 validation examples"),
        (["--val", single, "--out", tmp_path / "c", "--steps", "0"], "--steps must be at least 1"),
    ):
        code, _, err = run_cli(base + extra, capsys)
        assert code == 2 and match in err and "Traceback" not in err, err


def test_examples_run(capsys, monkeypatch, ghost_home):
    monkeypatch.setattr(sys, "argv", ["ghost_mlp.py"])
    runpy.run_path(str(ROOT / "examples" / "ghost_mlp.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "step 9" in out and "final validation loss" in out
    runpy.run_path(str(ROOT / "examples" / "engine_api.py"), run_name="__main__")
    assert "cosine similarities" in capsys.readouterr().out


def test_projection_examples_run(capsys, monkeypatch, ghost_home, tmp_path):
    for mode in ("project", "naive_check", "non_interf"):
        monkeypatch.setattr(sys, "argv", ["ghost_gradproj_mlp.py", "--mode", mode, "--proj_rank_total", "128"])
        runpy.run_path(str(ROOT / "examples" / "ghost_gradproj_mlp.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "vectors (16," in out and "max relative error" in out and "difference after 5 steps" in out
    monkeypatch.setattr(sys, "argv", ["ghost_gradproj_lm.py", "--proj_layers", "mlp.c_fc", "--proj_rank_total",
                                      "512", "--out", str(tmp_path)])
    runpy.run_path(str(ROOT / "examples" / "ghost_gradproj_lm.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "D = 512" in out and "most similar gradient" in out
