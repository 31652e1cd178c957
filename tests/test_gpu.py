"""The same exactness checks on a CUDA device: engine against the CPU naive reference in
float32 and bfloat16, under autocast, the in-run engine, and a whole `project` run on the
GPU against one on the CPU. Skipped where no GPU is present."""

import copy

import pytest
import torch
from helpers import (
    captured_reference,
    kron_reference,
    rel_err,
    run_cli,
    tiny_gpt2,
    tiny_llama,
    write_jsonl,
)

from ghostproj import GradProjectionEngine
from ghostproj.data import Example, collate
from ghostproj.data.transfer import HostCopy
from ghostproj.engines.dotprod import GradDotProdEngine
from ghostproj.engines.losses import causal_lm_losses
from ghostproj.jobs.checks import engine_projected_grads
from ghostproj.scoring import load_projections

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = ["the orchestra played a symphony while the cat sat on the mat", "bake the bread", "x",
         "stocks fell as the bank raised rates " * 6, "planets orbit the sun"]


def examples(tokenizer):
    out = [Example(i, tokenizer(t)["input_ids"][:40]) for i, t in enumerate(TEXTS)]
    out[0].loss_mask = [False] * 5 + [True] * (len(out[0].input_ids) - 5)  # a masked prompt
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_engine_on_gpu_matches_the_cpu_reference(tokenizer, arch, dtype, tol):
    torch.manual_seed(0)
    cpu_model = tiny_gpt2(len(tokenizer)) if arch == "gpt2" else tiny_llama(len(tokenizer))
    gpu_model = copy.deepcopy(cpu_model).to("cuda", dtype)
    exs = examples(tokenizer)
    got = engine_projected_grads(gpu_model, exs, GradProjectionEngine(gpu_model, None, rank=64))
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    ref_model = copy.deepcopy(gpu_model).to("cpu", torch.float32)  # the same (rounded) weights, exact arithmetic
    ref = kron_reference(ref_model, exs, GradProjectionEngine(ref_model, None, rank=64))
    assert ref.abs().max() > 0
    assert rel_err(got, ref) <= tol


def test_autocast_on_gpu_accumulates_in_float32(tokenizer):
    torch.manual_seed(0)
    model = tiny_llama(len(tokenizer)).to("cuda")
    engine = GradProjectionEngine(model, None, rank=64)
    got, ref, low = captured_reference(model, engine, examples(tokenizer), autocast=True, device="cuda",
                                       round_matrices=True)
    assert low >= 4
    # bf16 tensors meet bf16 copies of the matrices in tensor-core products with float32
    # accumulators: exact up to float32 rounding against those rounded matrices ...
    assert rel_err(got, ref) <= 2e-5
    # ... and within the matrices' own bf16 rounding (2^-9 per entry) of the exact ones
    _, exact, _ = captured_reference(model, engine, examples(tokenizer), autocast=True, device="cuda")
    assert rel_err(got, exact) <= 5e-3


def test_dot_products_on_gpu_equal_the_cpu_ones(tokenizer):
    torch.manual_seed(0)
    cpu_model = tiny_gpt2(len(tokenizer))
    gpu_model = copy.deepcopy(cpu_model).cuda()
    batch = collate(examples(tokenizer))
    results = []
    for model, device in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        b = batch.to(device)
        with GradDotProdEngine(model, val_batch_size=2, per_query=True) as engine:
            logits = model(**b.model_inputs()).logits
            causal_lm_losses(logits, b.labels)[0].sum().backward()
            results.append(engine.collect().total.cpu())
    assert rel_err(results[1], results[0]) <= 1e-4


def test_host_copy_of_gpu_tensors():
    x = torch.randn(64, 33, device="cuda")
    y = torch.arange(64, device="cuda")
    copy_ = HostCopy([x * 2, y])
    got_x, got_y = copy_.result()
    assert got_x.device.type == "cpu" and got_x.is_pinned()
    assert torch.equal(got_x, (x * 2).cpu()) and torch.equal(got_y, y.cpu())


def test_project_on_gpu_equals_project_on_cpu(capsys, tmp_path, gpt2_dir, data_file):
    runs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        code, _, err = run_cli(["project", "--model", gpt2_dir, "--data", data_file, "--out", out, "--rank", "64",
                                "--batch-size", "3", "--store-dtype", "float32", "--device", device], capsys)
        assert code == 0, err
        runs[device] = load_projections(out)
    assert torch.equal(runs["cuda"].index, runs["cpu"].index)
    assert rel_err(runs["cuda"].grads, runs["cpu"].grads) <= 1e-4


def test_shared_inputs_and_compiled_model_on_gpu(tokenizer):
    """bf16 on the GPU: the grouped projection of a shared input (from the second step) and
    a compiled model give the vectors of the first, eager step."""
    torch.manual_seed(0)
    model = tiny_llama(len(tokenizer)).to("cuda", torch.bfloat16)
    batch = collate(examples(tokenizer)).to("cuda")
    engine = GradProjectionEngine(model, None, rank=64)

    def loss():
        return causal_lm_losses(model(**batch.model_inputs()).logits, batch.labels)[0].sum()
    with engine:
        results = []
        for _ in range(2):
            loss().backward()
            results.append(engine.collect())
        assert engine.inputs._groups
        engine.prepare(len(TEXTS), "cuda")
        torch._dynamo.reset()
        torch.compile(loss, backend="aot_eager")().backward()
        results.append(engine.collect())
    assert rel_err(results[1], results[0]) <= 1e-5
    assert rel_err(results[2], results[0]) <= 1e-5


@pytest.fixture(scope="module")
def score_runs(tmp_path_factory, gpt2_dir, data_file):
    """Training and query runs stored in bfloat16 and in float32, projected on the CPU."""
    d = tmp_path_factory.mktemp("gpu_score")
    qdata = d / "query.jsonl"
    write_jsonl(qdata, [{"text": t} for t in TEXTS])
    runs = {}
    for dtype in ("bfloat16", "float32"):
        train, query = d / f"train-{dtype}", d / f"query-{dtype}"
        for args in (["--data", data_file, "--out", train, "--shard-size", "3", "--store-dtype", dtype, "--rank",
                      "16"], ["--data", qdata, "--out", query, "--like", train]):
            assert run_cli(["project", "--model", gpt2_dir, "--max-length", "24", "--device", "cpu", *args])[0] == 0
        runs[dtype] = (train, query)
    return runs


@pytest.mark.parametrize("store", ["bfloat16", "float32"])
@pytest.mark.parametrize("metric,normalize,center", [
    ("cosine", "layer", False), ("dot", "none", False), ("dot", "unit", True), ("influence", "layer", False),
    ("influence-full", "none", False)])
def test_score_on_gpu_matches_the_cpu(score_runs, store, metric, normalize, center):
    from ghostproj.scoring import score

    train, query = score_runs[store]
    kw = dict(metric=metric, normalize=normalize, center=center, top_k=3, reduce="mean", keep_matrix=True)
    cpu = score(train, query, device="cpu", **kw)
    gpu = score(train, query, device="cuda", chunk_rows=4, **kw)
    # bf16 operands with float32 accumulation: each score within 2^-7 |x| |q|; float32 stays float32
    tol = 1e-2 if store == "bfloat16" else 1e-5
    assert gpu.scores.device.type == "cpu" and gpu.topk_scores.device.type == "cpu"
    assert torch.equal(gpu.train_index, cpu.train_index)
    assert rel_err(gpu.scores, cpu.scores) <= tol
    assert rel_err(gpu.selection[:, None], cpu.selection[:, None]) <= tol
    assert rel_err(gpu.topk_scores, cpu.topk_scores) <= tol
    if store == "float32":
        assert torch.equal(gpu.topk_train, cpu.topk_train)


def test_score_parts_on_gpu_merge_to_the_single_gpu_answer(capsys, score_runs, tmp_path):
    train, query = score_runs["bfloat16"]
    common = ["--device", "cuda", "--chunk-rows", "4", "--top-k", "3", "--reduce", "max", "--show", "0"]
    assert run_cli(["score", train, query, *common, "--topk-out", tmp_path / "one.jsonl", "--select-out",
                    tmp_path / "one.sel.jsonl"], capsys)[0] == 0
    parts = [tmp_path / f"p{i}.safetensors" for i in range(3)]
    for i, p in enumerate(parts):
        assert run_cli(["score", train, query, *common, "--num-parts", "3", "--part", i, "--part-out", p],
                       capsys)[0] == 0
    assert run_cli(["merge-scores", *parts, "--topk-out", tmp_path / "m.jsonl", "--select-out",
                    tmp_path / "m.sel.jsonl"], capsys)[0] == 0
    assert (tmp_path / "m.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert (tmp_path / "m.sel.jsonl").read_bytes() == (tmp_path / "one.sel.jsonl").read_bytes()


def test_fisher_on_gpu_matches_the_cpu(capsys, score_runs, tmp_path):
    from safetensors.torch import load_file

    train, _ = score_runs["float32"]
    for device in ("cpu", "cuda"):
        assert run_cli(["fisher", train, "--out", tmp_path / f"{device}.safetensors", "--device", device,
                        "--chunk-rows", "5"], capsys)[0] == 0
    a, b = load_file(tmp_path / "cpu.safetensors"), load_file(tmp_path / "cuda.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-8), k


def test_adam_directions_on_gpu_equal_the_cpu_ones(capsys, tmp_path, gpt2_dir, data_file):
    from ghostproj.models import load_model

    model, _ = load_model(str(gpt2_dir), device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    for device in ("cpu", "cuda"):
        code, _, err = run_cli(["project", "--model", gpt2_dir, "--data", data_file, "--out", tmp_path / device,
                                "--layers", "c_fc", "--rank", "16", "--max-length", "24", "--store-dtype", "float32",
                                "--device", device, "--optimizer-state", tmp_path / "optimizer.pt"], capsys)
        assert code == 0, err
    assert rel_err(load_projections(tmp_path / "cuda").grads, load_projections(tmp_path / "cpu").grads) <= 1e-3


def test_evaluate_on_gpu_reports_every_setting(capsys, tmp_path, gpt2_dir, data_file):
    import json

    queries = tmp_path / "q.jsonl"
    write_jsonl(queries, [{"text": t} for t in TEXTS])
    code, _, err = run_cli(["evaluate", "--model", gpt2_dir, "--train", data_file, "--query", queries, "--out",
                            tmp_path / "ev", "--subsets", "5", "--epochs", "1", "--checkpoints", "2", "--rank", "16",
                            "--max-length", "24", "--removal-queries", "1", "--removal-k", "2", "--batch-size", "4",
                            "--replicates", "50", "--metrics", "dot,influence,inrun", "--device", "cuda"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "ev" / "lds.json").read_text())
    assert len(report["settings"]) == 2 * 2 * 2 + 1
    assert all(-1.0 <= s["lds"] <= 1.0 for s in report["settings"])
