"""One harness for every supported layer type (ghostproj.engines.layer_types): the layer
alone under a fixed nonlinear head, both engines against per-example autograd."""

import zlib

import pytest
import torch
from helpers import rel_err
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


def _conv1d():
    from transformers.pytorch_utils import Conv1D

    return Conv1D(N_OUT, N_IN)


CASES = {  # layer type name -> (module factory, takes token ids)
    "Linear": (lambda: nn.Linear(N_IN, N_OUT), False),
    "Conv1D": (_conv1d, False),
    "Embedding": (lambda: nn.Embedding(VOCAB, N_OUT, padding_idx=0), True),
    "LayerNorm": (lambda: nn.LayerNorm(N_IN), False),
    "RMSNorm": (lambda: LlamaStyleRMSNorm(N_IN), False),
}


class Probe(nn.Module):
    """The layer, then a fixed head: l_i = sum_t sin(y_t . v)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.register_buffer("v", torch.randn(N_OUT if not isinstance(layer, (nn.LayerNorm, LlamaStyleRMSNorm))
                                              else N_IN))

    def forward(self, x):
        return torch.sin(self.layer(x) @ self.v).sum(dim=1)  # [N] per-example losses


def probe_and_inputs(name, n):
    torch.manual_seed(zlib.crc32(name.encode()))
    make, ids = CASES[name]
    net = Probe(make())
    with torch.no_grad():
        for p in net.layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randint(0, VOCAB, (n, SEQ)) if ids else torch.randn(n, SEQ, N_IN)
    if ids:
        x[0, -1] = 0  # a padding token: its row never gets a gradient
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


def test_every_layer_type_is_covered_by_the_harness():
    assert {cls.type_name for cls in LAYER_TYPES} == set(CASES)
    for name, (make, _) in CASES.items():
        assert layer_type(make()).type_name == name


@pytest.mark.parametrize("name", [cls.type_name for cls in LAYER_TYPES if cls.projectable])
@pytest.mark.parametrize("freeze", [True, False])
def test_projection_of_each_layer_type(name, freeze):
    net, x = probe_and_inputs(name, 4)
    engine = GradProjectionEngine(net, ["layer"], rank=12, freeze_weights=freeze)
    with engine:
        net(x).sum().backward()
        got = engine.collect()
    cls = layer_type(net.layer)
    weight = per_example_grads(net, x)["weight"]
    p = engine.projectors["layer"]
    ref = torch.stack([(p.p_out @ (g.t() if cls.stores_transposed else g) @ p.p_in.t()).reshape(-1) for g in weight])
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
