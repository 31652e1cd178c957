"""--optimizer-state: projected Adam update directions against a naive reference."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err, run_cli, write_jsonl
from safetensors.torch import save_file

from ghostproj import GradProjectionEngine
from ghostproj.data import read_records, tokenize_records
from ghostproj.models import load_model
from ghostproj.scoring import load_projections

LAYERS = {"gpt2": "attn.c_attn,mlp.c_fc", "llama": "q_proj,down_proj"}


def _adam_state(model, groups: str):
    """An AdamW state after three steps on random-token batches; ``groups``: one group, or
    a Trainer's decay / no-decay split."""
    params = [p for p in model.parameters() if p.requires_grad]
    if groups == "trainer":
        decay = [p for n, p in model.named_parameters() if "bias" not in n and "norm" not in n.lower()
                 and "ln_" not in n]
        rest = [p for p in params if all(p is not q for q in decay)]
        opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=1e-3,
                                betas=(0.8, 0.99), eps=1e-6)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.8, 0.99), eps=1e-6)
    torch.manual_seed(3)
    model.train()
    for _ in range(3):
        ids = torch.randint(0, model.config.vocab_size, (2, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return opt


def _moments(trained, opt):
    """{parameter name: (m, v)} of an optimizer stepping ``trained``."""
    return {n: (opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]) for n, p in trained.named_parameters()
            if p in opt.state}


def _reference(model, examples, engine, moments, b1=0.8, b2=0.99, eps=1e-6, bias=False):
    """Each example alone, full autograd: G in (n_out, n_in) orientation, the Adam direction
    (b1 m + (1 - b1) G) / (sqrt(b2 v + (1 - b2) G^2) + eps), then kron(P_out, P_in)."""
    modules = dict(model.named_modules())
    out = torch.zeros(len(examples), engine.dim, dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(True)
    for r, ex in enumerate(examples):
        ids = torch.tensor([ex.input_ids])
        labels = ids[0, 1:].clone()
        if ex.loss_mask is not None:
            labels[~torch.tensor(ex.loss_mask[1:])] = -100
        if ids.shape[1] < 2 or (labels != -100).sum() == 0:
            continue
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(input_ids=ids).logits[0, :-1].float(), labels, ignore_index=-100).backward()
        for info in engine.layers:
            w = modules[info.name].weight
            conv = type(modules[info.name]).__name__ == "Conv1D"
            g, m, v = (t.t() if conv else t for t in (w.grad, *moments[f"{info.name}.weight"]))
            g, m, v = g.double(), m.double(), v.double()
            if bias:  # the bias is one more input column, with its own moments
                b = modules[info.name].bias
                mb, vb = moments[f"{info.name}.bias"]
                g, m, v = (torch.cat([a, c.double()[:, None]], 1) for a, c in ((g, b.grad), (m, mb), (v, vb)))
            direction = (b1 * m + (1 - b1) * g) / ((b2 * v + (1 - b2) * g * g).sqrt() + eps)
            p = engine.projectors[info.name]
            out[r, info.offset:info.offset + info.size] = \
                torch.kron(p.p_out.double(), p.p_in.double()) @ direction.reshape(-1)
    model.zero_grad(set_to_none=True)
    return out


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("adam") / "pc.jsonl"
    write_jsonl(path, [{"prompt": p, "completion": c} for p, c in [
        ("the cat", " sat on the mat"), ("stocks fell as", " the bank raised rates again and again"),
        ("bake", " the bread"), ("the orchestra played a symphony", ""), ("planets", " orbit the sun")]])
    return path


@pytest.mark.parametrize("kind,groups", [("gpt2", "one"), ("llama", "trainer")])
def test_adam_directions_match_the_naive_reference(capsys, tmp_path, gpt2_dir, llama_dir, data_file, prompt_data,
                                                   kind, groups):
    model_dir, data = (gpt2_dir, data_file) if kind == "gpt2" else (llama_dir, prompt_data)
    trained, tok = load_model(str(model_dir), device="cpu")
    opt = _adam_state(trained, groups)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    model, tok = load_model(str(model_dir), device="cpu")  # the saved weights; the moments are just tensors
    out = tmp_path / "adam"
    code, _, err = run_cli(["project", "--model", model_dir, "--data", data, "--out", out, "--layers", LAYERS[kind],
                            "--rank", "16", "--batch-size", "3", "--max-length", "24", "--store-dtype", "float32",
                            "--optimizer-state", tmp_path / "optimizer.pt"], capsys)
    assert code == 0, err
    engine = GradProjectionEngine(model, LAYERS[kind].split(","), rank=16)
    if kind == "gpt2":
        examples = tokenize_records(read_records(data), tok, 24)
    else:
        from ghostproj.data.readers import DataSpec, load_examples

        examples = load_examples(DataSpec(str(data)), tok, 24).examples
    ref = _reference(model, examples, engine, _moments(trained, opt))
    got = load_projections(out).grads
    assert ref.abs().max() > 0
    assert rel_err(got, ref) <= 1e-4
    plain = tmp_path / "plain"
    assert run_cli(["project", "--model", model_dir, "--data", data, "--out", plain, "--like", out,
                    "--store-dtype", "float32"], capsys)[0] == 0
    assert rel_err(load_projections(plain).grads, got) > 0.1  # raw gradients differ; same fingerprint
    code, _, err = run_cli(["score", out, plain, "--top-k", "1"], capsys)
    assert code == 0, err


def test_safetensors_moments_give_the_same_vectors_and_bad_states_are_refused(capsys, tmp_path, gpt2_dir,
                                                                               data_file):
    model, _ = load_model(str(gpt2_dir), device="cpu")
    opt = _adam_state(model, "one")
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for p, s in opt.state.items():
        tensors[f"{names[id(p)]}.exp_avg"] = s["exp_avg"].contiguous()
        tensors[f"{names[id(p)]}.exp_avg_sq"] = s["exp_avg_sq"].contiguous()
    save_file(tensors, str(tmp_path / "moments.safetensors"), metadata={"beta1": "0.8", "beta2": "0.99", "eps": "1e-6"})
    common = ["project", "--model", gpt2_dir, "--data", data_file, "--layers", "c_fc", "--rank", "16",
              "--max-length", "24", "--store-dtype", "float32"]
    for name, state in (("a", "optimizer.pt"), ("b", "moments.safetensors")):
        code, _, err = run_cli([*common, "--out", tmp_path / name, "--optimizer-state", tmp_path / state], capsys)
        assert code == 0, err
    assert torch.equal(load_projections(tmp_path / "a").grads, load_projections(tmp_path / "b").grads)

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"state": {0: Evil()}, "param_groups": []}, protocol=2))
    del tensors["transformer.h.1.mlp.c_fc.weight.exp_avg"]
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 3))])
    other.state[other.param_groups[0]["params"][0]] = {"exp_avg": torch.zeros(3, 3), "exp_avg_sq": torch.zeros(3, 3),
                                                      "step": torch.tensor(1.0)}
    torch.save(other.state_dict(), tmp_path / "other.pt")
    for state, message in (("evil.pt", "only plain tensors"), ("partial.safetensors", "has no Adam moments for"),
                           ("other.pt", "does not match this model"), ("missing.pt", "does not exist")):
        code, out, err = run_cli([*common, "--out", tmp_path / "bad", "--optimizer-state", tmp_path / state], capsys)
        assert code == 2 and message in err, (state, err)
        assert "unpickled" not in out and "Traceback" not in err


def test_a_bfloat16_model_gives_the_float32_reference_directions_within_bf16_error(capsys, tmp_path, gpt2_dir,
                                                                                 data_file):
    trained, _ = load_model(str(gpt2_dir), device="cpu")
    opt = _adam_state(trained, "one")
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    out = tmp_path / "bf16"
    code, _, err = run_cli(["project", "--model", gpt2_dir, "--data", data_file, "--out", out, "--layers", "c_fc",
                            "--rank", "16", "--batch-size", "4", "--max-length", "24", "--dtype", "bfloat16",
                            "--store-dtype", "float32", "--optimizer-state", tmp_path / "optimizer.pt"], capsys)
    assert code == 0, err
    model, tok = load_model(str(gpt2_dir), device="cpu")
    engine = GradProjectionEngine(model, ["c_fc"], rank=16)
    ref = _reference(model, tokenize_records(read_records(data_file), tok, 24), engine, _moments(trained, opt))
    got = load_projections(out).grads
    # Adam's direction saturates where |g| >> sqrt(v), so bf16 rounding of the gradient moves
    # it less than it moves the gradient; the bound is the one naive-check allows 16-bit models
    assert 1e-5 < rel_err(got, ref) <= 2e-2


def test_adam_directions_with_bias_columns(capsys, tmp_path, gpt2_dir, data_file):
    trained, tok = load_model(str(gpt2_dir), device="cpu")
    opt = _adam_state(trained, "one")
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    out = tmp_path / "bias"
    code, _, err = run_cli(["project", "--model", gpt2_dir, "--data", data_file, "--out", out, "--layers", "c_attn",
                            "--rank", "16", "--max-length", "24", "--store-dtype", "float32", "--bias",
                            "--optimizer-state", tmp_path / "optimizer.pt"], capsys)
    assert code == 0, err
    model, _ = load_model(str(gpt2_dir), device="cpu")
    engine = GradProjectionEngine(model, ["c_attn"], rank=16, bias=True)
    ref = _reference(model, tokenize_records(read_records(data_file), tok, 24), engine, _moments(trained, opt),
                     bias=True)
    assert ref.abs().max() > 0
    assert rel_err(load_projections(out).grads, ref) <= 1e-4
