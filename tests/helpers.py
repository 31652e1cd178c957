"""Tiny models, a tokenizer trained in milliseconds, and an independent naive reference."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ghostproj.cli import main
from ghostproj.data import collate
from ghostproj.engines.losses import causal_lm_losses

CORPUS = [
    "the cat sat on the mat", "stocks fell as the bank raised rates", "the orchestra played a symphony",
    "compile the code and run the tests", "the doctor treated the fever", "planets orbit the sun",
    "bake the bread for forty minutes", "the striker scored a goal in the last minute",
] * 20


WORDS = "the cat sat on the mat bake the bread planets orbit the sun doctor treated fever".split()


def word_rows(n, step, shortest, spread):
    """``n`` JSONL rows of ``shortest`` to ``shortest + spread - 1`` words cut from one word
    cycle: mixed lengths (so batches pad), a handful of tokens each."""
    return [{"text": " ".join(WORDS[(i * step + j) % len(WORDS)] for j in range(shortest + i % spread))}
            for i in range(n)]


def small_run_args(model_dir, data, out, *extra, batch_size=4):
    """`project` of a small corpus into 8-row shards at rank 16: a run of several shards."""
    return ["project", "--model", model_dir, "--data", data, "--out", out, "--rank", "16", "--shard-size", "8",
            "--batch-size", str(batch_size), "--max-length", "24", *extra]


def train_and_query(d, model_dir, corpus, project_args):
    """A complete training run and a query run projected --like it, in directory ``d``."""
    train, query = d / "train.st", d / "query.st"
    assert run_cli(project_args(model_dir, corpus, train))[0] == 0
    assert run_cli(["project", "--model", model_dir, "--data", corpus, "--out", query, "--like", train,
                    "--max-length", "24", "--shard-size", "8"])[0] == 0
    return train, query


def build_tokenizer():
    from ghostproj.jobs.demo import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=300)


def tiny_gpt2(vocab_size, n_positions=64):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=64, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(vocab_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def kron_reference(model, examples, engine, reduction="mean"):
    """Each example alone, full autograd, the per-example gradient flattened in (n_out, n_in)
    orientation and multiplied by the explicit dense Kronecker matrix kron(P_out, P_in).
    Written without the library's loss helper or reference code."""
    modules = dict(model.named_modules())
    out = torch.zeros(len(examples), engine.dim, dtype=torch.float64)
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        for r, ex in enumerate(examples):
            ids = torch.tensor([ex.input_ids])
            if ids.shape[1] < 2:
                continue
            labels = ids[0, 1:].clone()
            if ex.loss_mask is not None:
                labels[~torch.tensor(ex.loss_mask[1:])] = -100
            if (labels != -100).sum() == 0:
                continue
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids).logits[0, :-1].float()
            loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction=reduction)
            loss.backward()
            for info in engine.layers:
                m = modules[info.name]
                w = m.weight.grad
                # Conv1D stores (n_in, n_out); an embedding is a Linear on one-hot inputs: (V, d)
                g = w.t() if type(m).__name__ in ("Conv1D", "Embedding") else w
                if engine.bias and type(m).__name__ != "Embedding":
                    g = torch.cat([g, m.bias.grad[:, None]], dim=1)
                p = engine.projectors[info.name]
                dense = torch.kron(p.p_out.double(), p.p_in.double())  # (k_out*k_in, n_out*n_in)
                out[r, info.offset:info.offset + info.size] = dense @ g.double().reshape(-1)
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return out


def rel_err(a, b):
    a, b = a.double(), b.double()
    num = (a - b).norm(dim=1)
    den = b.norm(dim=1)
    return torch.where(den > 0, num / den.clamp(min=1e-300), num).max().item()


def run_cli(args, capsys=None):
    """(exit code, stdout, stderr) of the CLI run in-process."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if capsys is not None:
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return code, "", ""


def fails(capsys, *args, match, code=2):
    """Run the CLI and check it refused: exit ``code``, ``match`` in one sentence on stderr."""
    got, out, err = run_cli(args, capsys)
    assert got == code and match in err and "Traceback" not in err, (got, err)
    assert len(err.strip().splitlines()) <= 3, err  # one sentence (rich may fold it)
    return err


def captured_reference(model, engine, examples, autocast, device="cpu", round_matrices=False):
    """Float64 sum_t (P_out delta_t)(P_in x_t)^T from the very inputs and output gradients
    (in whatever precision they arrive) that one batched backward pass produced. With
    ``round_matrices``, a matrix meeting a low-precision tensor is first rounded to that
    tensor's dtype, as a GPU's tensor-core product sees it."""
    modules = dict(model.named_modules())
    seen, handles = {}, []
    engine.attach()  # first, so the capture hooks below see the output the engine hooks
    for info in engine.layers:
        def fwd(mod, args, out, name=info.name):
            seen[name] = [args[0].detach()]
            out.register_hook(lambda g: seen[name].append(g))
        handles.append(modules[info.name].register_forward_hook(fwd))
    try:
        batch = collate(examples, 0).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(**batch.model_inputs()).logits
            losses, _ = causal_lm_losses(logits, batch.labels, "mean")
            losses.sum().backward()
            got = engine.collect().cpu()
    finally:
        for h in handles:
            h.remove()
        engine.detach()
    ref = torch.zeros(len(examples), engine.dim, dtype=torch.float64)
    low = 0
    for info in engine.layers:
        x, g = (t.cpu() for t in seen[info.name])
        low += x.dtype != torch.float32 or g.dtype != torch.float32
        p = engine.projectors[info.name]
        p_in = p.p_in.to(x.dtype) if round_matrices and x.dtype != torch.float32 else p.p_in
        p_out = p.p_out.to(g.dtype) if round_matrices and g.dtype != torch.float32 else p.p_out
        xp = x.double() @ p_in.double().t()
        gp = g.double() @ p_out.double().t()
        ref[:, info.offset:info.offset + info.size] = torch.einsum("bso,bsi->boi", gp, xp).reshape(len(examples), -1)
    return got, ref, low


TORCHRUN_MISSING = shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists()


def needs_torchrun(test):
    """A test that starts torchrun processes: slow (several seconds of process start-up),
    and skipped where torchrun is not installed."""
    return pytest.mark.slow(pytest.mark.skipif(TORCHRUN_MISSING, reason="torchrun is not installed")(test))


def torchrun(n, args, timeout=300, popen=False, script=None):
    """``ghostproj ARGS`` (or ``script ARGS``) on ``n`` local ranks."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [launcher, "--nproc-per-node", str(n), "--master-addr", "127.0.0.1", "--master-port", str(port),
           *(["-m", "ghostproj"] if script is None else [str(script)]), *map(str, args)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if script is not None:  # the script imports the tests' helpers
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def tiny_qwen3_moe(vocab_size, experts=4, top_k=2):
    """A mixture-of-experts model: fused 3-D expert weights and a bare-parameter router."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         num_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return Qwen3MoeForCausalLM(cfg).eval()


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process below it: torchrun starts its workers in sessions
    of their own, so killing the launcher's process group leaves them running (and
    finishing the run a test meant to interrupt)."""
    import signal

    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_torchrun_after_shards(args, out, shards: int, ranks: int = 2) -> None:
    """Start ``ghostproj ARGS`` on ``ranks`` ranks and kill every process as soon as rank 0
    has recorded ``shards`` shards in its manifest; the run must not have finished."""
    import time

    proc = torchrun(ranks, args, popen=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads((Path(out) / "manifest-r000.json").read_text())["shards"]) >= shards:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    kill_tree(proc.pid)
    proc.wait()
    assert not (Path(out) / "manifest.json").exists(), "the run finished before it could be killed"
