import pytest
import torch
from helpers import captured_reference, kron_reference, rel_err, tiny_gpt2, tiny_llama
from torch import nn

from ghostproj import GradProjectionEngine, causal_lm_losses
from ghostproj.data import Example, collate
from ghostproj.jobs.checks import (
    engine_projected_grads,
    module_state,
    non_interference,
)


def make_examples(tokenizer, max_length=48):
    texts = [
        "the orchestra played a symphony while the cat sat on the mat",
        "bake the bread",
        "x",  # one token: no label position
        "stocks fell as the bank raised rates " * 12,  # truncated below
        "the doctor treated the fever and the striker scored",
        "planets orbit the sun",
    ]
    out = []
    for i, t in enumerate(texts):
        ids = tokenizer(t)["input_ids"]
        out.append(Example(i, ids[:max_length], truncated=len(ids) > max_length))
    assert out[3].truncated and out[2].n_label_positions == 0
    # a masked prompt: only the last tokens carry loss
    n = len(out[4].input_ids)
    out[4].loss_mask = [False] * (n - 3) + [True] * 3
    return out


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tokenizer):
    torch.manual_seed(1)
    m = tiny_gpt2(len(tokenizer)) if request.param == "gpt2" else tiny_llama(len(tokenizer))
    # trained-looking weights: random biases so the bias column matters
    with torch.no_grad():
        for mod in m.modules():
            if getattr(mod, "bias", None) is not None and isinstance(mod.bias, torch.Tensor):
                mod.bias.normal_(0, 0.02)
    return m


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "orthonormal"])
def test_engine_matches_kronecker_reference(model, tokenizer, reduction, kind):
    examples = make_examples(tokenizer)
    engine = GradProjectionEngine(model, None, rank=64, projector=kind, seed=3)
    got = engine_projected_grads(model, examples, engine, reduction)
    ref = kron_reference(model, examples, engine, reduction)
    assert ref.abs().max() > 0
    assert rel_err(got, ref) <= 1e-4
    assert torch.all(got[2] == 0)  # no label position -> zero vector


def test_bias_column(tokenizer):
    torch.manual_seed(2)
    m = tiny_gpt2(len(tokenizer))
    with torch.no_grad():
        for mod in m.modules():
            if type(mod).__name__ == "Conv1D":
                mod.bias.normal_(0, 0.1)
    examples = make_examples(tokenizer)
    engine = GradProjectionEngine(m, ["mlp.c_fc", "attn.c_proj"], rank=32, bias=True)
    assert all(info.n_in == 65 for info in engine.layers)
    got = engine_projected_grads(m, examples, engine)
    ref = kron_reference(m, examples, engine)
    assert rel_err(got, ref) <= 1e-4


def test_batch_invariance(model, tokenizer):
    examples = make_examples(tokenizer)
    engine = GradProjectionEngine(model, None, rank=64)
    batched = engine_projected_grads(model, examples, engine)
    for i in (0, 1, 3):
        alone = engine_projected_grads(model, [examples[i]], engine)
        assert rel_err(batched[i:i + 1], alone) <= 1e-5
    # batch order and neighbours do not matter either
    rev = engine_projected_grads(model, examples[::-1], engine)
    assert rel_err(rev.flip(0), batched) <= 1e-5


def test_conv1d_and_linear_give_identical_vectors(tokenizer):
    torch.manual_seed(4)
    gpt = tiny_gpt2(len(tokenizer))
    # the same network with every Conv1D replaced by an equivalent nn.Linear
    import copy

    lin = copy.deepcopy(gpt)
    for name, mod in list(lin.named_modules()):
        if type(mod).__name__ == "Conv1D":
            n_in, n_out = mod.weight.shape
            new = nn.Linear(n_in, n_out)
            with torch.no_grad():
                new.weight.copy_(mod.weight.t())
                new.bias.copy_(mod.bias)
            parent = lin.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], new)
    examples = make_examples(tokenizer)
    e1 = GradProjectionEngine(gpt, ["c_attn", "c_fc"], rank=64, bias=True)
    e2 = GradProjectionEngine(lin, ["c_attn", "c_fc"], rank=64, bias=True)
    assert [i.type for i in e1.layers] == ["Conv1D"] * 4 and [i.type for i in e2.layers] == ["Linear"] * 4
    a = engine_projected_grads(gpt, examples, e1)
    b = engine_projected_grads(lin, examples, e2)
    assert rel_err(a, b) <= 1e-5


def test_projection_mode_computes_no_weight_gradient_and_restores(model, tokenizer):
    examples = make_examples(tokenizer)
    before = module_state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    engine = GradProjectionEngine(model, None, rank=16)
    batch = collate(examples)
    with engine:
        assert not any(p.requires_grad for p in model.parameters())
        losses, _ = causal_lm_losses(model(**batch.model_inputs()).logits, batch.labels)
        losses.sum().backward()
        assert all(p.grad is None for p in model.parameters())
        v = engine.collect()
    assert v.shape == (len(examples), engine.dim) and v.abs().sum() > 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert module_state(model) == before


def test_backward_stops_at_lowest_projected_layer(tokenizer):
    """Projecting only the top block: nothing below it is differentiated."""
    torch.manual_seed(0)
    m = tiny_gpt2(len(tokenizer))
    seen = []
    lower = m.transformer.h[0].mlp.c_fc
    lower.register_full_backward_hook(lambda *a: seen.append("h0"))
    examples = make_examples(tokenizer)
    engine = GradProjectionEngine(m, ["h.1."], rank=16)
    got = engine_projected_grads(m, examples, engine)
    assert seen == [] and got.abs().sum() > 0
    ref = kron_reference(m, examples, engine)
    assert rel_err(got, ref) <= 1e-4


class TwiceMLP(nn.Module):
    """Uses one Linear twice in a forward pass (shared weights)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_shared_module_accumulates_over_calls():
    torch.manual_seed(0)
    net = TwiceMLP()
    x = torch.randn(5, 8)
    y = torch.randint(0, 3, (5,))
    engine = GradProjectionEngine(net, ["shared"], rank=16)
    with engine:
        nn.functional.cross_entropy(net(x), y, reduction="sum").backward()
        got = engine.collect()
    p = engine.projectors["shared"]
    for i in range(5):
        net.zero_grad()
        nn.functional.cross_entropy(net(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        ref = p.p_out.double() @ net.shared.weight.grad.double() @ p.p_in.double().t()
        assert torch.allclose(got[i].double(), ref.reshape(-1), rtol=1e-5, atol=1e-6)


def test_non_interference_in_training_loop(tokenizer):
    torch.manual_seed(0)
    m = tiny_gpt2(len(tokenizer))
    m.config.resid_pdrop = 0.1
    examples = [e for e in make_examples(tokenizer) if e.n_label_positions > 0]
    comps, problems = non_interference(m, [examples[:2], examples[2:]], None, steps=3)
    assert problems == []
    assert all(c.max_abs == 0.0 for c in comps), comps


def test_non_interference_detects_a_leftover_hook(tokenizer, monkeypatch):
    torch.manual_seed(0)
    m = tiny_gpt2(len(tokenizer))
    examples = [e for e in make_examples(tokenizer) if e.n_label_positions > 0]
    monkeypatch.setattr(GradProjectionEngine, "detach", lambda self: None)  # a broken detach
    _, problems = non_interference(m, [examples[:2]], ["c_fc"], steps=1)
    assert problems


def test_engine_errors_are_clear(tokenizer):
    from ghostproj.errors import GhostprojError

    m = tiny_gpt2(len(tokenizer))
    with pytest.raises(GhostprojError, match="matches no module.*transformer.h.0.attn.c_attn"):
        GradProjectionEngine(m, ["nope"])
    with pytest.raises(GhostprojError, match="unsupported layer types"):
        GradProjectionEngine(m, ["ln_1"])
    with pytest.raises(GhostprojError, match="no bias"):
        GradProjectionEngine(tiny_llama(len(tokenizer)), ["q_proj"], bias=True)


@pytest.mark.parametrize("setting", ["autocast", "bf16-weights"])
def test_low_precision_tensors_are_projected_in_float32_slices(tokenizer, monkeypatch, setting):
    import ghostproj.engines.fp32

    monkeypatch.setattr(ghostproj.engines.fp32, "UPCAST_BYTES", 3 * 4 * 128)  # a few rows per slice
    torch.manual_seed(4)
    m = tiny_llama(len(tokenizer))
    if setting == "bf16-weights":
        m = m.to(torch.bfloat16)
    examples = make_examples(tokenizer)
    engine = GradProjectionEngine(m, None, rank=64)
    got, ref, low = captured_reference(m, engine, examples, autocast=setting == "autocast")
    assert low >= 4  # the engine really saw bf16 activations or gradients
    assert got.dtype == torch.float32
    # float32 accumulation of the same bf16 inputs: a bf16 product anywhere would be ~1e-3 off
    assert rel_err(got, ref) <= 2e-5


def test_layers_sharing_an_input_are_projected_together(tokenizer):
    """Llama's q/k/v and gate/up read one tensor each: after the first step the engine
    projects each such input once, against the layers' stacked P_in, with the same result."""
    torch.manual_seed(5)
    m = tiny_llama(len(tokenizer))
    examples = make_examples(tokenizer)
    engine = GradProjectionEngine(m, None, rank=64)
    batch = collate(examples)
    results = []
    with engine:
        for _ in range(2):
            causal_lm_losses(m(**batch.model_inputs()).logits, batch.labels)[0].sum().backward()
            results.append(engine.collect())
    groups = {tuple(g.names) for g in engine.inputs._groups.values()}
    expected = set()
    for i in range(2):
        expected.add(tuple(f"model.layers.{i}.self_attn.{p}_proj" for p in "qkv"))
        expected.add(tuple(f"model.layers.{i}.mlp.{p}_proj" for p in ("gate", "up")))
    assert groups == expected
    assert rel_err(results[1], results[0]) <= 1e-6
    assert rel_err(results[1], kron_reference(m, examples, engine)) <= 1e-4


def _leaf_operators(fn) -> int:
    """Leaf aten operators one call dispatches, views, aliases and bare allocations excluded."""
    from torch.profiler import ProfilerActivity, profile

    skip = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg",
            "aten::to", "aten::_to_copy", "aten::view", "aten::reshape", "aten::_reshape_alias",
            "aten::_unsafe_view", "aten::as_strided", "aten::t", "aten::transpose", "aten::permute", "aten::expand",
            "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::detach", "aten::alias",
            "aten::view_as", "aten::split", "aten::split_with_sizes", "aten::lift_fresh", "aten::contiguous"}
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.name not in skip
               and not any(c.name.startswith("aten::") and c.name not in skip for c in e.cpu_children))


def test_engine_dispatches_at_most_three_operators_per_layer(tokenizer):
    """Host overhead is per operator on a GPU: projecting must add at most one product in
    the forward pass and a product plus a batched contraction in the backward pass."""
    torch.manual_seed(6)
    m = tiny_llama(len(tokenizer))
    ids = torch.randint(0, len(tokenizer), (3, 12))

    def loss():
        return causal_lm_losses(m(input_ids=ids).logits, ids)[0].sum()

    def floor():  # the gradient enters at the first block, no weight gradient anywhere
        for p in m.parameters():
            p.requires_grad_(False)
        h = m.model.embed_tokens(ids).detach().requires_grad_(True)
        handle = m.model.embed_tokens.register_forward_hook(lambda *a: h)
        try:
            loss().backward()
        finally:
            handle.remove()
    engine = GradProjectionEngine(m, None, rank=64)

    def project():
        loss().backward()
        engine.collect()
    base = _leaf_operators(floor)
    with engine:
        extra = (_leaf_operators(project) - base) / len(engine.layers)
    assert 1 <= extra <= 3, extra


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compiled_model_has_no_graph_break_and_same_vectors(tokenizer, arch):
    torch.manual_seed(7)
    m = tiny_gpt2(len(tokenizer)) if arch == "gpt2" else tiny_llama(len(tokenizer))
    ids = torch.randint(0, len(tokenizer), (3, 12))

    def loss(ids):
        return causal_lm_losses(m(input_ids=ids).logits, ids)[0].sum()
    engine = GradProjectionEngine(m, None, rank=64)
    with engine:
        loss(ids).backward()
        eager = engine.collect()
        engine.prepare(3, "cpu")  # result buffers exist before the compiled region
        explained = torch._dynamo.explain(loss)(ids)
        engine.reset()
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        torch._dynamo.reset()
        torch.compile(loss, backend="aot_eager")(ids).backward()
        compiled = engine.collect()
    assert rel_err(compiled, eager) <= 1e-6


@pytest.mark.slow
def test_compiled_batches_of_varying_size_share_a_graph(tokenizer):
    """--token-budget batches differ in size and length: after the first two shapes the
    compiled graph is dynamic in both, and every batch's vectors equal the eager ones."""
    from ghostproj.jobs.pipeline import dynamic_batch_sizes

    torch.manual_seed(8)
    m = tiny_llama(len(tokenizer))
    engine = GradProjectionEngine(m, None, rank=64)

    def loss(ids):
        return causal_lm_losses(m(input_ids=ids).logits, ids)[0].sum()
    compiled = torch.compile(loss, backend="aot_eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with engine, dynamic_batch_sizes(True):
        for b, t in ((3, 12), (4, 9), (5, 7), (2, 15)):
            ids = torch.randint(0, len(tokenizer), (b, t))
            loss(ids).backward()
            eager = engine.collect()
            engine.prepare(b, "cpu")
            compiled(ids).backward()
            assert rel_err(engine.collect(), eager) <= 1e-6
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3


def test_result_buffers_of_only_recent_batch_sizes_are_kept(tokenizer):
    from ghostproj.engines.projection import SINK_SETS_KEPT

    m = tiny_gpt2(len(tokenizer))
    engine = GradProjectionEngine(m, None, rank=16)
    with engine:
        for b in range(1, SINK_SETS_KEPT + 4):
            ids = torch.randint(0, len(tokenizer), (b, 5))
            causal_lm_losses(m(input_ids=ids).logits, ids)[0].sum().backward()
            assert engine.collect().shape == (b, engine.dim)
    assert len(engine._sinks) == SINK_SETS_KEPT


class SharedInputNet(nn.Module):
    """Two Linear layers with biases read one input tensor."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(7, 6), nn.Linear(7, 5), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.head(h + torch.tanh(self.b(x)).sum(-1, keepdim=True))


def test_grouped_layers_with_bias_columns_match_the_reference():
    torch.manual_seed(9)
    net = SharedInputNet()
    x, y = torch.randn(4, 2, 7), torch.randint(0, 3, (4, 2))
    engine = GradProjectionEngine(net, ["re:^[ab]$"], rank=12, bias=True)

    def loss(rows=slice(None)):
        return nn.functional.cross_entropy(net(x[rows]).reshape(-1, 3), y[rows].reshape(-1), reduction="sum")
    with engine:
        steps = []
        for _ in range(2):
            loss().backward()
            steps.append(engine.collect())
        assert [g.names for g in set(engine.inputs._groups.values())] == [["a", "b"]]
    for p in net.parameters():
        p.requires_grad_(True)
    ref = torch.zeros(4, engine.dim, dtype=torch.float64)
    for i in range(4):
        net.zero_grad()
        loss(slice(i, i + 1)).backward()
        for info in engine.layers:
            m = getattr(net, info.name)
            g = torch.cat([m.weight.grad, m.bias.grad[:, None]], dim=1).double()
            p = engine.projectors[info.name]
            ref[i, info.offset:info.offset + info.size] = (p.p_out.double() @ g @ p.p_in.double().t()).reshape(-1)
    for got in steps:
        assert rel_err(got, ref) <= 1e-5


def test_a_step_begun_for_one_batch_size_refuses_another(tokenizer):
    m = tiny_gpt2(len(tokenizer))
    engine = GradProjectionEngine(m, None, rank=16)
    with engine:
        engine.prepare(3, "cpu")
        with pytest.raises(RuntimeError, match="batch size"):
            m(input_ids=torch.randint(0, len(tokenizer), (2, 5)))
