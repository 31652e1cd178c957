"""A killed `factors` run resumes into the clean run's file, byte for byte (generated cases
over batch size or token budget, job-array part and crash point); torchrun ranks sum to
one process; the true Fisher's sampled labels."""

import pytest
import torch
from helpers import fails, needs_torchrun, run_cli, torchrun, word_rows, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ghostproj.inputs as inputs_module
import ghostproj.jobs.factors as factors_job
from ghostproj.engines.losses import IGNORE_INDEX
from ghostproj.jobs.factors import FactorsOptions, partial_path, run_factors, sampled_labels
from ghostproj.models import load_model
from ghostproj.store.factors_file import load_factors
from ghostproj.store.files import host_name

DEAD_PID = 999_999_999


class Crash(BaseException):
    """A kill at a chosen point (BaseException: nothing on the way may catch it)."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("factors-resume") / "corpus.jsonl"
    write_jsonl(path, word_rows(14, 3, 0, 11))
    return path


def _options(model_dir, data, out, config):
    return FactorsOptions(model=str(model_dir), data=str(data), out=str(out), max_length=16, show_progress=False,
                          checkpoint_minutes=0, layers=["h.0"], **config)


# --memory-gb: all four layers of block 0 in one pass, one or two per pass, or one each
MEMORY = st.sampled_from([8.0, 6e-4, 1e-6])
configs = st.one_of(st.fixed_dictionaries({"batch_size": st.integers(1, 5)}),
                    st.fixed_dictionaries({"token_budget": st.integers(8, 40)})).flatmap(
    lambda c: st.integers(1, 2).flatmap(
        lambda k: st.integers(0, k - 1).flatmap(
            lambda i: MEMORY.map(lambda g: {**c, "num_shards": k, "shard_id": i, "memory_gb": g}))))


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(config=configs, crash_at=st.integers(1, 12), after_write=st.booleans())
def test_a_killed_factors_run_resumes_into_the_clean_file(tmp_path_factory, monkeypatch, gpt2_dir, corpus, config,
                                                          crash_at, after_write):
    loaded = load_model(str(gpt2_dir), "float32", "cpu")
    monkeypatch.setattr(inputs_module, "load_model", lambda *args, **kwargs: loaded)
    root = tmp_path_factory.mktemp("case")
    clean = root / "clean.safetensors"
    run_factors(_options(gpt2_dir, corpus, clean, config))
    assert not partial_path(clean).exists()

    real, writes = factors_job.save_factors, []

    def crashing(path, totals, record):
        writes.append(path)
        if len(writes) == crash_at and not after_write:
            raise Crash
        real(path, totals, record)
        if len(writes) == crash_at:
            raise Crash

    out = root / "resumed.safetensors"
    monkeypatch.setattr(factors_job, "save_factors", crashing)
    try:
        run_factors(_options(gpt2_dir, corpus, out, config))
        crashed = False
    except Crash:
        crashed = True
        (root / f".{out.name}.lock").write_text(f"{DEAD_PID} {host_name()}")  # what a kill leaves behind
    monkeypatch.setattr(factors_job, "save_factors", real)
    if crashed and out.exists():  # killed after the file was written, before the checkpoint went
        out.unlink()
    if crashed:
        summary = run_factors(_options(gpt2_dir, corpus, out, config))
        written = writes[:crash_at] if after_write else writes[:crash_at - 1]
        if config["memory_gb"] == 8.0:  # one pass: its checkpoint is taken over
            assert (summary.resumed_batches > 0) == any(w.name.endswith(".partial") for w in written)
    assert out.read_bytes() == clean.read_bytes()
    assert not [p.name for p in root.iterdir() if p.name.startswith("resumed.safetensors.")]


def test_a_checkpoint_is_not_a_factors_file_and_another_runs_is_started_over(capsys, tmp_path, monkeypatch,
                                                                            gpt2_dir, corpus):
    out = tmp_path / "f.safetensors"
    real = factors_job.save_factors

    seen = []

    def crash_on_second(path, totals, record):
        seen.append(path)
        real(path, totals, record)
        if len(seen) == 2:
            raise Crash
    monkeypatch.setattr(factors_job, "save_factors", crash_on_second)
    with pytest.raises(Crash):
        run_factors(_options(gpt2_dir, corpus, out, {"batch_size": 2}))
    monkeypatch.setattr(factors_job, "save_factors", real)
    part = partial_path(out)
    assert part.exists() and not out.exists()
    fails(capsys, "project", "--model", gpt2_dir, "--data", corpus, "--out", tmp_path / "run", "--factors", part,
          match="unfinished factors run")
    fails(capsys, "factors", "--merge", "--out", tmp_path / "m.safetensors", part, match="unfinished factors run")
    # another batch size makes other sums: the checkpoint is not taken over
    summary = run_factors(_options(gpt2_dir, corpus, out, {"batch_size": 3}))
    assert summary.resumed_batches == 0 and any("another factors run" in n for n in summary.notes)
    assert out.exists() and not part.exists()


@needs_torchrun
def test_torchrun_ranks_sum_to_one_process(tmp_path, gpt2_dir, corpus):
    args = ["factors", "--model", gpt2_dir, "--data", corpus, "--max-length", "16", "--batch-size", "2",
            "--device", "cpu"]
    assert run_cli([*args, "--out", tmp_path / "one.safetensors"])[0] == 0
    res = torchrun(2, [*args, "--out", tmp_path / "two.safetensors"])
    assert res.returncode == 0, res.stderr
    (one, rec1), (two, rec2) = load_factors(tmp_path / "one.safetensors"), load_factors(tmp_path / "two.safetensors")
    assert rec1["identity"] == rec2["identity"] and two.examples == one.examples
    for name, f in one.layers.items():
        o = two.layers[name]
        # other batches (each rank's examples padded together): equal to float32 rounding
        assert o.positions == f.positions and o.sq_norms == pytest.approx(f.sq_norms, rel=1e-5)
        for x, y in ((o.a, f.a), (o.g, f.g)):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-6 * float(y.abs().max()))
        assert torch.allclose((o.a_vecs[:4] * f.a_vecs[:4]).sum(1).abs(), torch.ones(4), atol=1e-3)
    assert not list(tmp_path.glob("*.partial*")) and not list(tmp_path.glob(".*.lock*"))
    res = torchrun(2, [*args, "--out", tmp_path / "grouped.safetensors", "--memory-gb", "1e-6"])
    assert res.returncode == 0, res.stderr  # a pass per layer on both ranks: the same file
    assert (tmp_path / "grouped.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    assert not list(tmp_path.glob("*.group-*")) and not list(tmp_path.glob("*.partial*"))


def test_sampled_labels_are_drawn_where_the_data_has_labels():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 5)
    labels = torch.tensor([[-100, 1, 2, 3, -100, -100], [-100, -100, 4, 0, 1, 2], [-100] * 6])
    a = sampled_labels(logits, labels, torch.Generator().manual_seed(1))
    b = sampled_labels(logits, labels, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(a == IGNORE_INDEX, labels == IGNORE_INDEX)
    assert ((a >= 0) | (a == IGNORE_INDEX)).all() and (a < 5).all()
    # drawn from the model's predictions: a near one-hot prediction is drawn every time
    sure = torch.full((1, 3, 5), -30.0)
    sure[0, :, 2] = 30.0
    drawn = sampled_labels(sure, torch.tensor([[-100, 0, 0]]), torch.Generator().manual_seed(5))
    assert drawn.tolist() == [[-100, 2, 2]]


def test_layers_summed_in_several_passes_give_the_one_pass_file(tmp_path, monkeypatch, gpt2_dir, corpus):
    """--memory-gb below the layers' sums: a pass per group of layers, streamed to disk and
    joined one tensor at a time, byte-identical to summing them all at once."""
    loaded = load_model(str(gpt2_dir), "float32", "cpu")
    monkeypatch.setattr(inputs_module, "load_model", lambda *args, **kwargs: loaded)
    whole, grouped = tmp_path / "whole.safetensors", tmp_path / "grouped.safetensors"
    run_factors(_options(gpt2_dir, corpus, whole, {"batch_size": 3}))
    summary = run_factors(_options(gpt2_dir, corpus, grouped, {"batch_size": 3, "memory_gb": 1e-6}))
    assert any("4 passes over the data" in n for n in summary.notes)
    assert grouped.read_bytes() == whole.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grouped.safetensors", "whole.safetensors"]
    totals, _ = load_factors(grouped, sums=False)  # what a projection reads: the eigenvectors, not the sums
    assert all(f.a is None and f.a_vecs is not None for f in totals.layers.values())


def test_a_damaged_checkpoint_is_started_over(tmp_path, monkeypatch, gpt2_dir, corpus):
    loaded = load_model(str(gpt2_dir), "float32", "cpu")
    monkeypatch.setattr(inputs_module, "load_model", lambda *args, **kwargs: loaded)
    clean, out = tmp_path / "clean.safetensors", tmp_path / "f.safetensors"
    run_factors(_options(gpt2_dir, corpus, clean, {"batch_size": 2}))
    partial_path(out).write_bytes(b"\x00garbage" * 10)  # a checkpoint torn by a full disk, say
    summary = run_factors(_options(gpt2_dir, corpus, out, {"batch_size": 2}))
    assert any("damaged; starting over" in n for n in summary.notes)
    assert out.read_bytes() == clean.read_bytes() and not partial_path(out).exists()
