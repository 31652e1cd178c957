"""`project --fsdp`: FSDP2 shards the weights across torchrun's ranks; each rank projects
its own rows, and the run equals a single process's, also when a rank has fewer batches or
a batch without label positions (every rank must join every gather), and after a kill."""

import json

import pytest
import torch
from helpers import kill_torchrun_after_shards, kill_tree, needs_torchrun, rel_err, run_cli, torchrun, write_jsonl

from ghostproj.scoring import load_projections


def args(model_dir, data, out, *extra):
    return ["project", "--model", model_dir, "--data", data, "--out", out, "--rank", "16", "--shard-size", "8",
            "--max-length", "24", "--store-dtype", "float32", "--device", "cpu", *extra]


def same_vectors(one, sharded):
    a, b = load_projections(one), load_projections(sharded)
    oa, ob = torch.argsort(a.index), torch.argsort(b.index)
    assert b.index[ob].tolist() == a.index[oa].tolist() == list(range(37))
    assert rel_err(b.grads[ob], a.grads[oa]) <= 1e-5


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """37 rows, two without a label position, of mixed lengths: ranks get different numbers
    of token-budget batches, and some batch holds no label position."""
    words = "the cat sat on the mat bake the bread planets orbit the sun".split()
    rows = [{"text": " ".join(words[(i * 5 + j) % len(words)] for j in range(2 + (i * 7) % 13))} for i in range(37)]
    rows[5]["text"], rows[7]["text"], rows[20]["text"] = "", "a", ""  # rows 5 and 7: one batch of 2 on rank 1
    path = tmp_path_factory.mktemp("uneven") / "data.jsonl"
    write_jsonl(path, rows)
    return path


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, tokenizer):
    from helpers import tiny_qwen3_moe

    d = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    tiny_qwen3_moe(len(tokenizer)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@needs_torchrun
@pytest.mark.parametrize("model_dir", ["gpt2_dir", "llama_dir", "moe_dir"])
def test_fsdp_ranks_equal_one_process(request, tmp_path, model_dir, uneven):
    model_dir = request.getfixturevalue(model_dir)
    batching = ("--token-budget", "40")
    assert run_cli(args(model_dir, uneven, tmp_path / "one", *batching))[0] == 0
    res = torchrun(2, args(model_dir, uneven, tmp_path / "fsdp", *batching, "--fsdp"))
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "fsdp" / "manifest.json").read_text())
    assert m["complete"] and {s["rank"] for s in m["shards"]} == {0, 1} and not list((tmp_path / "fsdp").glob("manifest-r*"))
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert m["fingerprint"] == one["fingerprint"]  # the weights hashed whole, gathered one unit at a time
    same_vectors(tmp_path / "one", tmp_path / "fsdp")


LOAD = """
import sys, torch, torch.distributed as td
from ghostproj.distributed import load_sharded
from ghostproj.memory_trace import allocator_peak
from ghostproj.models import load_model

model = load_model(sys.argv[1], meta=True)[0]
whole = sum(p.numel() * p.element_size() for p in model.parameters())
largest = max(p.numel() * p.element_size() for p in model.parameters())
peak = allocator_peak(lambda: load_sharded(model, sys.argv[1], "float32", None, torch.device("cpu")))
mine = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
print(td.get_rank(), peak / whole, mine / whole, largest / whole, flush=True)
td.destroy_process_group()
"""


@needs_torchrun
def test_no_rank_but_the_first_holds_the_whole_model(tmp_path, llama_dir):
    """The sharded load: rank 0 reads the checkpoint into host memory, and every other rank
    allocates its shard and one weight in flight (here the embedding, a fifth of this tiny
    model), never the model."""
    (tmp_path / "load.py").write_text(LOAD)
    res = torchrun(2, [llama_dir], script=tmp_path / "load.py")
    assert res.returncode == 0, res.stderr[-3000:]
    shares = {int(r): tuple(map(float, v)) for r, *v in (line.split() for line in res.stdout.split("\n") if line)}
    assert shares[0][0] > 1.0  # the whole checkpoint, in host memory
    peak, mine, largest = shares[1]
    assert 0.45 < mine < 0.55 and peak <= mine + 2 * largest, shares  # gloo may stage the weight once more


@needs_torchrun
def test_a_killed_fsdp_run_resumes(tmp_path, gpt2_dir, uneven):
    assert run_cli(args(gpt2_dir, uneven, tmp_path / "one", "--batch-size", "2"))[0] == 0
    out = tmp_path / "fsdp"
    cmd = args(gpt2_dir, uneven, out, "--batch-size", "2", "--fsdp")
    kill_torchrun_after_shards(cmd, out, 1)
    res = torchrun(2, cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    same_vectors(tmp_path / "one", out)


def test_fsdp_needs_torchrun(capsys, tmp_path, gpt2_dir, uneven):
    code, _, err = run_cli(args(gpt2_dir, uneven, tmp_path / "x", "--fsdp"), capsys)
    assert code == 2 and "--fsdp shards the model across torchrun's ranks" in err
    code, _, err = run_cli(args(gpt2_dir, uneven, tmp_path / "y", "--fsdp", "--compile"), capsys)
    assert code == 2 and "drop --compile" in err


@needs_torchrun
def test_fsdp_factors_and_their_eigenbasis_equal_one_process(tmp_path, llama_dir, uneven):
    """`factors --fsdp` over ranks with unequal batches and a batch without label positions
    (fillers add nothing), and `project --fsdp --factors` with them: one process's file to
    float32 rounding, and its vectors to 1e-5."""
    from ghostproj.store.factors_file import load_factors

    common = ["factors", "--model", llama_dir, "--data", uneven, "--max-length", "24", "--token-budget", "40",
              "--device", "cpu", "--layers", "mlp"]
    assert run_cli([*common, "--out", tmp_path / "one.safetensors"])[0] == 0
    res = torchrun(2, [*common, "--out", tmp_path / "fsdp.safetensors", "--fsdp"])
    assert res.returncode == 0, res.stderr[-3000:]
    (one, rec1), (two, rec2) = load_factors(tmp_path / "one.safetensors"), load_factors(tmp_path / "fsdp.safetensors")
    assert rec1["identity"] == rec2["identity"] and two.examples == one.examples == 37
    for name, f in one.layers.items():
        o = two.layers[name]
        assert o.positions == f.positions and o.sq_norms == pytest.approx(f.sq_norms, rel=1e-5)
        for x, y in ((o.a, f.a), (o.g, f.g)):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-6 * float(y.abs().max()))
    eigen = ("--factors", tmp_path / "one.safetensors", "--layers", "mlp")
    assert run_cli(args(llama_dir, uneven, tmp_path / "p-one", *eigen))[0] == 0
    res = torchrun(2, args(llama_dir, uneven, tmp_path / "p-fsdp", *eigen, "--fsdp"))
    assert res.returncode == 0, res.stderr[-3000:]
    same_vectors(tmp_path / "p-one", tmp_path / "p-fsdp")


def test_sharded_runs_refuse_what_they_cannot_shard(capsys, tmp_path, gpt2_dir, uneven):
    (tmp_path / "adapter").mkdir()
    code, _, err = run_cli(args(gpt2_dir, uneven, tmp_path / "a", "--fsdp", "--adapter", tmp_path / "adapter"),
                           capsys)
    assert code == 2 and "drop --adapter" in err
    code, _, err = run_cli(["factors", "--model", gpt2_dir, "--data", uneven, "--out", tmp_path / "f.safetensors",
                            "--fsdp", "--device", "cpu"], capsys)
    assert code == 2 and "start the command with torchrun" in err and not (tmp_path / "f.safetensors").exists()


@needs_torchrun
def test_a_killed_fsdp_factors_run_resumes_into_the_clean_file(tmp_path, gpt2_dir, uneven):
    """Killed once each rank has a checkpoint of its sums, `factors --fsdp` resumes, every
    rank from its own batch (fillers agreed again), into the clean run's file byte for byte."""
    import time

    common = ["factors", "--model", gpt2_dir, "--data", uneven, "--max-length", "24", "--batch-size", "2",
              "--device", "cpu", "--layers", "mlp", "--fsdp", "--checkpoint-minutes", "0"]
    clean, killed = tmp_path / "clean.safetensors", tmp_path / "killed.safetensors"
    assert torchrun(2, [*common, "--out", clean]).returncode == 0
    proc = torchrun(2, [*common, "--out", killed], popen=True)
    deadline = time.time() + 120
    partials = [killed.with_name(f"{killed.name}.partial-r{r:03d}") for r in (0, 1)]
    while time.time() < deadline and proc.poll() is None and not all(p.exists() for p in partials):
        time.sleep(0.005)
    kill_tree(proc.pid)
    proc.wait()
    assert not killed.exists() and all(p.exists() for p in partials)
    res = torchrun(2, [*common, "--out", killed])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed after" in res.stderr + res.stdout
    assert killed.read_bytes() == clean.read_bytes()
