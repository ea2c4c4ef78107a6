"""Neighborhood attention (NATTEN): the mask against a brute-force construction, the
shifted-window acceptance property, gather vs reference, decoding, and no N×N."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo import decoding
from attnzoo.errors import AttentionInputError, UnsupportedPattern
from attnzoo.masks import (
    block_layout,
    block_mask,
    dense_mask,
    flex_available,
    neighborhood_mask,
)

from helpers import LargestTensor

# ------------------------------------------------------------------ brute force (loops)


def brute_axis(n: int, k: int, d: int) -> list:
    """For each position of an axis of length n: the set of its neighbours, written from
    NATTEN's window-start rule on each dilated sub-sequence, with Python loops."""
    k = min(k, n)
    out = []
    for i in range(n):
        sub = [j for j in range(n) if j % d == i % d]  # i's dilated sub-sequence
        p, length = sub.index(i), len(sub)
        assert length >= k
        if k % 2 == 1:  # NATTEN's get_window_start, verbatim
            nh = k // 2
            start = max(p - nh, 0) + (p + nh >= length) * (length - p - nh - 1)
        else:
            start = p - k // 2
            start = max(start, 0)
            if start + k > length:
                start = length - k
        out.append(set(sub[start:start + k]))
    return out


def brute_1d(n, k, d, causal):
    m = torch.zeros(n, n, dtype=torch.bool)
    if causal:
        for i in range(n):
            for j in range(n):
                m[i, j] = j <= i and (i - j) % d == 0 and (i - j) // d < k
        return m
    for i, nbrs in enumerate(brute_axis(n, k, d)):
        for j in nbrs:
            m[i, j] = True
    return m


def brute_2d(grid, k, d):
    (H, W), (kh, kw), (dh, dw) = grid, (k if isinstance(k, tuple) else (k, k)), (d if isinstance(d, tuple) else (d, d))
    rows, cols = brute_axis(H, kh, dh), brute_axis(W, kw, dw)
    m = torch.zeros(H * W, H * W, dtype=torch.bool)
    for r in range(H):
        for c in range(W):
            for r2 in rows[r]:
                for c2 in cols[c]:
                    m[r * W + c, r2 * W + c2] = True
    return m


def fits(n, k, d):
    return n // d >= min(k, n)


# ---------------------------------------------------------------------------- (a) mask


@pytest.mark.parametrize("n", [1, 5, 13, 17, 30])
@pytest.mark.parametrize("k", [1, 3, 4, 5, 7])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_1d_mask_equals_brute_force(n, k, d):
    if not fits(n, k, d):
        with pytest.raises(AttentionInputError, match=r"dilated sub-sequences.*kernel_size \* dilation"):
            neighborhood_mask(k, d, length=n)
        return
    got = dense_mask(neighborhood_mask(k, d, length=n), 1, 1, n, n)[0, 0]
    want = brute_1d(n, k, d, causal=False)
    assert torch.equal(got, want)
    assert (got.sum(-1) == min(k, n)).all()  # the window shifts at the borders, never crops


@pytest.mark.parametrize("n", [1, 5, 13, 30])
@pytest.mark.parametrize("k", [1, 3, 4, 7])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_1d_causal_mask_equals_brute_force(n, k, d):
    got = dense_mask(neighborhood_mask(k, d, causal=True), 1, 1, n, n)[0, 0]
    assert torch.equal(got, brute_1d(n, k, d, causal=True))


@pytest.mark.parametrize("grid", [(13, 11), (7, 9), (5, 5), (3, 8), (1, 6)])
@pytest.mark.parametrize("k", [3, 5, (3, 5)])
@pytest.mark.parametrize("d", [1, 2, 3, (2, 1)])
def test_2d_mask_equals_brute_force(grid, k, d):
    kk = k if isinstance(k, tuple) else (k, k)
    dd = d if isinstance(d, tuple) else (d, d)
    n = grid[0] * grid[1]
    if not all(fits(a, b, c) for a, b, c in zip(grid, kk, dd)):
        with pytest.raises(AttentionInputError, match="dilated sub-sequences"):
            neighborhood_mask(k, d, grid=grid)
        return
    mod = neighborhood_mask(k, d, grid=grid, length=n)
    got = dense_mask(mod, 1, 1, n, n)[0, 0]
    assert torch.equal(got, brute_2d(grid, k, d))


def test_mask_mod_works_blockwise_and_under_vmap():
    mod = neighborhood_mask(5, 2, grid=(13, 11))
    full = dense_mask(mod, 1, 1, 143, 143)[0, 0]
    block = dense_mask(mod, 1, 1, 40, 30, q_start=50, kv_start=70)[0, 0]
    assert torch.equal(block, full[50:90, 70:100])
    zero = torch.tensor(0)
    for m in (mod, neighborhood_mask(4, 3, length=29), neighborhood_mask(3, 2, causal=True)):
        n = 143 if m is mod else 29
        qi, ki = torch.arange(n), torch.arange(n)
        inner = torch.vmap(lambda q_, k_, mod_=m: mod_(zero, zero, q_, k_), in_dims=(None, 0))
        vm = torch.vmap(inner, in_dims=(0, None))(qi, ki)
        assert torch.equal(vm, dense_mask(m, 1, 1, n, n)[0, 0])


@pytest.mark.skipif(not flex_available(), reason="FlexAttention missing from this torch build")
@pytest.mark.parametrize("mod,n", [(neighborhood_mask(5, 2, grid=(13, 11)), 143), (neighborhood_mask(7, 3, causal=True), 300),
                                   (neighborhood_mask(7, 2, length=300), 300)], ids=["2d", "causal", "1d"])
def test_flex_block_mask_from_the_same_function(mod, n):
    """FlexAttention's create_block_mask (vmap over scalar indices) gives the same tiles."""
    bm = block_mask(mod, None, None, n, n, block_size=32)
    assert torch.equal(bm.to_dense()[0, 0].bool(), block_layout(mod, 1, 1, n, n, block_size=32)[0, 0])


def test_mask_errors():
    with pytest.raises(AttentionInputError, match="no causal form"):
        neighborhood_mask(3, grid=(4, 4), causal=True)
    with pytest.raises(AttentionInputError, match="needs length=N"):
        neighborhood_mask(3)
    with pytest.raises(AttentionInputError, match="kernel_size must be a positive int"):
        neighborhood_mask(0, length=5)
    with pytest.raises(AttentionInputError, match="dilation must be"):
        neighborhood_mask(3, (1, 2), length=5)
    with pytest.raises(AttentionInputError, match=r"grid=\(4, 4\) has 16 cells.*length 15"):
        neighborhood_mask(3, grid=(4, 4), length=15)
    with pytest.raises(AttentionInputError, match=r"shortest of length 3 < kernel_size 5"):
        neighborhood_mask(5, 3, length=11)


# --------------------------------------------------------------------- (b) acceptance


@pytest.mark.parametrize("impl", ["reference", "gather"])
@pytest.mark.parametrize("k,d", [(5, 2), (3, 3), (3, 2)])
def test_2d_every_query_sees_exactly_k2_keys(impl, k, d):
    """A 13×11 grid (not a multiple of the kernel) with dilation: every query attends to
    exactly kernel_size² keys, all in its dilation class, the window shifted at borders."""
    H, W = 13, 11
    n = H * W
    mask = dense_mask(neighborhood_mask(k, d, grid=(H, W)), 1, 1, n, n)[0, 0]
    assert (mask.sum(-1) == k * k).all()
    r, c = torch.arange(n) // W, torch.arange(n) % W
    same_class = ((r[:, None] - r[None, :]) % d == 0) & ((c[:, None] - c[None, :]) % d == 0)
    assert not (mask & ~same_class).any()
    # The method: weights of the reference, and for gather the probe v = one-hot keys.
    q, kk = torch.randn(1, 1, n, 8, dtype=torch.float64), torch.randn(1, 1, n, 8, dtype=torch.float64)
    v = torch.eye(n, dtype=torch.float64).view(1, 1, n, n)
    w = az.attention(q, kk, v, method="neighborhood", impl=impl, kernel_size=k, dilation=d, grid=(H, W))[0, 0]
    assert ((w > 0).sum(-1) == k * k).all()
    assert torch.equal(w > 0, mask)
    torch.testing.assert_close(w.sum(-1), torch.ones(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [1, 2, 6])
def test_short_sequence_clamps_the_window_to_the_whole_sequence(n):
    """[J] kernel_size > N: every query sees all N keys, i.e. full softmax attention."""
    q, k, v = (torch.randn(2, 2, n, 8, dtype=torch.float64) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v)
    for impl in ("reference", "gather"):
        torch.testing.assert_close(az.attention(q, k, v, method="neighborhood", impl=impl), want)


# -------------------------------------------------------------- (c) gather vs reference

CONFIGS = [
    {"n": 50, "kernel_size": 7},
    {"n": 40, "kernel_size": 5, "dilation": 3},
    {"n": 33, "kernel_size": 4, "dilation": 2},
    {"n": 40, "kernel_size": 5, "dilation": 2, "causal": True},
    {"n": 20, "kernel_size": 7, "dilation": 3, "causal": True},
    {"n": 143, "kernel_size": 5, "dilation": 2, "grid": (13, 11)},
    {"n": 63, "kernel_size": 3, "grid": (7, 9)},
    {"n": 48, "kernel_size": (3, 5), "dilation": (2, 1), "grid": (6, 8)},
]


def _ids(c):
    return "-".join(f"{k}{v}" for k, v in c.items()).replace(" ", "")


@pytest.mark.parametrize("cfg", CONFIGS, ids=[_ids(c) for c in CONFIGS])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("block_q", [None, 7])
def test_gather_equals_reference_float64(cfg, heads, padding, block_q):
    cfg = dict(cfg)
    n, causal = cfg.pop("n"), cfg.pop("causal", False)
    (hq, hkv), B, D, Dv = heads, 2, 12, 10
    g = torch.Generator().manual_seed(n + hq)
    q = torch.randn(B, hq, n, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, hkv, n, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, hkv, n, Dv, generator=g, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(B, hq, n, Dv, generator=g, dtype=torch.float64)
    kpm = None
    if padding:
        kpm = torch.ones(B, n, dtype=torch.bool)
        kpm[1, n - n // 3:] = False
        kpm[0, ::5] = False
    res = []
    for impl, extra in (("reference", {}), ("gather", {"block_q": block_q})):
        out = az.attention(q, k, v, method="neighborhood", impl=impl, causal=causal, key_mask=kpm,
                           **cfg, **extra)
        res.append([out, *torch.autograd.grad(out, (q, k, v), dout)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *res):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10, msg=name)
    if padding:  # the fully padded rows (if any) are zeros, never NaN
        assert torch.isfinite(res[1][0]).all()


@pytest.mark.parametrize("kind", ["tensor", "mask_mod", "per_head_tensor"])
def test_gather_with_dense_mask_and_mask_mod(kind):
    n, hq, hkv = 45, 4, 2
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, hq, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, hkv, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, hkv, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ids = (torch.arange(n) // 11).view(1, n)

    def doc(b, h, q_idx, kv_idx):  # documents of 11 tokens, and head 1 never sees even keys
        return (ids[0, q_idx] == ids[0, kv_idx]) & ((h != 1) | (kv_idx % 2 == 1))

    if kind == "mask_mod":
        mask = doc
    elif kind == "tensor":
        mask = dense_mask(doc, 2, hq, n, n)[:, :1]  # (1, 1, n, n): head-independent part only
    else:
        mask = dense_mask(doc, 2, hq, n, n, expand=True)
    dout = torch.randn(2, hq, n, 8, generator=g, dtype=torch.float64)
    res = []
    for impl in ("reference", "gather"):
        out = az.attention(q, k, v, method="neighborhood", impl=impl, mask=mask, kernel_size=5, dilation=2)
        res.append([out, *torch.autograd.grad(out, (q, k, v), dout)])
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)
    # Non-trivial: with dilation 2 an even query has only even neighbours, so under the
    # mask_mod head 1's even rows have nothing visible and must be zeros; all others are not.
    empty = res[0][0].abs().sum(-1) == 0
    expected = torch.zeros(2, hq, n, dtype=torch.bool)
    if kind != "tensor":
        expected[:, 1, ::2] = True
    assert torch.equal(empty, expected) and torch.equal(res[1][0].abs().sum(-1) == 0, expected)


def test_gather_gradcheck():
    """The analytic backward (index_add of the K/V gradients) against finite differences."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 12, 3, generator=g, dtype=torch.float64, requires_grad=True)
    kpm = torch.ones(1, 12, dtype=torch.bool)
    kpm[0, 3] = False
    for kw in ({"kernel_size": 3, "dilation": 2}, {"kernel_size": 3, "causal": True, "dilation": 2},
               {"kernel_size": 3, "grid": (3, 4)}):
        def fn(a, b, c, kw=kw):
            return az.attention(a, b, c, method="neighborhood", impl="gather", key_mask=kpm, block_q=5, **kw)

        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_gather_low_precision_accumulates_in_float32():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(3))
    ref = az.attention(q.double(), k.double(), v.double(), method="neighborhood", impl="reference", kernel_size=9)
    out = az.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), method="neighborhood", impl="gather", kernel_size=9)
    assert out.dtype == torch.bfloat16
    assert float((out.double() - ref).abs().max()) < 0.05


def test_errors():
    q = torch.randn(1, 2, 12, 8)
    with pytest.raises(AttentionInputError, match="no causal form"):
        az.attention(q, q, q, method="neighborhood", causal=True, grid=(3, 4), kernel_size=3)
    with pytest.raises(AttentionInputError, match=r"grid=\(3, 5\) has 15 cells but q has Nq=12"):
        az.attention(q, q, q, method="neighborhood", grid=(3, 5), kernel_size=3)
    with pytest.raises(AttentionInputError, match=r"shortest of length 2 < kernel_size 3"):
        az.attention(q, q, q, method="neighborhood", impl="gather", kernel_size=3, dilation=5)
    with pytest.raises(UnsupportedPattern, match="noncausal_self"):
        az.attention(q, q[:, :, :7], q[:, :, :7], method="neighborhood")
    with pytest.raises(AttentionInputError, match="same length"):
        az.attention(q, q[:, :, :7], q[:, :, :7], method="neighborhood", cross=False)
    with pytest.raises(AttentionInputError, match="no causal form to decode"):
        decoding.init_state("neighborhood", 1, 2, 8, 8, grid=(3, 4))


# ------------------------------------------------------------------------ (d) decoding


@pytest.mark.parametrize("kernel_size,dilation,prefill", [(5, 2, 4), (3, 1, 1), (4, 3, 12), (7, 1, 20)])
def test_decoding_equals_causal_forward_with_bounded_cache(kernel_size, dilation, prefill):
    B, Hq, Hkv, N, D, Dv = 2, 4, 2, 40, 8, 6
    g = torch.Generator().manual_seed(kernel_size)
    q = torch.randn(B, Hq, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, Dv, generator=g, dtype=torch.float64)
    opts = {"kernel_size": kernel_size, "dilation": dilation}
    full = az.attention(q, k, v, method="neighborhood", impl="reference", causal=True, **opts)
    state = decoding.init_state("neighborhood", B, Hkv, D, Dv, dtype=torch.float64, **opts)
    cap = (kernel_size - 1) * dilation + 1
    assert state.capacity == cap
    nbytes = state.nbytes()
    outs = [decoding.step("neighborhood", state, q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], **opts)]
    for t in range(prefill, N):
        outs.append(decoding.step("neighborhood", state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], **opts))
        assert state.capacity == cap and state.nbytes() == nbytes  # constant memory
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-12, rtol=1e-12)
    assert state.length == N
    with pytest.raises(AttentionInputError, match="cache was made for"):
        decoding.step("neighborhood", state, q[:, :, :1], k[:, :, :1], v[:, :, :1], kernel_size=kernel_size + 1,
                      dilation=dilation)


# ----------------------------------------------------------------------- (e) no N×N


def _forward_backward(n, impl, causal=False):
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
    with LargestTensor() as rec:
        out = az.attention(q, k, v, method="neighborhood", impl=impl, kernel_size=7, causal=causal)
        out.backward(torch.randn_like(out))
    assert all(t.grad is not None for t in (q, k, v))
    return rec.largest


def test_recorder_sees_the_reference_n_by_n():
    n = 512
    assert _forward_backward(n, "reference") >= n * n  # the detector works


@pytest.mark.parametrize("causal", [False, True])
def test_gather_never_creates_n_by_n(causal):
    n = 4096
    assert _forward_backward(n, "gather", causal) < n * n // 4


# ----------------------------------------------------------------- (f) sizing, score_mods, flex


def test_sized_options_shrink_the_kernel_at_short_lengths_and_keep_the_default():
    """for_length: at most a quarter of the keys (kernel N/4 + 1) at short lengths, the
    default kernel_size=7 from N = 24 on."""
    spec = az.get("neighborhood")
    assert spec.sized_options(1000) == spec.sized_options(24) == {"kernel_size": spec.options["kernel_size"]}
    for n in (1, 8, 16, 23):
        k = spec.sized_options(n)["kernel_size"]
        assert 1 <= k <= max(3, n // 4 + 1)
        q = torch.randn(1, 1, n, 8, dtype=torch.float64)
        _, w = az.attention(q, q, q, method="neighborhood", impl="reference", return_weights=True, kernel_size=k)
        assert ((w > 0).sum(-1) == min(k, n)).all()


def test_score_mods_are_refused():
    """``gather`` cannot apply a caller's score_mod, so the spec says so (score_mods=False)."""
    q = torch.randn(1, 2, 12, 8)
    assert not az.get("neighborhood").score_mods
    with pytest.raises(AttentionInputError, match="score_mod"):
        az.attention(q, q, q, method="neighborhood", kernel_size=3, score_mod=lambda s, b, h, i, j: s)


@pytest.mark.skipif(not flex_available(), reason="FlexAttention missing from this torch build")
def test_flex_block_masks_are_cached_by_the_neighbourhood(monkeypatch):
    """The flex path's pattern carries a ``cache_key`` (kernel, dilation, grid, causal,
    length): repeated calls reuse one block mask. (The compiled kernel is stubbed out.)"""
    from collections import OrderedDict

    from attnzoo.kernels import flex

    monkeypatch.setattr(flex, "_compiled", lambda: (lambda q, k, v, **kw: torch.zeros_like(q)))
    monkeypatch.setattr(flex, "_BLOCK_MASKS", OrderedDict())
    q = torch.randn(1, 2, 144, 16)
    with torch.no_grad():
        for _ in range(2):
            az.attention(q, q, q, method="neighborhood", impl="flex", kernel_size=5, grid=(12, 12))
            az.attention(q, q, q, method="neighborhood", impl="flex", kernel_size=5, dilation=2, causal=True)
        assert len(flex._BLOCK_MASKS) == 2
    assert neighborhood_mask(5, grid=(12, 12)).cache_key == ("neighborhood", (5, 5), (1, 1), (12, 12), False, None)
