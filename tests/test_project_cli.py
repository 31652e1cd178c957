import json

import pytest
import torch
from helpers import kron_reference, rel_err, run_cli, write_jsonl
from safetensors import safe_open
from safetensors.torch import load_file

from ghostproj import GradProjectionEngine
from ghostproj.data import read_records, tokenize_records
from ghostproj.engines.projector import make_matrix
from ghostproj.models import load_model
from ghostproj.scoring import load_projections


def project(capsys, model_dir, data, out, *extra):
    return run_cli(["project", "--model", model_dir, "--data", data, "--out", out, *extra], capsys)


@pytest.mark.parametrize("store_dtype,tol", [("float32", 1e-4), ("bfloat16", 1e-2)])
def test_project_writes_the_documented_run(capsys, tmp_path, gpt2_dir, data_file, store_dtype, tol):
    out = tmp_path / "train.st"
    code, stdout, err = project(capsys, gpt2_dir, data_file, out, "--layers", "attn.c_attn,mlp.c_fc",
                                "--rank", "64", "--batch-size", "3", "--max-length", "24", "--shard-size", "4",
                                "--store-dtype", store_dtype)
    assert code == 0, err
    model, tok = load_model(str(gpt2_dir), device="cpu")
    examples = tokenize_records(read_records(data_file), tok, 24)
    n_trunc = sum(e.truncated for e in examples)
    assert n_trunc >= 1
    assert "10 examples" in stdout and f"{n_trunc} truncated" in stdout and "2 without label positions" in stdout
    m = json.loads((out / "manifest.json").read_text())
    for key in ("format", "fingerprint", "fingerprint_parts", "model", "data", "loss_reduction", "projector",
                "layers", "dim", "store_dtype", "shards", "complete"):
        assert key in m
    assert m["complete"] and m["dim"] == 4 * 64 and m["store_dtype"] == store_dtype
    assert [s["file"] for s in m["shards"]] == [f"grads-r000-0000{i}.safetensors" for i in range(3)]
    assert [s["rows"] for s in m["shards"]] == [4, 4, 2]
    for s in m["shards"]:
        with safe_open(str(out / s["file"]), "pt") as f:
            assert f.metadata()["fingerprint"] == m["fingerprint"]
            assert f.get_slice("grads").get_dtype() in ("BF16", "F32")
    # the projector file holds exactly the documented matrices
    proj = load_file(str(out / "projector.safetensors"))
    for layer in m["layers"]:
        assert torch.equal(proj[layer["name"] + ".in"], make_matrix("gaussian", layer["k_in"], layer["n_in"], 0, layer["name"], "in"))
        assert torch.equal(proj[layer["name"] + ".out"], make_matrix("gaussian", layer["k_out"], layer["n_out"], 0, layer["name"], "out"))
    # stored vectors equal the naive reference (up to the store dtype)
    loaded = load_projections(out)
    assert loaded.index.tolist() == list(range(10))
    engine = GradProjectionEngine(model, ["attn.c_attn", "mlp.c_fc"], rank=64)
    ref = kron_reference(model, examples, engine)
    assert rel_err(loaded.grads, ref) <= tol
    assert loaded.tokens.tolist() == [e.n_label_positions for e in examples]
    assert torch.all(loaded.grads[[2, 3]] == 0)


def test_like_reuses_matrices_and_gives_identical_vectors(capsys, tmp_path, gpt2_dir, data_file):
    a, b = tmp_path / "a", tmp_path / "b"
    assert project(capsys, gpt2_dir, data_file, a, "--rank", "32", "--projector", "rademacher", "--seed", "5",
                   "--loss-reduction", "sum", "--store-dtype", "float32")[0] == 0
    code, _, err = project(capsys, gpt2_dir, data_file, b, "--like", a, "--store-dtype", "float32", "--batch-size", "2")
    assert code == 0, err
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["fingerprint"] == mb["fingerprint"] and mb["loss_reduction"] == "sum"
    assert load_file(str(a / "projector.safetensors")).keys() == load_file(str(b / "projector.safetensors")).keys()
    for k, v in load_file(str(a / "projector.safetensors")).items():
        assert torch.equal(v, load_file(str(b / "projector.safetensors"))[k])
    assert rel_err(load_projections(b).grads, load_projections(a).grads) <= 1e-5
    code, _, err = project(capsys, gpt2_dir, data_file, tmp_path / "c", "--like", a, "--seed", "6")
    assert code == 2 and "contradicts" in err


def test_llama_linear_run(capsys, tmp_path, llama_dir, data_file):
    code, stdout, err = project(capsys, llama_dir, data_file, tmp_path / "l", "--store-dtype", "float32",
                                "--max-length", "24")
    assert code == 0, err
    m = json.loads((tmp_path / "l" / "manifest.json").read_text())
    assert len(m["layers"]) == 14 and all(l["type"] == "Linear" for l in m["layers"])
    assert not any("lm_head" in l["name"] for l in m["layers"])


def test_rerun_is_a_no_op_and_a_different_run_is_refused(capsys, tmp_path, gpt2_dir, data_file):
    out = tmp_path / "r"
    assert project(capsys, gpt2_dir, data_file, out, "--rank", "16")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, stdout, _ = project(capsys, gpt2_dir, data_file, out, "--rank", "16")
    assert code == 0 and "already holds this complete run" in stdout
    code, _, err = project(capsys, gpt2_dir, data_file, out, "--rank", "64")
    assert code == 2 and "different run" in err and "k's" in err
    code, _, err = project(capsys, gpt2_dir, data_file, out, "--rank", "16", "--max-length", "8")
    assert code == 2 and "--max-length" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing lost


def test_resume_after_interruption_gives_identical_run(capsys, tmp_path, gpt2_dir, data_file):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ["--rank", "16", "--shard-size", "3", "--batch-size", "3"]
    assert project(capsys, gpt2_dir, data_file, full, *args)[0] == 0
    assert project(capsys, gpt2_dir, data_file, part, *args)[0] == 0
    # simulate a run killed after its second shard
    m = json.loads((part / "manifest.json").read_text())
    for s in m["shards"][2:]:
        (part / s["file"]).unlink()
    m["shards"], m["complete"] = m["shards"][:2], False
    m.pop("summary")
    (part / "manifest.json").write_text(json.dumps(m))
    code, stdout, err = project(capsys, gpt2_dir, data_file, part, *args)
    assert code == 0 and "Resumed after 6 examples" in err
    for s in json.loads((full / "manifest.json").read_text())["shards"]:
        assert (full / s["file"]).read_bytes() == (part / s["file"]).read_bytes()


def test_bad_inputs_get_one_sentence(capsys, tmp_path, gpt2_dir, data_file):
    def fails(*args, match):
        code, out, err = run_cli(args, capsys)
        assert code != 0 and match in err and "Traceback" not in err, (code, err)
        return err

    err = fails("project", "--model", gpt2_dir, "--data", data_file, "--out", tmp_path / "x", "--layers", "nope",
                match="matches no module")
    assert "transformer.h.0.attn.c_attn" in err
    fails("project", "--model", gpt2_dir, "--data", data_file, "--out", tmp_path / "x", "--layers", "ln_f",
          match="unsupported layer types")
    fails("project", "--model", gpt2_dir, "--data", tmp_path / "missing.jsonl", "--out", tmp_path / "x",
          match="does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    fails("project", "--model", gpt2_dir, "--data", bad, "--out", tmp_path / "x", match="line 2 is not valid JSON")
    nofield = tmp_path / "nofield.jsonl"
    write_jsonl(nofield, [{"text": "a b c"}, {"body": "d e f"}])
    fails("project", "--model", gpt2_dir, "--data", nofield, "--out", tmp_path / "x", match="line 2 has no field 'text'")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    fails("project", "--model", gpt2_dir, "--data", empty, "--out", tmp_path / "x", match="holds no examples")
    fails("project", "--model", tmp_path / "nomodel", "--data", data_file, "--out", tmp_path / "x",
          match="does not exist")
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    fails("project", "--model", gpt2_dir, "--data", data_file, "--out", other, match="holds no ghostproj run")
    assert (other / "keep.txt").read_text() == "precious"
    fails("project", "--model", gpt2_dir, "--data", data_file, "--out", tmp_path / "y", "--projector", "fancy",
          match="Unknown --projector")
    fails("project", "--model", gpt2_dir, "--data", data_file, "--out", tmp_path / "y", "--store-dtype", "int8",
          match="Unknown --store-dtype")


def test_hub_id_without_network_is_one_sentence(capsys, tmp_path, data_file):
    code, _, err = run_cli(["project", "--model", "some-org/some-model", "--data", data_file, "--out",
                            tmp_path / "h"], capsys)
    assert code == 2 and "the hub could not be reached" in err and "Traceback" not in err


@pytest.mark.slow
def test_compile_gives_the_eager_vectors(capsys, tmp_path, gpt2_dir, monkeypatch):
    from torch._dynamo.utils import counters

    # Graph capture with the engine's hooks left out of the graph is what --compile adds;
    # the aot_eager backend (traced forward and backward graphs) exercises exactly that,
    # without 20 s of C++ code generation.
    real_compile, compiled = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or real_compile(m, backend="aot_eager"))
    data = tmp_path / "long.jsonl"
    write_jsonl(data, [{"text": "the orchestra played a symphony while the cat sat on the mat " * 2}] * 4 +
                [{"text": "x"}])  # one example without a label position
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        code, _, err = project(capsys, gpt2_dir, data, tmp_path / name, "--rank", "16", "--batch-size", "2",
                               "--max-length", "12", "--store-dtype", "float32", *extra)
        assert code == 0, err
        runs[name] = load_projections(tmp_path / name)
    assert len(compiled) == 1 and counters["stats"]["unique_graphs"] > 0  # the model really ran compiled
    assert torch.equal(runs["compiled"].index, runs["eager"].index)
    assert runs["eager"].grads.abs().max() > 0
    assert rel_err(runs["compiled"].grads, runs["eager"].grads) <= 1e-5


def test_a_compile_failure_is_one_sentence_and_keeps_written_shards(capsys, tmp_path, gpt2_dir, data_file,
                                                                     monkeypatch):
    from torch._dynamo.exc import TorchRuntimeError

    calls = []

    def failing_compile(model):
        def forward(**inputs):
            calls.append(1)
            if len(calls) > 2:  # the first two batches (one shard) get through
                raise TorchRuntimeError("backend exploded\nlong details")
            return model(**inputs)
        return forward
    monkeypatch.setattr(torch, "compile", failing_compile)
    out = tmp_path / "c"
    code, _, err = project(capsys, gpt2_dir, data_file, out, "--rank", "16", "--batch-size", "2", "--shard-size", "4",
                           "--max-length", "24", "--compile")
    assert code == 2 and "torch.compile failed after 4 examples (backend exploded)" in err and "Traceback" not in err
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"] and [s["rows"] for s in m["shards"]] == [4]
    code, _, err = project(capsys, gpt2_dir, data_file, out, "--rank", "16", "--batch-size", "2", "--shard-size", "4",
                           "--max-length", "24")
    assert code == 0 and "Resumed after 4 examples" in err
