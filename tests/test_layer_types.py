"""One harness for every supported layer type (ghostproj.engines.layer_types): the layer
alone under a fixed nonlinear head, both engines against per-example autograd."""

import zlib

import pytest
import torch
from helpers import rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ghostproj import GradDotProdEngine, GradProjectionEngine
from ghostproj.engines.layer_types import LAYER_TYPES, layer_type


def whole_rel_err(got, ref):
    """|got - ref| / |ref| over the whole tensor: a row near zero is not held to a relative
    precision that float32 cancellation cannot give it."""
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()

N_IN, N_OUT, SEQ, VOCAB = 6, 5, 4, 11


class LlamaStyleRMSNorm(nn.Module):
    """The shape HF models give their RMSNorm classes."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def _conv1d(n_in, n_out):
    from transformers.pytorch_utils import Conv1D

    return Conv1D(n_out, n_in)


def _as_out_by_in(grad: torch.Tensor) -> torch.Tensor:
    return grad


def _transposed(grad: torch.Tensor) -> torch.Tensor:
    return grad.t()


# layer type name -> (module factory (n_in, n_out), takes token ids, how its weight's gradient
# becomes G [n_out, n_in] (written here, not read from the code under test))
CASES = {
    "Linear": (lambda n_in, n_out: nn.Linear(n_in, n_out), False, _as_out_by_in),
    "Conv1D": (_conv1d, False, _transposed),  # HF stores [n_in, n_out]
    "Embedding": (lambda vocab, n_out: nn.Embedding(vocab, n_out, padding_idx=0), True, _transposed),
    "LayerNorm": (lambda n_in, n_out: nn.LayerNorm(n_in), False, None),
    "RMSNorm": (lambda n_in, n_out: LlamaStyleRMSNorm(n_in), False, None),
}


class Probe(nn.Module):
    """The layer, then a fixed head: l_i = sum_t sin(y_t . v) (or sin(y . v) for 2-D inputs)."""

    def __init__(self, layer, width):
        super().__init__()
        self.layer = layer
        self.register_buffer("v", torch.randn(width))

    def forward(self, x):
        y = torch.sin(self.layer(x) @ self.v)
        return y.sum(dim=1) if y.dim() == 2 else y  # [N] per-example losses


def probe_and_inputs(name, n, seq=SEQ, n_in=N_IN, n_out=N_OUT, flat=False):
    """The probe around a fresh layer of type ``name`` and inputs for it: [n, seq, n_in]
    (or [n, n_in] when ``flat``), token ids for an embedding (n_in is then its vocabulary)."""
    torch.manual_seed(zlib.crc32(f"{name}-{n}-{seq}-{n_in}-{n_out}-{flat}".encode()))
    make, ids, _ = CASES[name]
    layer = make(VOCAB if ids and n_in == N_IN else n_in, n_out)
    norm = isinstance(layer, (nn.LayerNorm, LlamaStyleRMSNorm))
    net = Probe(layer, n_in if norm else n_out)
    with torch.no_grad():
        for p in net.layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    vocab = layer.num_embeddings if ids else None
    if ids:
        x = torch.randint(0, vocab, (n, seq))
        x[0, -1] = 0  # a padding token: its row never gets a gradient
    else:
        x = torch.randn(n, n_in) if flat else torch.randn(n, seq, n_in)
    return net, x


def per_example_grads(net, x):
    """{parameter name: [N, *shape]} by autograd on each example alone."""
    out = {n: [] for n, _ in net.layer.named_parameters()}
    for i in range(x.shape[0]):
        net.zero_grad()
        net(x[i:i + 1]).sum().backward()
        for n, p in net.layer.named_parameters():
            out[n].append(p.grad.clone())
    net.zero_grad(set_to_none=True)
    return {n: torch.stack(g) for n, g in out.items()}


def projected_reference(name, net, x, projector):
    """P_out G_n P_in^T of each example, G_n from its own autograd weight gradient."""
    orient = CASES[name][2]
    weight = per_example_grads(net, x)["weight"]
    return torch.stack([(projector.p_out @ orient(g) @ projector.p_in.t()).reshape(-1) for g in weight])


# Types whose module is several layers, called with inputs of its own, have their own file.
ELSEWHERE = {"Experts": "test_moe.py", "Router": "test_moe.py"}


def test_every_layer_type_is_covered_by_the_harness():
    assert {cls.type_name for cls in LAYER_TYPES} == set(CASES) | set(ELSEWHERE)
    for name, (make, _, _) in CASES.items():
        assert layer_type(make(N_IN, N_OUT)).type_name == name


@pytest.mark.parametrize("name", [cls.type_name for cls in LAYER_TYPES if cls.projectable and cls.type_name in CASES])
@pytest.mark.parametrize("freeze", [True, False])
def test_projection_of_each_layer_type(name, freeze):
    net, x = probe_and_inputs(name, 4)
    engine = GradProjectionEngine(net, ["layer"], rank=12, freeze_weights=freeze)
    with engine:
        net(x).sum().backward()
        got = engine.collect()
    ref = projected_reference(name, net, x, engine.projectors["layer"])
    assert ref.abs().max() > 0
    assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("per_query", [False, True])
@pytest.mark.parametrize("method", ["materialize", "ghost"])  # ghost: the token-Gram form, where a type has one
def test_in_run_dot_products_of_each_layer_type(name, per_query, method):
    b, m = 3, 2
    net, x = probe_and_inputs(name, b + m)
    pe = per_example_grads(net, x)
    with GradDotProdEngine(net, val_batch_size=m, per_query=per_query, loss_reduction="sum",
                           method=method) as engine:
        net(x).sum().backward()
        result = engine.collect()
        train_grads = {n: p.grad.clone() for n, p in net.layer.named_parameters()}
    for n, g in pe.items():
        flat = g.reshape(b + m, -1)
        val = flat[b:] if per_query else flat[b:].sum(0, keepdim=True)
        ref = flat[:b] @ val.t()
        got = result.per_param[f"layer.{n}"]
        assert whole_rel_err(got.reshape(b, -1), ref) <= 1e-5, n
        assert whole_rel_err(train_grads[n], g[:b].mean(0)) <= 1e-5, n


PROJECTABLE = [cls.type_name for cls in LAYER_TYPES if cls.projectable and cls.type_name in CASES]
shapes = st.fixed_dictionaries({"n": st.integers(1, 4), "seq": st.integers(1, 5), "n_in": st.integers(1, 7),
                                "n_out": st.integers(1, 7), "flat": st.booleans(), "rank": st.integers(1, 20)})


@settings(max_examples=30, deadline=None, derandomize=True)
@given(name=st.sampled_from(PROJECTABLE), shape=shapes)
def test_projection_over_generated_shapes(name, shape):
    """Batch, sequence, widths, 2-D and 3-D inputs drawn, the orientation written per case."""
    flat = shape["flat"] and not CASES[name][1]  # token ids come as [batch, sequence]
    n_in = shape["n_in"] + 1 if CASES[name][1] else shape["n_in"]  # an embedding needs a token beyond padding
    net, x = probe_and_inputs(name, shape["n"], shape["seq"], n_in, shape["n_out"], flat)
    engine = GradProjectionEngine(net, ["layer"], rank=shape["rank"])
    with engine:
        net(x).sum().backward()
        got = engine.collect()
    ref = projected_reference(name, net, x, engine.projectors["layer"])
    assert got.shape == ref.shape
    assert (got.double() - ref.double()).norm() <= 1e-5 * max(ref.double().norm(), 1e-6)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(name=st.sampled_from(list(CASES)), shape=shapes, m=st.integers(1, 3))
def test_in_run_dot_products_over_generated_shapes(name, shape, m):
    flat = shape["flat"] and not CASES[name][1]
    n_in = shape["n_in"] + 1 if CASES[name][1] or CASES[name][2] is None else shape["n_in"]  # a 1-wide norm is 0
    b = shape["n"]
    net, x = probe_and_inputs(name, b + m, shape["seq"], n_in, shape["n_out"], flat)
    pe = per_example_grads(net, x)
    with GradDotProdEngine(net, val_batch_size=m, loss_reduction="sum") as engine:
        net(x).sum().backward()
        result = engine.collect()
    for n, g in pe.items():
        flat_g = g.reshape(b + m, -1).double()
        val = flat_g[b:].sum(0)
        ref = flat_g[:b] @ val
        got = result.per_param[f"layer.{n}"].double().reshape(-1)
        scale = flat_g[:b].norm(dim=1) * val.norm()  # |<g_i, g_val>| <= |g_i| |g_val|: float32's yardstick
        assert ((got - ref).abs() <= 1e-5 * scale + 1e-12).all(), n


class PlainDense(nn.Module):
    """A module of one's own computing x W^T, as custom model code often does."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight)


def test_a_new_layer_type_is_one_class_and_one_case():
    """Defining the class registers the type: both engines cover the new module with no
    other change (the harness's own case is the only other addition)."""
    from ghostproj.engines import layer_types

    class PlainDenseLayer(layer_types.LinearLayer):
        type_name = "PlainDense"
        has_bias_column = False

        @staticmethod
        def matches(module):
            return isinstance(module, PlainDense)

        @staticmethod
        def dims(module):
            return module.weight.shape[1], module.weight.shape[0]

        @staticmethod
        def fusable(module):
            return False

    CASES["PlainDense"] = (PlainDense, False, _as_out_by_in)
    try:
        assert layer_type(PlainDense(3, 2)) is PlainDenseLayer
        test_projection_of_each_layer_type("PlainDense", True)
        test_in_run_dot_products_of_each_layer_type("PlainDense", False, "materialize")
        test_in_run_dot_products_of_each_layer_type("PlainDense", True, "ghost")
    finally:
        del CASES["PlainDense"]
        layer_types.remove_layer_type(PlainDenseLayer)
