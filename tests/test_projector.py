import hashlib
import math

import pytest
import torch

from ghostproj.engines.projector import choose_ranks, make_matrix
from ghostproj.errors import GhostprojError


def design_seed(seed, name, side):
    # DESIGN.md §1, written out again on purpose
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}:{side}".encode()).digest()[:8], "little") & (2**63 - 1)


def test_generation_rule_is_the_documented_one():
    name = "transformer.h.0.mlp.c_fc"
    g = torch.Generator("cpu").manual_seed(design_seed(7, name, "in"))
    expect = torch.randn(16, 64, generator=g, dtype=torch.float32) / math.sqrt(16)
    assert torch.equal(make_matrix("gaussian", 16, 64, 7, name, "in"), expect)
    g = torch.Generator("cpu").manual_seed(design_seed(7, name, "out"))
    expect = (torch.randint(0, 2, (8, 32), generator=g) * 2 - 1).float() / math.sqrt(8)
    assert torch.equal(make_matrix("rademacher", 8, 32, 7, name, "out"), expect)
    g = torch.Generator("cpu").manual_seed(design_seed(7, name, "in"))
    q = torch.linalg.qr(torch.randn(64, 16, generator=g, dtype=torch.float64)).Q
    assert torch.equal(make_matrix("orthonormal", 16, 64, 7, name, "in"), (q.T * math.sqrt(64 / 16)).float())


def test_matrices_differ_by_layer_side_and_seed():
    a = make_matrix("gaussian", 4, 10, 0, "a", "in")
    assert not torch.equal(a, make_matrix("gaussian", 4, 10, 0, "b", "in"))
    assert not torch.equal(a, make_matrix("gaussian", 4, 10, 0, "a", "out"))
    assert not torch.equal(a, make_matrix("gaussian", 4, 10, 1, "a", "in"))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher", "orthonormal"])
def test_unbiased_inner_products(kind):
    # E[P^T P] = I: averaged over many seeds the projected inner product approaches the true one
    n, k = 24, 6
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, dtype=torch.float64, generator=g), torch.randn(n, dtype=torch.float64, generator=g)
    est = []
    for s in range(3000):
        p = make_matrix(kind, k, n, s, "l", "in").double()
        est.append(float((p @ x) @ (p @ y)))
    mean = sum(est) / len(est)
    assert abs(mean - float(x @ y)) < 0.1 * float(x.norm() * y.norm())
    if kind == "orthonormal":
        p = make_matrix(kind, k, n, 0, "l", "in").double()
        assert torch.allclose(p @ p.T, torch.eye(k, dtype=torch.float64) * n / k, atol=1e-5)


def test_rank_rule():
    assert choose_ranks(256, 64, 192) == (16, 16)
    assert choose_ranks(256, 4, 1000) == (4, 64)  # a narrow input hands its budget to the output
    assert choose_ranks(256, 1000, 4) == (64, 4)
    assert choose_ranks(10, 3, 3) == (3, 3)
    for r, n_in, n_out, lo in [(256, 64, 64, 1), (100, 7, 300, 2), (17, 5, 5, 1), (64, 1000, 1000, 8)]:
        k_in, k_out = choose_ranks(r, n_in, n_out, lo)
        assert k_in * k_out <= r and 1 <= k_in <= n_in and 1 <= k_out <= n_out
        assert k_in >= min(lo, n_in) and k_out >= min(lo, n_out)
    with pytest.raises(GhostprojError):
        choose_ranks(10, 64, 64, rank_min=8)


def test_split_ranks_keeps_rank_min_when_one_side_is_fixed():
    from ghostproj.engines.projector import split_ranks

    assert split_ranks(256, 64, 64, rank_min=8, rank_out=64) == (8, 64)  # the free side: at least --rank-min
    assert split_ranks(256, 4, 64, rank_min=8, rank_out=64) == (4, 64)  # ... or its whole dimension
    assert split_ranks(256, 64, 64, rank_in=16) == (16, 16)
