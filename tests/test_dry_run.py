"""`project --dry-run`: layers, D and store size equal the run it describes, and the
memory it traces on the meta device equals what torch's allocator holds in the same step
on the CPU (an independent measure: the profiler's allocation events)."""

import json

import pytest
import torch
from helpers import fails, run_cli, tiny_qwen3_moe, word_rows, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ghostproj.data import collate
from ghostproj.engines.losses import causal_lm_losses
from ghostproj.inputs import load_inputs
from ghostproj.jobs.dry_run import run_dry_run
from ghostproj.jobs.project import ProjectOptions, build_engine, run_values
from ghostproj.memory_trace import allocator_peak
from ghostproj.models import enable_gradient_checkpointing, load_model

KERNEL_SCRATCH = 256 * 1024


def _measured_step(opts: ProjectOptions, checkpointing: bool) -> int:
    """Weight bytes plus the allocator's peak over one real step of the run's largest
    batch (every example in one batch), on the CPU, after a first step."""
    _, values = run_values(opts)
    inputs = load_inputs(opts, type("S", (), {"notes": []})())
    model = inputs.model
    if checkpointing:
        enable_gradient_checkpointing(model)
    engine = build_engine(model, opts, values, None)
    live = [e for e in inputs.data.examples if e.n_label_positions > 0]
    batch = collate(live, 0)

    def step():
        with engine:
            engine.prepare(len(live), torch.device("cpu"))
            logits = model(**batch.model_inputs()).logits
            per_example, _ = causal_lm_losses(logits, batch.labels, values["loss_reduction"])
            per_example.sum().backward()
            engine.collect()

    weights = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(),
                                                                              *model.buffers()]}.values())
    step()  # the kernels' one-time workspaces, which stay allocated, are not the step's
    return weights + allocator_peak(step)


def _estimate(opts: ProjectOptions, setting: str) -> int | None:
    return next((e.total for e in run_dry_run(opts).estimates if e.setting == setting), None)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["gpt2", "llama"]), checkpointing=st.booleans(),
       lengths=st.lists(st.integers(2, 40), min_size=1, max_size=4), prompt=st.booleans(),
       dtype=st.sampled_from(["float32", "bfloat16"]))
def test_the_traced_step_equals_the_allocator(gpt2_dir, llama_dir, tmp_path_factory, kind, checkpointing, lengths,
                                              prompt, dtype):
    """Padded batches of mixed lengths, masked prompts, both layer types, both dtypes, with and without
    checkpointing: the meta-device trace is the CPU allocator's peak to 2%, give or take
    the scratch buffers kernels allocate inside themselves (CPU attention: tens of KiB),
    which no trace above the kernels sees."""
    d = tmp_path_factory.mktemp("dry")
    words = "the cat sat on the mat while the bank raised rates".split()
    text = [" ".join(words[(i + j) % len(words)] for j in range(n)) for i, n in enumerate(lengths)]
    rows = [{"prompt": t[: len(t) // 2], "completion": t[len(t) // 2:]} if prompt else {"text": t} for t in text]
    write_jsonl(d / "data.jsonl", rows)
    opts = ProjectOptions(model=str(gpt2_dir if kind == "gpt2" else llama_dir), data=str(d / "data.jsonl"),
                          out=str(d / "out"), batch_size=len(rows), rank=16, device="cpu", max_length=48, dtype=dtype)
    estimate = _estimate(opts, "--gradient-checkpointing" if checkpointing else "plain")
    if estimate is None:
        return  # no example has a label position: no step (tested below)
    measured = _measured_step(opts, checkpointing)
    assert abs(estimate - measured) <= 0.02 * measured + KERNEL_SCRATCH, (estimate, measured)


def test_experts_are_estimated_with_balanced_routing(tmp_path, tokenizer):
    """A mixture-of-experts model's estimate assumes a perfectly balanced router; a real
    (seeded, untrained) router is within 15% of it."""
    torch.manual_seed(0)
    tiny_qwen3_moe(len(tokenizer)).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    write_jsonl(tmp_path / "data.jsonl", word_rows(6, 3, 8, 5))
    opts = ProjectOptions(model=str(tmp_path / "moe"), data=str(tmp_path / "data.jsonl"), out=str(tmp_path / "out"),
                          batch_size=6, rank=16, device="cpu", layers=["re:."])
    for checkpointing, setting in ((False, "plain"), (True, "--gradient-checkpointing")):
        ratio = _estimate(opts, setting) / _measured_step(opts, checkpointing)
        assert 0.85 < ratio < 1.15, (setting, ratio)


def test_dry_run_describes_the_run_and_writes_nothing(gpt2_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["project", "--model", gpt2_dir, "--data", data_file, "--out", out, "--rank", "16", "--max-length", "24",
            "--shard-size", "4", "--batch-size", "3"]
    code, stdout, _ = run_cli([*args, "--dry-run"], capsys)
    assert code == 0 and not out.exists()
    assert "no weight loaded, nothing written" in stdout and "--gradient-checkpointing" in stdout
    report = run_dry_run(ProjectOptions(model=str(gpt2_dir), data=str(data_file), out=str(out), rank=16,
                                        max_length=24, shard_size=4, batch_size=3))
    assert run_cli(args)[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert report.dim == manifest["dim"] and report.layers == len(manifest["layers"])
    assert report.examples == sum(s["rows"] for s in manifest["shards"])
    stored = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    assert abs(report.store_bytes / stored - 1) < 0.03, (report.store_bytes, stored)
    plain = next(e for e in report.estimates if e.setting == "plain")
    weights = sum(p.numel() * 4 for p in load_model(str(gpt2_dir), device="cpu")[0].parameters())
    assert plain.parameters == weights


def test_fsdp_estimate_holds_a_share_of_the_weights(llama_dir, data_file, monkeypatch):
    """Over more ranks a rank holds less: its shard, the root unit and two decoder layers."""
    opts = ProjectOptions(model=str(llama_dir), data=str(data_file), rank=16, max_length=24)
    held = {}
    for world in (2, 4):
        monkeypatch.setenv("WORLD_SIZE", str(world))
        report = run_dry_run(opts)
        held[world] = next(e.parameters for e in report.estimates if e.setting == f"--fsdp over {world} ranks")
    plain = next(e.parameters for e in report.estimates if e.setting == "plain")
    assert held[4] < held[2] and held[2] - held[4] == pytest.approx(plain / 4, rel=0.01)


@pytest.mark.parametrize("flag", [["--like", "x"], ["--compile"], ["--optimizer-state", "x"], ["--adapter", "x"]])
def test_dry_run_refuses_what_it_cannot_estimate(gpt2_dir, data_file, tmp_path, capsys, flag):
    fails(capsys, "project", "--model", gpt2_dir, "--data", data_file, "--out", tmp_path / "o", "--dry-run", *flag,
          match="--dry-run")
    assert not (tmp_path / "o").exists()


def test_dry_run_without_label_positions_says_so(gpt2_dir, tmp_path):
    write_jsonl(tmp_path / "data.jsonl", [{"prompt": "the cat sat on the mat", "completion": ""}])
    report = run_dry_run(ProjectOptions(model=str(gpt2_dir), data=str(tmp_path / "data.jsonl"), rank=16))
    assert report.estimates == [] and any("no step" in n for n in report.notes)
    assert report.examples == 1 and report.tokens == 0


def test_dry_run_of_a_missing_model_is_one_sentence(data_file, tmp_path, capsys):
    fails(capsys, "project", "--model", tmp_path / "nope", "--data", data_file, "--dry-run", match="does not exist")


def test_run_project_does_not_take_a_dry_run(gpt2_dir, data_file, tmp_path):
    from ghostproj.errors import GhostprojError
    from ghostproj.jobs.project import run_project

    with pytest.raises(GhostprojError, match="run_dry_run"):
        run_project(ProjectOptions(model=str(gpt2_dir), data=str(data_file), out=str(tmp_path / "o"), dry_run=True))
    assert not (tmp_path / "o").exists()


def test_a_dry_run_needs_no_weights(gpt2_dir, data_file, tmp_path, capsys):
    """The config and tokenizer are all it reads: a directory without weight files works."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(gpt2_dir, bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(bare.glob("*.safetensors"))
    code, out, err = run_cli(["project", "--model", bare, "--data", data_file, "--dry-run", "--rank", "16"], capsys)
    assert code == 0 and "D=" in out, err


def test_a_model_that_cannot_be_checkpointed_gets_the_other_estimates(gpt2_dir, data_file, monkeypatch):
    import ghostproj.jobs.dry_run as dry_run
    from ghostproj.errors import GhostprojError

    def refuse(model):
        raise GhostprojError("This model does not support gradient checkpointing.")

    monkeypatch.setattr(dry_run, "enable_gradient_checkpointing", refuse)
    report = run_dry_run(ProjectOptions(model=str(gpt2_dir), data=str(data_file), rank=16, max_length=24))
    assert [e.setting for e in report.estimates] == ["plain", "--fsdp over 8 ranks"]
    assert "does not support gradient checkpointing" in " ".join(report.notes)
