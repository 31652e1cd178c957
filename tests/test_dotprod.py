import copy

import pytest
import torch
from helpers import tiny_gpt2, tiny_llama
from torch import nn

from ghostproj.data import Example, collate
from ghostproj.engines.dotprod import GradDotProdEngine
from ghostproj.engines.losses import causal_lm_losses
from ghostproj.errors import GhostprojError


def full_grads(model, loss_fn, n):
    """Per-example full gradients (each example alone, plain autograd), flattened per parameter."""
    params = [p for p in model.parameters()]
    out = []
    for k in range(n):
        model.zero_grad(set_to_none=True)
        loss_fn(k).backward()
        out.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params])
    model.zero_grad(set_to_none=True)
    return out


def reference(model, loss_fn, b, m):
    grads = full_grads(model, loss_fn, b + m)
    n_params = len(grads[0])
    per_query = torch.zeros(b, m, dtype=torch.float64)
    for p in range(n_params):
        for i in range(b):
            for j in range(m):
                per_query[i, j] += (grads[i][p].double() * grads[b + j][p].double()).sum()
    train_grad = [sum(grads[i][p] for i in range(b)) / b for p in range(n_params)]
    return per_query, train_grad


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def lm_batch(tokenizer, texts):
    return collate([Example(i, tokenizer(t)["input_ids"]) for i, t in enumerate(texts)])


TRAIN = ["the cat sat on the mat", "bake the bread for forty minutes please", "x y", "planets orbit the sun"]
VAL = ["the doctor treated the fever", "stocks fell sharply as the bank raised rates again", "the cat"]


@pytest.mark.parametrize("per_query", [False, True])
@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
def test_mlp_matches_naive(per_query, method):
    torch.manual_seed(0)
    net = MLP()
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    b, m = 4, 3
    ref_pq, ref_grad = reference(net, lambda k: nn.functional.cross_entropy(net(x[k:k + 1]), y[k:k + 1]), b, m)
    with GradDotProdEngine(net, val_batch_size=m, per_query=per_query, method=method) as engine:
        nn.functional.cross_entropy(net(x), y, reduction="sum").backward()
        res = engine.collect()
    expect = ref_pq if per_query else ref_pq.sum(1)
    assert (res.total.double() - expect).abs().max() <= 1e-4 * expect.abs().max()
    for p, g in zip(net.parameters(), ref_grad):
        assert torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7)


def lm_case(kind, tokenizer):
    torch.manual_seed(0)
    model = tiny_gpt2(len(tokenizer)) if kind == "gpt2" else tiny_llama(len(tokenizer))
    model.eval()  # dropout off so the per-example reference sees the same network
    batch = lm_batch(tokenizer, TRAIN + VAL)
    ex = [Example(i, tokenizer(t)["input_ids"]) for i, t in enumerate(TRAIN + VAL)]

    def loss_k(k):
        one = collate([ex[k]])
        return causal_lm_losses(model(input_ids=one.input_ids).logits, one.labels, "mean")[0].sum()
    return model, batch, loss_k


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("per_query", [False, True])
def test_language_models_match_naive(tokenizer, kind, per_query):
    model, batch, loss_k = lm_case(kind, tokenizer)
    b, m = len(TRAIN), len(VAL)
    ref_pq, ref_grad = reference(model, loss_k, b, m)
    with GradDotProdEngine(model, val_batch_size=m, per_query=per_query) as engine:
        # no position_ids: GPT-2 then looks up positions as [1, T] and broadcasts them
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        losses, _ = causal_lm_losses(logits, batch.labels, "mean")
        losses.sum().backward()
        res = engine.collect()
    expect = ref_pq if per_query else ref_pq.sum(1)
    assert (res.total.double() - expect).abs().max() <= 1e-4 * expect.abs().max()
    for p, g in zip(model.parameters(), ref_grad):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-7)
    if kind == "gpt2":  # the tied wte / lm_head parameter is one entry, cross terms included
        assert "transformer.wte.weight" in res.per_param and "lm_head.weight" not in res.per_param
        assert set(res.paths.values()) <= {"ghost", "materialize"}


def test_mean_reduction_and_param_attributes(tokenizer):
    model, batch, loss_k = lm_case("gpt2", tokenizer)
    b, m = len(TRAIN), len(VAL)
    ref_pq, _ = reference(model, loss_k, b, m)
    engine = GradDotProdEngine(model, val_batch_size=m, loss_reduction="mean")
    engine.attach()
    losses, _ = causal_lm_losses(model(**batch.model_inputs()).logits, batch.labels, "mean")
    losses.mean().backward()
    per_param = {n: p.grad_dot_prod.clone() for n, p in model.named_parameters() if hasattr(p, "grad_dot_prod")}
    assert len(per_param) == len(list(model.parameters()))
    total = engine.aggregate()
    assert torch.allclose(total, sum(per_param.values()))
    assert not any(hasattr(p, "grad_dot_prod") for p in model.parameters())
    assert (total.double() - ref_pq.sum(1)).abs().max() <= 1e-4 * ref_pq.sum(1).abs().max()
    engine.prepare_gradients()
    engine.clear_gradients()
    engine.detach()
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_trajectory_equals_training_on_training_part(opt_name):
    torch.manual_seed(0)
    net = MLP()
    plain = copy.deepcopy(net)
    make = (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)) if opt_name == "sgd" else \
        (lambda ps: torch.optim.AdamW(ps, lr=0.01))
    opt, opt_plain = make(net.parameters()), make(plain.parameters())
    x_val, y_val = torch.randn(3, 6), torch.randint(0, 3, (3,))
    engine = GradDotProdEngine(module=net, val_batch_size=3)
    engine.attach()
    for _ in range(5):
        x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
        loss = nn.functional.cross_entropy(net(torch.cat([x, x_val])), torch.cat([y, y_val]), reduction="sum")
        loss.backward()
        engine.aggregate()
        engine.prepare_gradients()
        opt.step()
        engine.clear_gradients()
        opt_plain.zero_grad()
        nn.functional.cross_entropy(plain(x), y).backward()  # mean over the training part
        opt_plain.step()
    engine.detach()
    for p, q in zip(net.parameters(), plain.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_ghost_choice_follows_sequence_length():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(32, 32))
    for t, expect in ((2, "ghost"), (64, "materialize")):
        with GradDotProdEngine(lin, val_batch_size=2) as engine:
            lin(torch.randn(6, t, 32)).pow(2).sum().backward()
            assert engine.collect().paths["0"] == expect


def test_bad_inputs():
    net = MLP()
    with pytest.raises(GhostprojError, match="val_batch_size must be at least 1"):
        GradDotProdEngine(net, val_batch_size=0)
    with GradDotProdEngine(net, val_batch_size=4) as engine:
        with pytest.raises(GhostprojError, match="at least one training example"):
            net(torch.randn(4, 6))

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.fc(x) * self.scale
    with pytest.raises(GhostprojError, match="scale"):
        GradDotProdEngine(Odd(), val_batch_size=1)
    engine = GradDotProdEngine(Odd(), val_batch_size=1, uncovered="freeze")
    assert engine.uncovered == ["scale"]
    with pytest.raises(GhostprojError, match="no trainable supported layer"):
        GradDotProdEngine(nn.Sequential(nn.ReLU()), val_batch_size=1)


@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_backward_inside_autocast_still_accumulates_in_float32(method):
    """The whole step inside a bf16 autocast region: the engine's own products must not be
    pushed down to bf16. Checked against float64 arithmetic on the very (bf16) inputs and
    output gradients the pass produced; a bf16 product would be ~1e-3 off."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 48), nn.ReLU(), nn.Linear(48, 40), nn.ReLU(), nn.Linear(40, 3))
    x, y = torch.randn(9, 5, 6), torch.randint(0, 3, (9, 5))
    b, m = 6, 3
    seen, handles = {}, []
    engine = GradDotProdEngine(net, val_batch_size=m, method=method).attach()
    for name in ("0", "2", "4"):
        def fwd(mod, args, out, name=name):
            seen[name] = [args[0].detach()]
            out.register_hook(lambda g: seen[name].append(g))
        handles.append(net.get_submodule(name).register_forward_hook(fwd))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
        nn.functional.cross_entropy(out.float().reshape(-1, 3), y.reshape(-1), reduction="sum").backward()
        res = engine.collect()
    engine.detach()
    for h in handles:
        h.remove()
    assert seen["2"][0].dtype == torch.bfloat16 and seen["4"][1].dtype == torch.bfloat16
    expect = torch.zeros(b, dtype=torch.float64)
    for xs, gs in seen.values():
        gw = torch.einsum("nso,nsi->noi", gs.double(), xs.double())  # per-example weight gradients
        gb = gs.double().sum(1)
        expect += (gw[:b] * gw[b:].sum(0)).sum((1, 2)) + gb[:b] @ gb[b:].sum(0)
    assert res.total.dtype == torch.float32
    assert (res.total.double() - expect).abs().max() <= 1e-5 * expect.abs().max()
