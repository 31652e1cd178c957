"""A killed run resumes into the clean run, byte for byte: generated cases over shard size,
batch size or token budget, job-array part and every point a crash can stop a run at."""

import json
import os
import socket

import pytest
from helpers import word_rows, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ghostproj.inputs as inputs_module
import ghostproj.jobs.project as project_job
import ghostproj.store.manifest as manifest_module
import ghostproj.store.writer as writer_module
from ghostproj.jobs.project import ProjectOptions, run_project
from ghostproj.models import load_model

DEAD_PID = 999_999_999  # no such process: what a killed writer leaves behind
ROWS = 22


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "corpus.jsonl"
    write_jsonl(path, word_rows(ROWS, 5, 0, 13))  # 0..12 words: padding and length buckets differ per batch
    return path


class Runs:
    """In-process runs of one model (loaded once) that record every file write in order:
    the sequence a crash can cut anywhere."""

    def __init__(self, model_dir, data, root, monkeypatch):
        self.model_dir, self.data, self.root = str(model_dir), str(data), root
        self.clean: dict = {}
        self.count = 0
        self.log: list | None = None
        loaded = load_model(self.model_dir, "float32", "cpu")
        monkeypatch.setattr(inputs_module, "load_model", lambda *args, **kwargs: loaded)
        monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not what is tested here
        for module in (writer_module, manifest_module, project_job):
            real = module.atomic_write

            def recording(path, data, real=real):
                if self.log is not None:
                    self.log.append((path.name, b"".join(bytes(d) for d in data) if isinstance(data, list) else data))
                return real(path, data)
            monkeypatch.setattr(module, "atomic_write", recording)

    def run(self, out, config):
        opts = ProjectOptions(model=self.model_dir, data=self.data, out=str(out), rank=4, max_length=16,
                              store_dtype="float32", show_progress=False, **config)
        return run_project(opts)

    def clean_run(self, config):
        """(files of the finished run, the writes that made it), once per configuration."""
        key = json.dumps(config, sort_keys=True)
        if key not in self.clean:
            self.count += 1
            out = self.root / f"clean{self.count}"
            self.log = []
            self.run(out, config)
            ops, self.log = self.log, None
            self.clean[key] = (files(out), ops)
        return self.clean[key]


def files(run_dir):
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.name != ".lock"}


def without_summary(raw: bytes) -> dict:
    """A manifest less what tells two runs apart by when they ran: its summary (seconds,
    what was resumed) and, for a run killed before its first manifest, its start time."""
    m = json.loads(raw)
    m.pop("summary", None)
    m.pop("created", None)
    return m


configs = st.fixed_dictionaries({
    "shard_size": st.integers(1, 12),
    "batch_size": st.integers(1, 8),
    "token_budget": st.one_of(st.none(), st.integers(6, 60)),
    "num_shards": st.sampled_from([1, 1, 2, 3]),
}).flatmap(lambda c: st.fixed_dictionaries({**{k: st.just(v) for k, v in c.items()},
                                            "shard_id": st.integers(0, c["num_shards"] - 1)}))


@pytest.fixture(scope="module")
def runs(gpt2_dir, corpus, tmp_path_factory):
    patch = pytest.MonkeyPatch()
    try:
        yield Runs(gpt2_dir, corpus, tmp_path_factory.mktemp("runs"), patch)
    finally:
        patch.undo()


CRASHES_PER_RUN = 2  # crash points resumed per generated configuration: 100 x 2 = 200 cases
RESUMED = {"cases": 0, "configs": set()}


@settings(max_examples=100, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(config=configs, data=st.data())
def test_any_crash_point_resumes_into_the_clean_run(runs, tmp_path_factory, config, data):
    clean, ops = runs.clean_run(config)
    cuts = data.draw(st.lists(st.integers(0, len(ops)), min_size=CRASHES_PER_RUN, max_size=CRASHES_PER_RUN,
                              unique=True), label="writes that reached the disk before each crash")
    for cut in cuts:
        torn = cut < len(ops) and data.draw(st.booleans(), label="the next write was cut half-way")
        stale_lock = data.draw(st.booleans(), label="the killed writer's lock is left")
        out = tmp_path_factory.mktemp("crash")
        for name, raw in ops[:cut]:
            (out / name).write_bytes(raw)
        if torn:
            name, raw = ops[cut]
            (out / f".{name}.tmp-{socket.gethostname()}-{DEAD_PID}").write_bytes(raw[:len(raw) // 2])
        if stale_lock:
            (out / ".lock").write_text(f"{DEAD_PID} {socket.gethostname()}")
        runs.run(out, config)
        got = files(out)
        assert sorted(got) == sorted(clean)  # no leftover temporary, lock or extra shard
        for name, raw in clean.items():
            if name == "manifest.json":
                assert without_summary(got[name]) == without_summary(raw)
            else:
                assert got[name] == raw, name
        assert json.loads(got["manifest.json"])["complete"]
        RESUMED["cases"] += 1
        RESUMED["configs"].add(json.dumps(config, sort_keys=True))


def test_at_least_two_hundred_crash_cases_ran():
    if not RESUMED["cases"]:
        pytest.skip("the generated crash cases did not run in this session")
    print(f"{RESUMED['cases']} crash cases over {len(RESUMED['configs'])} configurations")
    assert RESUMED["cases"] >= 200
