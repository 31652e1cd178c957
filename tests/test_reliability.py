"""Crash safety, locking, disk checks, job arrays and torchrun."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import kill_torchrun_after_shards, needs_torchrun, run_cli, torchrun, write_jsonl

from ghostproj.scoring import load_projections


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    words = "the cat sat on the mat bake the bread planets orbit the sun doctor treated fever".split()
    rows = [{"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 11))} for i in range(240)]
    path = d / "corpus.jsonl"
    write_jsonl(path, rows)
    return path


@pytest.fixture(scope="module")
def small(corpus, tmp_path_factory):
    """24 rows: enough for the lock and orphan-file tests, which only need a run to start."""
    path = tmp_path_factory.mktemp("small") / "small.jsonl"
    path.write_text("".join(corpus.read_text().splitlines(keepends=True)[:24]))
    return path


@pytest.fixture(scope="module")
def single(tmp_path_factory, gpt2_dir, corpus):
    """The single-process float32 run the multi-process runs must reproduce."""
    out = tmp_path_factory.mktemp("single") / "single"
    assert run_cli(project_args(gpt2_dir, corpus, out, "--store-dtype", "float32"))[0] == 0
    return out


def assert_same_vectors(single_dir, other_dir):
    a, b = load_projections(single_dir), load_projections(other_dir)
    order = torch.argsort(b.index)
    assert b.index[order].tolist() == a.index.tolist() == list(range(240))
    assert torch.allclose(b.grads[order], a.grads, rtol=1e-4, atol=1e-6)


def project_args(model_dir, data, out, *extra):
    return ["project", "--model", model_dir, "--data", data, "--out", out, "--rank", "16", "--shard-size", "16",
            "--batch-size", "8", "--max-length", "24", *extra]


@pytest.mark.parametrize("batching, kill_points", [
    (("--batch-size", "12"), (3,)),  # shard boundaries inside batches
    (("--token-budget", "100"), (2,)),  # length buckets, boundaries anywhere
])
def test_sigkill_at_several_points_then_resume_is_identical(capsys, tmp_path, gpt2_dir, corpus, batching,
                                                            kill_points):
    full = tmp_path / "full"
    assert run_cli(project_args(gpt2_dir, corpus, full, *batching), capsys)[0] == 0
    for kill_after in kill_points:
        part = tmp_path / f"killed{kill_after}"
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        args = project_args(gpt2_dir, corpus, part, *batching)
        proc = subprocess.Popen([sys.executable, "-m", "ghostproj", *map(str, args)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                n = len(json.loads((part / "manifest.json").read_text())["shards"])
            except (OSError, ValueError, KeyError):
                n = 0
            if n >= kill_after or proc.poll() is not None:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        m = json.loads((part / "manifest.json").read_text())
        assert not m["complete"], "the run finished before it could be killed"
        code, _, err = run_cli(args, capsys)
        assert code == 0 and "Resumed after" in err, err
        names = sorted(p.name for p in full.iterdir())
        assert sorted(p.name for p in part.iterdir()) == names
        for name in names:
            if name != "manifest.json":
                assert (full / name).read_bytes() == (part / name).read_bytes(), name


def test_second_writer_is_refused_and_a_stale_lock_is_taken_over(capsys, tmp_path, gpt2_dir, small):
    out = tmp_path / "locked"
    out.mkdir()
    import socket

    (out / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}")  # a live holder: this test process
    code, _, err = run_cli(project_args(gpt2_dir, small, out), capsys)
    assert code == 2 and "is being written by process" in err
    (out / ".lock").write_text(f"999999999 {socket.gethostname()}")  # its writer died
    code, _, err = run_cli(project_args(gpt2_dir, small, out), capsys)
    assert code == 0, err
    assert not (out / ".lock").exists()


def test_taking_the_lock_sweeps_temporaries_of_killed_writers_only(tmp_path):
    import socket

    from ghostproj.store import RunLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    orphan = tmp_path / f".grads-r000-00001.safetensors.tmp-{host}-{dead.pid}"
    live = tmp_path / f".grads-r001-00001.safetensors.tmp-{host}-{os.getpid()}"
    elsewhere = tmp_path / f".manifest.json.tmp-{host}x-{dead.pid}"  # same pid, another host
    for path in (orphan, live, elsewhere):
        path.write_bytes(b"partial")
    with RunLock(tmp_path):
        assert not orphan.exists()
        assert live.exists() and elsewhere.exists()


def test_disk_checks(capsys, tmp_path, gpt2_dir, corpus, monkeypatch):
    import errno

    import ghostproj.jobs.project as project
    import ghostproj.store.writer as writer

    monkeypatch.setattr(project.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    code, _, err = run_cli(project_args(gpt2_dir, corpus, tmp_path / "small"), capsys)
    assert code == 2 and "free space or pass --force" in err
    monkeypatch.undo()
    real = writer.atomic_write
    calls = {"n": 0}

    def filling(path, data):
        if path.name.startswith("grads-"):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)
    monkeypatch.setattr(writer, "atomic_write", filling)
    out = tmp_path / "full-disk"
    code, _, err = run_cli(project_args(gpt2_dir, corpus, out), capsys)
    assert code == 2 and "is full after 32 examples" in err and "Traceback" not in err
    monkeypatch.undo()
    m = json.loads((out / "manifest.json").read_text())
    assert len(m["shards"]) == 2 and not m["complete"]
    assert sorted(p.name for p in out.glob("grads-*")) == [s["file"] for s in m["shards"]]  # no partial file
    assert run_cli(project_args(gpt2_dir, corpus, out), capsys)[0] == 0


def test_job_array_parts_merge_into_the_single_process_run(capsys, tmp_path, gpt2_dir, corpus, single):
    parts = []
    for i in range(3):
        part = tmp_path / f"part{i}"
        code, _, err = run_cli(project_args(gpt2_dir, corpus, part, "--store-dtype", "float32", "--num-shards", "3",
                                            "--shard-id", str(i)), capsys)
        assert code == 0, err
        parts.append(part)
    code, _, err = run_cli(["inspect", "--merge", tmp_path / "merged", parts[0], parts[1]], capsys)
    assert code == 2 and "Shards 2 of 3 are missing" in err
    code, _, err = run_cli(["inspect", "--merge", tmp_path / "merged", parts[0], parts[0], parts[1]], capsys)
    assert code == 2 and "overlap" in err
    code, _, err = run_cli(project_args(gpt2_dir, corpus, parts[1], "--store-dtype", "float32", "--num-shards", "4",
                                        "--shard-id", "1"), capsys)
    assert code == 2 and "holds part 1 of 3" in err
    code, out, err = run_cli(["inspect", parts[1]], capsys)
    assert code == 0 and "80 rows" in out, err
    code, out, err = run_cli(["inspect", "--merge", tmp_path / "merged", *parts], capsys)
    assert code == 0, err
    assert_same_vectors(single, tmp_path / "merged")


@needs_torchrun
def test_torchrun_two_ranks_on_cpu(tmp_path, gpt2_dir, corpus, single):
    out = tmp_path / "ranks"
    res = torchrun(2, project_args(gpt2_dir, corpus, out, "--store-dtype", "float32"))
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and {s["rank"] for s in m["shards"]} == {0, 1}
    assert not list(out.glob("manifest-r*")) and not list(out.glob(".lock*"))
    assert_same_vectors(single, out)


@needs_torchrun
@pytest.mark.parametrize("before, after", [(2, 3), (3, 2)])  # a rank that is new, and ranks that are gone
def test_torchrun_resume_with_a_different_number_of_ranks(tmp_path, gpt2_dir, corpus, single, before, after):
    out = tmp_path / "ranks"
    args = project_args(gpt2_dir, corpus, out, "--store-dtype", "float32")
    kill_torchrun_after_shards(args, out, 2, ranks=before)
    res = torchrun(after, args)
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and not list(out.glob("manifest-r*"))
    assert_same_vectors(single, out)


def test_each_torchrun_rank_takes_its_own_gpu(monkeypatch):
    from ghostproj import distributed as project
    from ghostproj.errors import GhostprojError

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert project.device_for_this_process("auto") == "auto"  # not under torchrun
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert project.device_for_this_process("auto") == "cuda:1" and current == [1]
    assert project.device_for_this_process("cuda") == "cuda:1"
    assert project.device_for_this_process("cpu") == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(GhostprojError, match="only 2 GPU"):
        project.device_for_this_process("auto")


def test_a_run_killed_while_writing_its_first_manifest_starts_again(capsys, tmp_path, gpt2_dir, small):
    import socket

    out = tmp_path / "first"
    out.mkdir()
    orphan = out / f".manifest.json.tmp-{socket.gethostname()}-999999999"
    orphan.write_bytes(b"{")
    code, _, err = run_cli(project_args(gpt2_dir, small, out), capsys)
    assert code == 0, err
    assert not orphan.exists()


def _writer(tmp_path, store_dtype, shard_size=4):
    from ghostproj.store import LayerInfo, Manifest, RunWriter

    manifest = Manifest(fingerprint="f" * 64, layers=[LayerInfo("l", "Linear", 3, 2, 3, 2, 0)], store_dtype=store_dtype)
    return RunWriter(tmp_path, manifest, shard_size), manifest


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_stops_the_writer_naming_its_example(tmp_path, bad):
    from ghostproj.errors import GhostprojError

    writer, manifest = _writer(tmp_path, "bfloat16")
    good = torch.randn(4, 6)
    writer.add(good, torch.arange(4), torch.zeros(4), torch.ones(4, dtype=torch.int32))
    broken = torch.randn(3, 6)
    broken[1, 2] = bad
    writer.add(broken, torch.arange(10, 13), torch.zeros(3), torch.ones(3, dtype=torch.int32))
    with pytest.raises(GhostprojError, match="Example 11 produced a non-finite gradient"):
        writer.finish({})
    assert [s.rows for s in manifest.shards] == [4]  # the complete shard before it is kept


def test_float16_storage_refuses_values_beyond_its_range(tmp_path):
    from ghostproj.errors import GhostprojError

    writer, manifest = _writer(tmp_path, "float16", shard_size=2)
    writer.add(torch.full((2, 3), 1e5), torch.arange(2), torch.zeros(2), torch.ones(2, dtype=torch.int32))
    with pytest.raises(GhostprojError, match="exceed the range of float16"):
        writer.finish({})
    assert manifest.shards == []
