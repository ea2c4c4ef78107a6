"""softmax: equality with torch's scaled_dot_product_attention, masks, GQA, lower-right
alignment, fully masked rows, score modifiers, dropout, and the tiled path's memory."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import attnzoo as az
from attnzoo import masks

from helpers import LargestTensor

IMPLS = ["reference", "sdpa", "tiled"]


def torch_sdpa(q, k, v, causal=False, mask=None, kpm=None):
    """Independent truth: F.scaled_dot_product_attention with an explicitly built mask."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    allowed = torch.ones(B, Hq, Nq, Nk, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(Nq, Nk, dtype=torch.bool).tril(diagonal=Nk - Nq)
    if mask is not None:
        allowed &= mask
    if kpm is not None:
        allowed &= kpm[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=k.shape[1] != Hq)
    return out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)


@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 3),
    q_len=st.integers(1, 70),
    kv_len=st.integers(1, 70),
    head_dim=st.sampled_from([8, 15, 32]),
    causal=st.booleans(),
    mask_density=st.sampled_from([None, 0.1, 0.5, 0.9]),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_torch_sdpa_property(batch, kv_heads, groups, q_len, kv_len, head_dim, causal, mask_density, padded,
                                     seed):
    g = torch.Generator().manual_seed(seed)
    Hq = kv_heads * groups
    q = torch.randn(batch, Hq, q_len, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=g)
    mask = None if mask_density is None else torch.rand(batch, Hq, q_len, kv_len, generator=g) < mask_density
    kpm = (torch.rand(batch, kv_len, generator=g) < 0.8) if padded else None
    expected = torch_sdpa(q, k, v, causal, mask, kpm)
    for impl in IMPLS:
        out = az.attention(q, k, v, causal=causal, mask=mask, key_mask=kpm, impl=impl,
                           **({"block_q": 16, "block_k": 16} if impl == "tiled" else {}))
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5, msg=f"impl={impl}")
        assert not torch.isnan(out).any()


@pytest.mark.parametrize("impl", IMPLS)
def test_fully_masked_rows_give_zeros_and_finite_gradients(impl):
    q = torch.randn(1, 2, 6, 8, requires_grad=True)
    k = torch.randn(1, 2, 6, 8, requires_grad=True)
    v = torch.randn(1, 2, 6, 8, requires_grad=True)
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[2] = False  # query 2 sees nothing
    out = az.attention(q, k, v, mask=mask, impl=impl)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    out.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2]))


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_cross_is_lower_right(impl):
    """With Nq < Nk the last query sees every key; with Nq > Nk the first Nq-Nk see none."""
    q, k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    out = az.attention(q, k, v, causal=True, impl=impl)
    torch.testing.assert_close(out[:, :, -1], az.attention(q[:, :, -1:], k, v, impl="reference")[:, :, 0])
    torch.testing.assert_close(out[:, :, 0], az.attention(q[:, :, :1], k[:, :, :3], v[:, :, :3])[:, :, 0])
    q2 = torch.randn(1, 1, 7, 8)
    out2 = az.attention(q2, k, v, causal=True, impl=impl)
    assert torch.equal(out2[:, :, :2], torch.zeros_like(out2[:, :, :2]))


@pytest.mark.parametrize("impl", ["reference", "sdpa", "tiled"])
def test_alibi_matches_explicit_bias(impl):
    B, H, N, D = 1, 4, 33, 16
    q, k, v = torch.randn(B, H, N, D), torch.randn(B, H, N, D), torch.randn(B, H, N, D)
    slopes = torch.tensor([2 ** (-8 / H * (h + 1)) for h in range(H)])  # ALiBi paper, H a power of 2
    i = torch.arange(N)
    bias = -slopes.view(1, H, 1, 1) * (i.view(-1, 1) - i.view(1, -1)).abs()
    bias = bias.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(az.attention(q, k, v, causal=True, alibi=True, impl=impl), expected, atol=1e-5, rtol=1e-5)


def test_alibi_slopes_for_non_power_of_two_heads():
    from attnzoo.kernels.score_mods import alibi_slopes

    s8 = alibi_slopes(8)
    torch.testing.assert_close(s8, torch.tensor([2.0 ** (-i) for i in range(1, 9)]))
    s6 = alibi_slopes(6)  # 4 from the power of two, then odd positions of the 8-head sequence
    torch.testing.assert_close(s6, torch.cat([alibi_slopes(4), alibi_slopes(8)[0::2][:2]]))


@pytest.mark.parametrize("impl", ["reference", "tiled"])
def test_softcap_matches_manual(impl):
    q, k, v = torch.randn(1, 2, 20, 8) * 3, torch.randn(1, 2, 20, 8) * 3, torch.randn(1, 2, 20, 8)
    cap = 5.0
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    expected = torch.softmax(cap * torch.tanh(s / cap), -1) @ v
    torch.testing.assert_close(az.attention(q, k, v, softcap=cap, impl=impl), expected, atol=1e-5, rtol=1e-5)


def test_sdpa_refuses_softcap_and_auto_picks_tiled():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(az.UnsupportedImpl, match="soft-capping.*tiled"):
        az.attention(q, q, q, softcap=5.0, impl="sdpa")
    spec = az.get("softmax")
    call = spec.check(q, q, q, causal=False, softcap=5.0)
    assert spec.select("auto", call).name == "tiled"


def test_dropout_is_unbiased_and_off_at_zero():
    q, k, v = torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16)
    exact = az.attention(q, k, v)
    torch.testing.assert_close(az.attention(q, k, v, dropout_p=0.0, impl="sdpa"), exact)
    for impl in ("sdpa", "reference"):
        samples = torch.stack([az.attention(q, k, v, dropout_p=0.3, impl=impl) for _ in range(3000)])
        assert not torch.allclose(samples[0], exact)  # dropout did something
        torch.testing.assert_close(samples.mean(0), exact, atol=0.06, rtol=0)
    with pytest.raises(az.UnsupportedImpl, match="dropout"):
        az.attention(q, k, v, dropout_p=0.1, impl="tiled")


def test_return_weights_rows_sum_to_one():
    q, k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 11, 8), torch.randn(2, 2, 11, 8)
    out, w = az.attention(q, k, v, return_weights=True, causal=True)
    assert w.shape == (2, 2, 9, 11)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 9))
    torch.testing.assert_close(out, w @ v)
    with pytest.raises(az.UnsupportedImpl, match="weights"):
        az.attention(q, k, v, return_weights=True, impl="sdpa")


def test_mask_mod_in_tiled_equals_dense():
    q, k, v = torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8), torch.randn(1, 2, 50, 8)
    mod = masks.and_masks(masks.causal_mask(), masks.sliding_window_mask(7))
    dense = masks.dense_mask(mod, 1, 2, 50, 50)
    expected = az.attention(q, k, v, mask=dense, impl="reference")
    torch.testing.assert_close(az.attention(q, k, v, mask=mod, impl="tiled", block_q=16, block_k=8), expected)
    torch.testing.assert_close(az.attention(q, k, v, mask=mod, impl="sdpa"), expected)


@pytest.mark.parametrize("method,impl", [("softmax", "tiled"), ("sigmoid", "chunked"), ("clipped_softmax", "chunked")])
def test_blocked_paths_never_allocate_n_by_n(method, impl):
    """Forward and backward of the blocked paths at N = 2048 create no tensor as large as
    one head's N×N score matrix (the reference does, which shows the probe works)."""
    N, D = 2048, 16
    q, k, v = (torch.randn(1, 1, N, D, requires_grad=True) for _ in range(3))
    for fast, expect_small in ((impl, True), ("reference", False)):
        probe = LargestTensor()
        with probe:
            opts = {"block_q": 256} if expect_small else {}
            out = az.attention(q, k, v, method=method, causal=True, impl=fast, **opts)
            out.sum().backward()
        if expect_small:
            assert probe.largest < N * N // 4, f"{fast}: a tensor of {probe.largest} elements (N² = {N * N})"
        else:
            assert probe.largest >= N * N


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_tiled_softcap_gradients_match_reference(causal, padded):
    """Regression: the tiled backward must take tanh's derivative before its in-place exp
    (with no mask and no ALiBi the score tile *is* the capped tensor)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    kpm = torch.ones(1, 40, dtype=torch.bool) if padded else None

    def grads(impl):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = az.attention(qq, kk, vv, softcap=2.0, causal=causal, key_mask=kpm, impl=impl,
                           **({"block_q": 16, "block_k": 16} if impl == "tiled" else {}))
        return [out, *torch.autograd.grad(out.square().sum(), (qq, kk, vv))]

    for a, b in zip(grads("tiled"), grads("reference")):
        torch.testing.assert_close(a, b)
    with pytest.raises(az.AttentionInputError, match="softcap must be a positive finite number"):
        az.attention(q, k, v, softcap=0.0)


def test_learnable_alibi_slopes_get_gradients_and_tiled_refuses_them():
    q, k, v = (torch.randn(1, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    grads = {}
    for impl in ("reference", "sdpa"):
        slopes = torch.tensor([0.5, 0.25], dtype=torch.float64, requires_grad=True)
        az.attention(q, k, v, alibi=slopes, causal=True, impl=impl).square().sum().backward()
        grads[impl] = slopes.grad
    torch.testing.assert_close(grads["sdpa"], grads["reference"])
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64, requires_grad=True)
    with pytest.raises(az.UnsupportedImpl, match="learnable ALiBi"):
        az.attention(q, k, v, alibi=slopes, causal=True, impl="tiled")


def test_auto_raises_when_no_implementation_takes_the_options():
    q = torch.randn(1, 1, 8, 8)
    with pytest.raises(az.UnsupportedImpl, match="no implementation of method 'softmax' can serve"):
        az.attention(q, q, q, block_q=4, return_weights=True)
