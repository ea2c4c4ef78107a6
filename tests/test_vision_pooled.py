"""The pooled, aggregated, channel, polarized, cascaded, gated-positional and reversed
vision methods against brute force (loops over pixel positions, float64, odd grids),
the papers' formulas on small cases, the learnable modules' gradients; and token
reduction (EViT, ToMe) against brute-force selection and merging, inside a small
ViT-like stack. The registry contract covers fast vs reference for all of them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import LargestTensor

import attnzoo as az
from attnzoo.errors import AttentionInputError, UnsupportedPattern
from attnzoo.layers import (
    EViTReduction,
    ReducingBlock,
    ToMeMerge,
    compose_index,
    evit_reduce,
    restore,
    tome_merge,
)
from attnzoo.methods.vision.gated_positional import local_init

F64 = torch.float64


def qkv(B=2, Hq=4, Hkv=2, Nq=35, Nk=35, D=6, Dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=g, dtype=F64), torch.randn(B, Hkv, Nk, D, generator=g, dtype=F64),
            torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=F64))


def padding(B, N, real):
    km = torch.ones(B, N, dtype=torch.bool)
    km[-1, real:] = False
    return km


def both(method, q, k, v, **kw):
    """The method's output by every implementation (float64)."""
    spec = az.get(method)
    outs = {}
    for impl in spec.impl_names:
        if spec.why_not(spec.get_impl(impl), spec.check(q, k, v, **kw)) is None:
            outs[impl] = az.attention(q, k, v, method=method, impl=impl, **kw)
    return outs


def assert_all_close(outs, expected, atol=1e-10):
    assert len(outs) >= 1
    for impl, out in outs.items():
        torch.testing.assert_close(out, expected, atol=atol, rtol=atol, msg=impl)


def softmax_rows(scores, allowed=None):
    """softmax over the last axis, in Python: a row with nothing allowed gives zeros."""
    out = torch.zeros_like(scores)
    for idx in range(scores.shape[0]):
        ok = [j for j in range(scores.shape[1]) if allowed is None or allowed[idx][j]]
        if not ok:
            continue
        m = max(float(scores[idx, j]) for j in ok)
        e = {j: math.exp(float(scores[idx, j]) - m) for j in ok}
        z = sum(e.values())
        for j in ok:
            out[idx, j] = e[j] / z
    return out


# --------------------------------------------------------------------------- pooled_kv


def brute_pool(x, grid, stride, real):
    """Average pooling by loops over the pixels: x (N, D) -> list of (vector or None)."""
    H, W = grid
    sh, sw = min(stride[0], H), min(stride[1], W)
    out = []
    for a in range(-(-H // sh)):
        for b in range(-(-W // sw)):
            cells = [r * W + c for r in range(H) for c in range(W) if r // sh == a and c // sw == b and real[r * W + c]]
            out.append(None if not cells else sum(x[t] for t in cells) / len(cells))
    return out


def brute_pooled_kv(q, k, v, grid, stride, km=None, scale=None):
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros(B, Hq, Nq, Dv, dtype=F64)
    for b in range(B):
        real = [True] * Nk if km is None else km[b].tolist()
        for h in range(Hq):
            g = h // (Hq // Hkv)
            kp = brute_pool(k[b, g], grid, stride, real)
            vp = brute_pool(v[b, g], grid, stride, real)
            keep = [m for m, t in enumerate(kp) if t is not None]
            for i in range(Nq):
                s = torch.tensor([[float(q[b, h, i] @ kp[m]) * scale for m in keep]], dtype=F64)
                p = softmax_rows(s)[0]
                out[b, h, i] = sum(p[n] * vp[m] for n, m in enumerate(keep))
    return out


@pytest.mark.parametrize("grid,stride", [((5, 7), (2, 3)), ((3, 5), (2, 2)), ((1, 9), (4, 4)), ((7, 5), (3, 1))])
def test_pooled_kv_equals_loops_over_pixels_on_odd_grids(grid, stride):
    N = grid[0] * grid[1]
    q, k, v = qkv(Nq=11, Nk=N)  # cross: any number of queries attends to the pooled keys
    km = padding(2, N, N - 4)
    expected = brute_pooled_kv(q, k, v, grid, stride, km)
    outs = both("pooled_kv", q, k, v, grid=grid, reduction=stride, key_mask=km)
    assert set(outs) == {"reference", "sdpa"}
    assert_all_close(outs, expected)


def test_pooled_kv_conv_equals_loops_over_the_kernel_taps():
    grid, R = (5, 7), (2, 3)
    N = 35
    q, k, v = qkv(Nq=N, Nk=N)
    g = torch.Generator().manual_seed(1)
    w_k = torch.randn(2 * 6, 6, *R, generator=g, dtype=F64)
    w_v = torch.randn(2 * 5, 5, *R, generator=g, dtype=F64)
    km = padding(2, N, 20)
    Hc, Wc = 3, 3
    expected = torch.zeros(2, 4, N, 5, dtype=F64)
    for b in range(2):
        for h in range(4):
            g_ = h // 2
            kp, vp = [], []
            for a in range(Hc):
                for c in range(Wc):
                    sk = torch.zeros(6, dtype=F64)
                    sv = torch.zeros(5, dtype=F64)
                    any_real = False
                    for i in range(R[0]):
                        for j in range(R[1]):
                            r, col = a * R[0] + i, c * R[1] + j
                            if r < 5 and col < 7 and km[b, r * 7 + col]:  # zero padding; padded keys are zeros
                                sk += w_k[g_ * 6:(g_ + 1) * 6, :, i, j] @ k[b, g_, r * 7 + col]
                                sv += w_v[g_ * 5:(g_ + 1) * 5, :, i, j] @ v[b, g_, r * 7 + col]
                                any_real = True
                    if any_real:
                        kp.append(sk)
                        vp.append(sv)
            for n in range(N):
                s = torch.stack([q[b, h, n] @ t for t in kp]) * 6 ** -0.5
                expected[b, h, n] = torch.softmax(s, 0) @ torch.stack(vp)
    outs = both("pooled_kv", q, k, v, grid=grid, reduction=R, pool="conv", sr_weight=(w_k, w_v), key_mask=km)
    assert_all_close(outs, expected)


def test_pooled_kv_adaptive_pool_size_and_ratio_one():
    q, k, v = qkv(Nq=35, Nk=35)
    # PVTv2's linear SRA: adaptive windows rows floor(aH/h)..ceil((a+1)H/h)
    grid, size = (5, 7), (2, 3)
    expected = torch.zeros(2, 4, 35, 5, dtype=F64)
    for b in range(2):
        for h in range(4):
            kp, vp = [], []
            for a in range(2):
                for c in range(3):
                    cells = [r * 7 + col for r in range((a * 5) // 2, -(-((a + 1) * 5) // 2))
                             for col in range((c * 7) // 3, -(-((c + 1) * 7) // 3))]
                    kp.append(k[b, h // 2, cells].mean(0))
                    vp.append(v[b, h // 2, cells].mean(0))
            expected[b, h] = torch.softmax(q[b, h] @ torch.stack(kp).T * 6 ** -0.5, -1) @ torch.stack(vp)
    assert_all_close(both("pooled_kv", q, k, v, grid=grid, pool_size=size), expected)
    # ratio 1: nothing is pooled, it is exact softmax attention
    exact = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert_all_close(both("pooled_kv", q, k, v, grid=grid, reduction=1), exact)


def test_pooled_kv_weights_are_the_effective_weights_over_the_keys():
    q, k, v = qkv(Nq=9, Nk=35)
    out, w = az.attention(q, k, v, method="pooled_kv", grid=(5, 7), reduction=2, return_weights=True)
    assert w.shape == (2, 4, 9, 35)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 9, dtype=F64))
    torch.testing.assert_close(w @ v.repeat_interleave(2, 1), out)


def test_pooled_kv_grid_errors_and_no_causal_form():
    q, k, v = qkv(Nq=35, Nk=35)
    with pytest.raises(AttentionInputError, match=r"grid=\(5, 6\) has 30 cells but k has 35 tokens"):
        az.attention(q, k, v, method="pooled_kv", grid=(5, 6))
    with pytest.raises(AttentionInputError, match="sr_weight"):
        az.attention(q, k, v, method="pooled_kv", pool="conv")
    with pytest.raises(UnsupportedPattern, match="noncausal_self"):
        az.attention(q, k, v, method="pooled_kv", causal=True)


def test_pooled_kv_sdpa_never_builds_nq_by_nk():
    q, k, v = (t.float().requires_grad_(True) for t in qkv(B=1, Hq=2, Hkv=2, Nq=1024, Nk=1024, D=8, Dv=8))
    with LargestTensor() as probe:
        out = az.attention(q, k, v, method="pooled_kv", impl="sdpa", grid=(32, 32), reduction=4)
        out.sum().backward()
    assert probe.largest < 1024 * 1024 / 4


# -------------------------------------------------------------------------- aggregated


def brute_aggregated(q, k, v, grid, kernel, stride, km=None):
    B, Hq, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    H, W = grid
    kh, kw = kernel
    out = torch.zeros(B, Hq, N, Dv, dtype=F64)
    for b in range(B):
        real = [True] * N if km is None else km[b].tolist()
        for h in range(Hq):
            g = h // (Hq // Hkv)
            kp = brute_pool(k[b, g], grid, stride, real)
            vp = brute_pool(v[b, g], grid, stride, real)
            for r in range(H):
                for c in range(W):
                    i = r * W + c
                    keys, vals = [], []
                    for r2 in range(H):
                        for c2 in range(W):
                            if -(kh // 2) <= r2 - r <= (kh - 1) // 2 and -(kw // 2) <= c2 - c <= (kw - 1) // 2 \
                                    and real[r2 * W + c2]:
                                keys.append(k[b, g, r2 * W + c2])
                                vals.append(v[b, g, r2 * W + c2])
                    keys += [t for t in kp if t is not None]
                    vals += [t for t in vp if t is not None]
                    s = torch.stack([q[b, h, i] @ t for t in keys]) * D ** -0.5
                    out[b, h, i] = torch.softmax(s, 0) @ torch.stack(vals)
    return out


@pytest.mark.parametrize("grid,kernel,stride", [((5, 7), (3, 3), (2, 3)), ((3, 5), (2, 4), (2, 2)),
                                                ((1, 9), (3, 3), (4, 4))])
def test_aggregated_equals_loops_over_pixels(grid, kernel, stride):
    N = grid[0] * grid[1]
    q, k, v = qkv(Nq=N, Nk=N)
    km = padding(2, N, N - 3)
    expected = brute_aggregated(q, k, v, grid, kernel, stride, km)
    outs = both("aggregated", q, k, v, grid=grid, kernel_size=kernel, reduction=stride, key_mask=km)
    assert set(outs) == {"reference", "gather"}
    assert_all_close(outs, expected)


def test_aggregated_is_one_softmax_over_local_and_pooled_keys():
    """The paper's point: one normalisation for both sets — the weights of a row sum to 1
    over the local and the pooled keys together (not to 1 each)."""
    q, k, v = qkv(B=1, Nq=35, Nk=35)
    out, w = az.attention(q, k, v, method="aggregated", impl="reference", grid=(5, 7), kernel_size=3, reduction=2,
                          return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4, 35, dtype=F64))
    torch.testing.assert_close(w @ v.repeat_interleave(2, 1), out)
    from attnzoo.methods.vision.aggregated import foveal_window_mask

    i = torch.arange(35)
    window = foveal_window_mask((5, 7), 3)(0, 0, i.view(-1, 1), i.view(1, -1))
    assert float(w[..., ~window].sum(-1).min()) > 1e-3  # the pooled keys reach outside every window
    local = F.scaled_dot_product_attention(q, k, v, attn_mask=window, enable_gqa=True)
    assert (out - local).abs().max() > 1e-3


def test_aggregated_gather_never_builds_n_by_n():
    q, k, v = (t.float().requires_grad_(True) for t in qkv(B=1, Hq=2, Hkv=2, Nq=1024, Nk=1024, D=8, Dv=8))
    with LargestTensor() as probe:
        az.attention(q, k, v, method="aggregated", impl="gather", grid=(32, 32), kernel_size=3, reduction=8).sum() \
            .backward()
    assert probe.largest < 1024 * 1024 / 4


# ----------------------------------------------------------------------------- channel


def test_channel_equals_loops_over_channel_pairs_and_davit_code():
    q, k, v = qkv(Nq=9, Nk=13, D=4, Dv=3)
    scale = 4 ** -0.5
    expected = torch.zeros(2, 4, 9, 3, dtype=F64)
    for b in range(2):
        for h in range(4):
            g = h // 2
            A = torch.zeros(3, 4, dtype=F64)  # value channel j x key channel i
            for j in range(3):
                logits = [scale * sum(float(v[b, g, t, j] * k[b, g, t, i]) for t in range(13)) for i in range(4)]
                m = max(logits)
                z = sum(math.exp(x - m) for x in logits)
                for i in range(4):
                    A[j, i] = math.exp(logits[i] - m) / z
            for n in range(9):
                for j in range(3):
                    expected[b, h, n, j] = sum(A[j, i] * q[b, h, n, i] for i in range(4))
    assert_all_close(both("channel", q, k, v), expected)
    # D = Dv: DaViT's released code, x = (softmax(kᵀ v · s) @ qᵀ)ᵀ, with k and v exchanged
    q, k, v = qkv(Hq=2, Hkv=2, Nq=13, Nk=13, D=5, Dv=5)
    davit = (torch.softmax(v.transpose(-1, -2) @ k * 5 ** -0.5, dim=-1) @ q.transpose(-1, -2)).transpose(-1, -2)
    assert_all_close(both("channel", q, k, v), davit)


def test_channel_padding_is_dropping_the_padded_tokens_and_linear_memory():
    q, k, v = qkv(Nq=9, Nk=13)
    km = padding(2, 13, 8)
    full = both("channel", q, k, v, key_mask=km)
    short = az.attention(q[1:], k[1:, :, :8], v[1:, :, :8], method="channel")
    for out in full.values():
        torch.testing.assert_close(out[1:], short)
    q, k, v = (t.float().requires_grad_(True) for t in qkv(B=1, Hq=2, Hkv=1, Nq=4096, Nk=4096, D=8, Dv=8))
    with LargestTensor() as probe:
        az.attention(q, k, v, method="channel", impl="matmul").sum().backward()
    assert probe.largest <= 2 * 4096 * 8


# --------------------------------------------------------------------------- polarized


def brute_polarized(q, k, v, mode, u=None, W_z=None, gamma=None, beta=None):
    """PSA's equations, one head and one batch row at a time, in loops."""
    B, Hq, N, D = q.shape
    Dv = v.shape[3]
    out = torch.zeros(B, Hq, N, Dv, dtype=F64)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // k.shape[1])
            qm = [sum(float(q[b, h, n, d]) for n in range(N)) / N for d in range(D)]
            # channel-only
            query = qm if u is None else u[h].tolist()
            logits = [D ** -0.5 * sum(query[d] * float(k[b, g, n, d]) for d in range(D)) for n in range(N)]
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            alpha = [x / sum(e) for x in e]
            z = [sum(alpha[n] * float(v[b, g, n, c]) for n in range(N)) for c in range(Dv)]
            if W_z is not None:
                z = [sum(float(W_z[h, c, c2]) * z[c2] for c2 in range(Dv)) for c in range(Dv)]
            mu = sum(z) / Dv
            var = sum((x - mu) ** 2 for x in z) / Dv
            zn = [(x - mu) / math.sqrt(var + 1e-5) for x in z]
            if gamma is not None:
                zn = [zn[c] * float(gamma[h, c]) + float(beta[h, c]) for c in range(Dv)]
            g_ch = [1 / (1 + math.exp(-x)) for x in zn]
            # spatial-only
            ms = max(qm)
            es = [math.exp(x - ms) for x in qm]
            s_hat = [x / sum(es) for x in es]
            for n in range(N):
                g_sp = 1 / (1 + math.exp(-sum(s_hat[d] * float(k[b, g, n, d]) for d in range(D))))
                for c in range(Dv):
                    x = float(v[b, g, n, c])
                    out[b, h, n, c] = {"parallel": g_ch[c] * x + g_sp * x, "sequential": g_sp * g_ch[c] * x,
                                       "channel": g_ch[c] * x, "spatial": g_sp * x}[mode]
    return out


@pytest.mark.parametrize("mode", ["parallel", "sequential", "channel", "spatial"])
def test_polarized_equals_psa_equations(mode):
    q, k, v = qkv(Nq=7, Nk=7, D=4, Dv=3)
    assert_all_close(both("polarized", q, k, v, mode=mode), brute_polarized(q, k, v, mode))
    g = torch.Generator().manual_seed(2)
    u, W_z = torch.randn(4, 4, generator=g, dtype=F64), torch.randn(4, 3, 3, generator=g, dtype=F64)
    gamma, beta = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    expected = brute_polarized(q, k, v, mode, u, W_z, gamma, beta)
    assert_all_close(both("polarized", q, k, v, mode=mode, channel_query=u, channel_weight=W_z, norm_weight=gamma,
                          norm_bias=beta), expected)


def test_polarized_padding_leaves_the_padded_positions_out():
    q, k, v = qkv(Nq=10, Nk=10)
    km = padding(2, 10, 6)
    for out in both("polarized", q, k, v, key_mask=km).values():
        short = az.attention(q[1:, :, :6], k[1:, :, :6], v[1:, :, :6], method="polarized")
        torch.testing.assert_close(out[1:, :, :6], short)


# ---------------------------------------------------------------------- cascaded_group


def test_cascaded_group_equals_efficientvit_on_feature_splits():
    """EfficientViT's CGA from the input: X split into heads, X'_j = X_j + Õ_{j-1},
    q/k/v of X'_j — equals the method on the splits' projections with the feeds set to
    the projections themselves."""
    g = torch.Generator().manual_seed(3)
    B, N, h, c, D = 2, 12, 3, 4, 5  # c = C / h channels per split (= Dv), D = key dim
    X = torch.randn(B, N, h * c, generator=g, dtype=F64)
    Wq, Wk = torch.randn(h, c, D, generator=g, dtype=F64), torch.randn(h, c, D, generator=g, dtype=F64)
    Wv = torch.randn(h, c, c, generator=g, dtype=F64)
    splits = X.view(B, N, h, c)
    outs, prev = [], None
    for j in range(h):
        xj = splits[:, :, j] if prev is None else splits[:, :, j] + prev
        qj, kj, vj = xj @ Wq[j], xj @ Wk[j], xj @ Wv[j]
        prev = torch.softmax(qj @ kj.transpose(-1, -2) * D ** -0.5, -1) @ vj
        outs.append(prev)
    expected = torch.stack(outs, 1)  # (B, h, N, c)
    q = torch.einsum("bnjc,jcd->bjnd", splits, Wq)
    k = torch.einsum("bnjc,jcd->bjnd", splits, Wk)
    v = torch.einsum("bnjc,jcd->bjnd", splits, Wv)
    outs = both("cascaded_group", q, k, v, feed_q=Wq[1:], feed_k=Wk[1:], feed_v=Wv[1:])
    assert set(outs) == {"reference", "sdpa"}
    assert_all_close(outs, expected)


def test_cascaded_group_without_feeds_is_softmax_and_the_default_feeds_values():
    q, k, v = qkv(Nq=20, Nk=20, D=6, Dv=5)
    zeros = torch.zeros(3, 5, 5, dtype=F64)
    exact = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, is_causal=True)
    assert_all_close(both("cascaded_group", q, k, v, causal=True, feed_v=zeros), exact)
    # default: v'_j = v_j + O_{j-1}
    prev, outs = None, []
    for j in range(4):
        vj = v[:, j // 2] if prev is None else v[:, j // 2] + prev
        prev = F.scaled_dot_product_attention(q[:, j], k[:, j // 2], vj)
        outs.append(prev)
    assert_all_close(both("cascaded_group", q, k, v), torch.stack(outs, 1))


# -------------------------------------------------------------------- gated_positional


def brute_gpsa(q, k, v, grid, pos_weight, gate, km=None):
    B, Hq, N, D = q.shape
    H, W = grid
    out = torch.zeros(B, Hq, N, v.shape[3], dtype=F64)
    for b in range(B):
        allowed = [[km is None or bool(km[b, j]) for j in range(N)] for _ in range(N)]
        for h in range(Hq):
            g = h // (Hq // k.shape[1])
            content = torch.zeros(N, N, dtype=F64)
            pos = torch.zeros(N, N, dtype=F64)
            for r in range(H):
                for c in range(W):
                    i = r * W + c
                    for r2 in range(H):
                        for c2 in range(W):
                            j = r2 * W + c2
                            dr, dc = r2 - r, c2 - c
                            content[i, j] = float(q[b, h, i] @ k[b, g, j]) * D ** -0.5
                            pos[i, j] = float(pos_weight[h, 0] * dr + pos_weight[h, 1] * dc
                                              + pos_weight[h, 2] * (dr * dr + dc * dc))
            sig = 1 / (1 + math.exp(-float(gate[h])))
            A = (1 - sig) * softmax_rows(content, allowed) + sig * softmax_rows(pos, allowed)
            out[b, h] = A @ v[b, g]
    return out


def test_gated_positional_equals_loops_over_pixels():
    grid = (3, 5)
    q, k, v = qkv(Nq=15, Nk=15)
    g = torch.Generator().manual_seed(4)
    w, lam = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    outs = both("gated_positional", q, k, v, grid=grid, pos_weight=w, gate=lam)
    assert set(outs) == {"reference", "separable", "sdpa"}
    assert_all_close(outs, brute_gpsa(q, k, v, grid, w, lam))
    km = padding(2, 15, 9)
    outs = both("gated_positional", q, k, v, grid=grid, key_mask=km)  # the defaults: ConViT's init
    assert set(outs) == {"reference", "sdpa"}
    assert_all_close(outs, brute_gpsa(q, k, v, grid, local_init(4), torch.ones(4), km))


def test_gated_positional_local_init_attends_around_each_heads_offset():
    """ConViT's init: 9 heads, offsets {-1, 0, 1}²; a strong locality makes each head's
    positional attention peak at the query plus its offset; the gate decides the mix."""
    q, k, v = qkv(B=1, Hq=9, Hkv=9, Nq=25, Nk=25)
    w = local_init(9, locality_strength=8.0).double()
    _, A = az.attention(q, k, v, method="gated_positional", impl="reference", grid=(5, 5), pos_weight=w,
                        gate=torch.full((9,), 50.0, dtype=F64), return_weights=True)
    centre = 2 * 5 + 2
    for h in range(9):
        dr, dc = h % 3 - 1, h // 3 - 1
        assert int(A[0, h, centre].argmax()) == (2 + dr) * 5 + (2 + dc)
        assert float(A[0, h, centre].max()) > 0.9
    exact = F.scaled_dot_product_attention(q, k, v)
    assert_all_close(both("gated_positional", q, k, v, grid=(5, 5), gate=torch.full((9,), -50.0, dtype=F64)), exact,
                     atol=1e-9)


# ---------------------------------------------------------------------------- reversed


def test_reversed_normalises_over_the_queries():
    q, k, v = qkv(Nq=9, Nk=13)
    km = padding(2, 13, 10)
    mask = torch.rand(2, 4, 9, 13, generator=torch.Generator().manual_seed(5)) < 0.6
    expected = torch.zeros(2, 4, 9, 5, dtype=F64)
    for b in range(2):
        for h in range(4):
            g = h // 2
            Wt = softmax_rows((k[b, g] @ q[b, h].T) * 6 ** -0.5,  # rows = keys, softmax over the queries
                              [[bool(km[b, j] and mask[b, h, i, j]) for i in range(9)] for j in range(13)])
            expected[b, h] = Wt.T @ v[b, g]
    outs = both("reversed", q, k, v, key_mask=km, mask=mask)
    assert set(outs) == {"reference", "tiled"}
    assert_all_close(outs, expected)
    small = az.attention(q, k, v, method="reversed", impl="tiled", key_mask=km, mask=mask, block_q=2, block_k=3)
    torch.testing.assert_close(small, expected)
    _, W = az.attention(q, k, v, method="reversed", return_weights=True)
    torch.testing.assert_close(W.sum(-2), torch.ones(2, 4, 13, dtype=F64))  # each key sends all it has


def test_reversed_tiled_never_builds_nq_by_nk():
    q, k, v = (t.float().requires_grad_(True) for t in qkv(B=1, Hq=2, Hkv=2, Nq=512, Nk=512, D=8, Dv=8))
    with LargestTensor() as probe:
        az.attention(q, k, v, method="reversed", impl="tiled", block_q=128, block_k=128).sum().backward()
    assert probe.largest < 2 * 512 * 512 / 4  # a quarter of the (B, H, Nq, Nk) scores


# ------------------------------------------------------------------- learnable modules


@pytest.mark.parametrize("method,options", [("pooled_kv", {"grid": (3, 5), "reduction": 2}), ("polarized", {}),
                                            ("cascaded_group", {}), ("gated_positional", {"grid": (3, 5)})])
def test_learnable_modules_have_correct_gradients(method, options):
    """torch.autograd.gradcheck (fast mode: random directions) over q, k, v and every
    parameter (float64), and every parameter gets a non-zero gradient."""
    module = az.build(method, heads=2, head_dim=3, v_dim=2, **options).double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn_like(p))
    q, k, v = (t.requires_grad_(True) for t in qkv(B=1, Hq=2, Hkv=2, Nq=15, Nk=15, D=3, Dv=2))
    params = list(module.parameters())
    assert params
    fn = lambda q_, k_, v_, *ps: module(q_, k_, v_)
    assert torch.autograd.gradcheck(fn, (q, k, v, *params), eps=1e-6, atol=1e-5, fast_mode=True)
    grads = torch.autograd.grad(module(q, k, v).square().sum(), params)
    assert all(float(g.abs().max()) > 0 for g in grads)


def test_cascaded_module_decodes_token_by_token():
    module = az.build("cascaded_group", heads=4, kv_heads=2, head_dim=6, v_dim=5).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    q, k, v = qkv(Nq=17, Nk=17)
    full = module(q, k, v, causal=True)
    state = module.init_state(2, 2, 6, 5, dtype=F64)
    steps = [module.step(state, q[:, :, :4], k[:, :, :4], v[:, :, :4])]
    steps += [module.step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]) for t in range(4, 17)]
    torch.testing.assert_close(torch.cat(steps, 2), full)


# --------------------------------------------------------------------- token reduction


def test_evit_keeps_the_top_k_by_cls_attention_and_fuses_the_rest():
    g = torch.Generator().manual_seed(6)
    B, N, C, keep = 3, 11, 4, 6
    x = torch.randn(B, N, C, generator=g, dtype=F64)
    attn = torch.softmax(torch.randn(B, 2, N, generator=g, dtype=F64), -1)  # (B, H, N): the [CLS] rows
    red = evit_reduce(x, attn, keep)
    a = attn.mean(1)
    assert red.x.shape == (B, 1 + keep + 1, C)
    for b in range(B):
        ranked = sorted(range(1, N), key=lambda t: -float(a[b, t]))
        kept, rest = sorted(ranked[:keep]), ranked[keep:]
        torch.testing.assert_close(red.x[b, 0], x[b, 0])
        torch.testing.assert_close(red.x[b, 1:1 + keep], x[b, kept])
        torch.testing.assert_close(red.x[b, -1], sum(a[b, t] * x[b, t] for t in rest))  # the paper's Σ a_i x_i
        assert red.index[b].tolist() == [0] + [1 + kept.index(t) if t in kept else keep + 1 for t in range(1, N)]
        assert float(red.size[b, -1]) == len(rest)
    torch.testing.assert_close(restore(red.x, red.index)[:, 0], x[:, 0])
    dropped = evit_reduce(x, attn, keep, fuse=False)
    assert dropped.x.shape == (B, 1 + keep, C) and int((dropped.index < 0).sum()) == B * (N - 1 - keep)
    with pytest.raises(AttentionInputError, match="keep must be an int in"):
        evit_reduce(x, attn, N)


def test_tome_merges_into_size_weighted_means():
    g = torch.Generator().manual_seed(7)
    B, N, C, r = 2, 13, 3, 4
    x = torch.randn(B, N, C, generator=g, dtype=F64)
    metric = torch.randn(B, N, 5, generator=g, dtype=F64)
    size = torch.randint(1, 4, (B, N), generator=g).to(F64)
    red = tome_merge(x, r, metric=metric, size=size)
    assert red.x.shape == (B, N - r, C)
    torch.testing.assert_close(red.size.sum(1), size.sum(1))  # nothing lost
    for b in range(B):
        A, Bs = list(range(0, N, 2)), list(range(1, N, 2))
        cos = lambda i, j, mb=metric[b]: float(F.cosine_similarity(mb[i], mb[j], dim=0))
        best = {i: max(Bs, key=lambda j: cos(i, j)) for i in A[1:]}  # token 0 ([CLS]) never merges
        src = sorted(best, key=lambda i: -cos(i, best[i]))[:r]
        unmerged = [i for i in A if i not in src]
        groups = {j: [j] + [i for i in src if best[i] == j] for j in Bs}
        expected = [x[b, i] for i in unmerged]
        expected += [sum(size[b, t] * x[b, t] for t in groups[j]) / sum(size[b, t] for t in groups[j]) for j in Bs]
        torch.testing.assert_close(red.x[b], torch.stack(expected))
        for t in range(N):  # the index map sends every token to the reduced token that holds it
            target = unmerged.index(t) if t in unmerged else len(unmerged) + Bs.index(best.get(t, t))
            assert int(red.index[b, t]) == target
    assert int(red.index[:, 0].max()) == 0
    torch.testing.assert_close(tome_merge(x, 0).x, x)


@pytest.mark.slow
def test_reduction_glue_inside_a_small_vit_stack():
    """A ViT-like stack (patch embedding, [CLS], blocks with EViT and ToMe between their
    attention and MLP, any method), trained a few steps: the tokens shrink as planned,
    the index maps chain to the final tokens, gradients reach every parameter."""
    torch.manual_seed(0)
    dim, patches = 16, 36
    embed = torch.nn.Linear(12, dim)
    cls = torch.nn.Parameter(torch.zeros(1, 1, dim))
    blocks = torch.nn.ModuleList([
        ReducingBlock(dim, 4),
        ReducingBlock(dim, 4, reduction=EViTReduction(0.7)),
        ReducingBlock(dim, 4, reduction=ToMeMerge(6), kv_heads=2, rotary=True),
        ReducingBlock(dim, 4, reduction=EViTReduction(0.5), method="reversed"),
        ReducingBlock(dim, 4, reduction=ToMeMerge(3), method="pooled_kv", grid="auto"),
    ])
    head = torch.nn.Linear(dim, 2)
    params = [*embed.parameters(), cls, *blocks.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    images = torch.randn(8, patches, 12)
    labels = (images[:, :, 0].mean(1) > 0).long()
    losses = []
    for _ in range(8):
        x = torch.cat([cls.expand(8, 1, dim), embed(images)], 1)
        index, size, lengths = None, None, []
        for block in blocks:
            red = block(x, size)
            x, size = red.x, red.size
            index = red.index if index is None else compose_index(index, red.index)
            lengths.append(x.shape[1])
        loss = F.cross_entropy(head(x[:, 0]), labels)
        opt.zero_grad()
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    n0 = 1 + patches
    e1 = 1 + math.ceil(0.7 * (n0 - 1)) + 1
    e3 = 1 + math.ceil(0.5 * (e1 - 6 - 1)) + 1
    assert lengths == [n0, e1, e1 - 6, e3, e3 - 3]
    assert index.shape == (8, n0) and int(index.min()) >= 0 and int(index.max()) < lengths[-1]
    assert bool((index[:, 0] == 0).all())  # [CLS] stays first through every reduction
    torch.testing.assert_close(size.sum(1), torch.full((8,), float(n0)))  # EViT's fused and ToMe's merged sizes
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params)
    assert min(losses[-3:]) < losses[0]
