"""Method-specific checks of the softmax variants against their papers' formulas,
written out independently of the library code."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az


def qkv(B=1, H=2, Nq=12, Nk=12, D=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(B, H, Nq, D, generator=g, dtype=dtype), torch.randn(B, H, Nk, D, generator=g, dtype=dtype),
            torch.randn(B, H, Nk, D, generator=g, dtype=dtype))


# ----------------------------------------------------------------------------- sigmoid
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_sigmoid_noncausal_is_paper_formula(impl):
    q, k, v = qkv(Nk=20)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    expected = torch.sigmoid(s - math.log(20)) @ v
    torch.testing.assert_close(az.attention(q, k, v, method="sigmoid", impl=impl), expected)
    expected_b = torch.sigmoid(s + 0.5) @ v
    torch.testing.assert_close(az.attention(q, k, v, method="sigmoid", bias=0.5, impl=impl), expected_b)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_sigmoid_causal_bias_uses_visible_keys(impl):
    q, k, v = qkv()
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    n = torch.arange(1, 13, dtype=torch.float64).view(-1, 1)
    w = torch.sigmoid(s - torch.log(n)) * torch.ones(12, 12).tril()
    torch.testing.assert_close(az.attention(q, k, v, method="sigmoid", causal=True, impl=impl), w @ v)
    # a masked key contributes exactly nothing (no renormalisation)
    mask = torch.ones(12, 12, dtype=torch.bool)
    mask[:, 3] = False
    out = az.attention(q, k, v, method="sigmoid", causal=True, mask=mask, impl=impl)
    torch.testing.assert_close(out, (w * mask) @ v)


def test_sigmoid_row_mass_near_one_at_init():
    """The point of b = -log(n): with small logits every row's total weight is ~1."""
    q, k, v = (t * 0.01 for t in qkv(Nq=4, Nk=4096))
    _, w = az.attention(q, k, v, method="sigmoid", return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), atol=0.01, rtol=0)


# ---------------------------------------------------------------------- clipped softmax
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_clipped_softmax_is_paper_formula(impl):
    q, k, v = qkv(Nk=16)
    q = q * 10  # spiky rows, so some weights clip to exactly 1
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    zeta, gamma = 1.05, -0.03
    expected = torch.clamp((zeta - gamma) * p + gamma, 0, 1) @ v
    got = az.attention(q, k, v, method="clipped_softmax", zeta=zeta, gamma=gamma, impl=impl)
    torch.testing.assert_close(got, expected)
    _, w = az.attention(q, k, v, method="clipped_softmax", zeta=zeta, gamma=gamma, return_weights=True)
    assert (w == 0).any() and (w == 1).any(), "clipping should produce exact zeros and ones here"


def test_clipped_softmax_default_gamma_is_minus_alpha_over_T():
    q, k, v = qkv(Nk=16)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    for alpha in (1.0, 4.0):  # 1 is the default
        gamma = -alpha / 16
        expected = torch.clamp((1 - gamma) * p + gamma, 0, 1) @ v
        opts = {} if alpha == 1.0 else {"alpha": alpha}
        torch.testing.assert_close(az.attention(q, k, v, method="clipped_softmax", **opts), expected)


def test_clipped_softmax_default_keeps_a_gradient_in_near_uniform_rows():
    """With the default alpha = 1 the largest entry of any row survives the clip, so a
    near-uniform row (small logits, as at initialisation) passes gradient to q and k;
    with alpha = 4 the whole row is clipped to zero and q, k get none."""
    q, k, v = (torch.randn(1, 1, 32, 8) * 0.05 for _ in range(3))
    for alpha, alive in ((1.0, True), (4.0, False)):
        qq = q.clone().requires_grad_(True)
        out = az.attention(qq, k, v, method="clipped_softmax", alpha=alpha)
        (dq,) = torch.autograd.grad(out.square().sum(), qq)
        assert bool((dq.abs().sum(-1) > 0).all()) is alive, alpha


def test_clipped_softmax_with_identity_parameters_is_softmax():
    q, k, v = qkv()
    torch.testing.assert_close(az.attention(q, k, v, method="clipped_softmax", gamma=0.0, causal=True),
                               az.attention(q, k, v, causal=True))


# -------------------------------------------------------------------------- selective
@pytest.mark.parametrize("impl", ["reference", "sdpa", "tiled"])
def test_selective_is_temperature_scaled_softmax(impl):
    q, k, v = qkv(Nq=12, Nk=12)
    t = torch.rand(1, 2, 12, 1, dtype=torch.float64) + 0.5
    u = torch.rand(1, 2, 12, 1, dtype=torch.float64) + 0.5
    alpha = 0.3
    n = torch.arange(1, 13, dtype=torch.float64).view(-1, 1)
    tau = t * (1 + alpha * torch.log(n))
    s = tau * (q @ k.transpose(-1, -2)) / math.sqrt(8)
    s = s.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    expected = torch.softmax(s, -1) @ (v * u)
    got = az.attention(q, k, v, method="selective", causal=True, query_temperature=t, value_temperature=u,
                       position_scale=alpha, impl=impl)
    torch.testing.assert_close(got, expected)


def test_selective_defaults_to_softmax_and_module_starts_near_softmax():
    q, k, v = qkv()
    torch.testing.assert_close(az.attention(q, k, v, method="selective"), az.attention(q, k, v))
    module = az.build("selective", heads=2, head_dim=8).double()
    torch.testing.assert_close(module(q, k, v), az.attention(q, k, v), atol=0.02, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "tiled"])
def test_selective_temperature_gradients_match_reference(impl):
    q, k, v = qkv()
    t0 = torch.rand(1, 2, 12, 1, dtype=torch.float64) + 0.5

    def grads(name):
        t = t0.clone().requires_grad_(True)
        out = az.attention(q, k, v, method="selective", causal=True, query_temperature=t, impl=name)
        return torch.autograd.grad(out.square().sum(), t)[0]

    torch.testing.assert_close(grads(impl), grads("reference"))
