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
