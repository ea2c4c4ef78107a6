"""landmark and hip (content-routed sparse attention): both selections (the reference's
plain one and the fast form's vectorised one) against brute force, ties included, fast
vs reference in float64 with gradients, a wrong selection in the fast form caught by the
contract's comparison, causal alignment, padding, decoding, the no-N×N probe and the
needle-recall test."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import LargestTensor

import attnzoo as az
from attnzoo import decoding, stats
from attnzoo.errors import AttentionInputError, UnsupportedImpl
from attnzoo.methods.sparse import hip, landmark

from helpers import CASES, assert_three_way, call, make_inputs, run

NEG = float("-inf")


def _inputs(B, Hq, Hkv, Nq, Nk, D=16, Dv=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=dtype)
    return q, k, v


def _padding(B, Nk):
    kpm = torch.ones(B, Nk, dtype=torch.bool)
    kpm[-1, Nk - Nk // 3:] = False
    kpm[0, 3] = False  # a hole inside a block too
    return kpm


SHAPES = [  # causal, Nq, Nk
    (True, 63, 63),
    (True, 30, 70),
    (True, 70, 45),
    (False, 63, 63),
]


# ----------------------------------------------------------------------------- landmark


def brute_landmark_select(q, k, kpm, causal, bs, topk, scale):
    """{(b, h, i): set of blocks} by Python loops over the definition (the selection
    arithmetic: float32-rounded inputs and landmarks, float64 scores; ties: lower block)."""
    q, k = q.float().double(), k.float().double()
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nkb = math.ceil(Nk / bs)
    lms = {}
    for b in range(B):
        for hk in range(Hkv):
            for blk in range(nkb):
                keys = [j for j in range(blk * bs, min(Nk, (blk + 1) * bs)) if kpm is None or bool(kpm[b, j])]
                lms[b, hk, blk] = torch.stack([k[b, hk, j] for j in keys]).mean(0).float().double() if keys else None
    out = {}
    for b in range(B):
        for h in range(Hq):
            for i in range(Nq):
                p = i + Nk - Nq
                if p < 0:
                    out[b, h, i] = set()
                    continue
                own = p // bs
                cands = [blk for blk in range(nkb) if (blk < own if causal else blk != own)
                         and lms[b, h // G, blk] is not None]
                scored = sorted(cands, key=lambda blk: (-float(scale * (q[b, h, i] @ lms[b, h // G, blk])), blk))
                out[b, h, i] = {own, *scored[:topk]}
    return out


@pytest.mark.parametrize("causal,nq,nk", SHAPES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_landmark_selection_equals_brute_force(causal, nq, nk, padded, ties):
    """Both programs' selections equal the definition; with ``ties`` every block holds the
    same keys, so all landmarks (and scores) are equal and the lower index must win."""
    q, k, _ = _inputs(2, 4, 2, nq, nk)
    if ties:
        k = k[:, :, :8].repeat(1, 1, -(-nk // 8), 1)[:, :, :nk]
    kpm = _padding(2, nk) if padded else None
    idx, valid = landmark.select(q, k, causal=causal, key_mask=kpm, scale=0.25, block_size=8, topk=3)
    ref = landmark.reference_select(q, k, causal=causal, key_mask=kpm, scale=0.25, block_size=8, topk=3)
    want = brute_landmark_select(q, k, kpm, causal, 8, 3, 0.25)
    for (b, h, i), blocks in want.items():
        got = {int(x) for x, ok in zip(idx[b, h, i], valid[b, h, i]) if ok}
        assert got == blocks, (b, h, i)
        assert len(got) == int(valid[b, h, i].sum())  # no block twice
        assert {int(x) for x in torch.nonzero(ref[b, h, i]).flatten()} == blocks, (b, h, i)


@pytest.mark.parametrize("causal,nq,nk", SHAPES)
@pytest.mark.parametrize("padded", [False, True])
def test_landmark_fast_matches_reference_float64(causal, nq, nk, padded):
    q, k, v = _inputs(2, 4, 2, nq, nk)
    kpm = _padding(2, nk) if padded else None
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(1, 4, nq, nk, generator=g) > 0.2
    dout = torch.randn(2, 4, nq, 8, generator=g, dtype=torch.float64)
    res = []
    for impl in ("reference", "gather"):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = az.attention(qq, kk, vv, method="landmark", impl=impl, causal=causal, key_mask=kpm, mask=mask,
                           cross=nq != nk, block_size=8, topk=2)
        res.append([out, *torch.autograd.grad(out, (qq, kk, vv), dout)])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert torch.isfinite(res[1][0]).all()


def test_landmark_reference_attends_exactly_the_selected_keys():
    q, k, v = _inputs(1, 2, 2, 40, 40)
    _, w = az.attention(q, k, v, method="landmark", impl="reference", causal=True, block_size=8, topk=1,
                        return_weights=True)
    want = brute_landmark_select(q, k, None, True, 8, 1, 16 ** -0.5)
    for (b, h, i), blocks in want.items():
        keys = {j for j in range(i + 1) if j // 8 in blocks}
        assert {int(j) for j in torch.nonzero(w[b, h, i] > 0).flatten()} == keys


def brute_grouped_weights(q, k, kpm, causal, bs, scale, landmarks=None):
    """The paper's grouped softmax written out per query."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nkb = math.ceil(Nk / bs)
    w = torch.zeros(B, Hq, Nq, Nk, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = k[b, h // G]
            for i in range(Nq):
                p = i + Nk - Nq
                if p < 0:
                    continue
                own = p // bs
                vis = [j for j in range(Nk) if (not causal or j <= p) and (kpm is None or bool(kpm[b, j]))]
                own_keys = [j for j in vis if j // bs == own]
                terms = {("k", j): float(scale * q[b, h, i] @ kh[j]) for j in own_keys}
                groups = {}
                for blk in range(nkb):
                    if blk == own or (causal and blk > own):
                        continue
                    keys = [j for j in vis if j // bs == blk]
                    real = [j for j in range(blk * bs, min(Nk, (blk + 1) * bs)) if kpm is None or bool(kpm[b, j])]
                    if not keys or not real:
                        continue
                    lm = landmarks[b, h // G, blk] if landmarks is not None else torch.stack([kh[j] for j in real]).mean(0)
                    terms[("l", blk)] = float(scale * q[b, h, i] @ lm)
                    groups[blk] = keys
                if not terms:
                    continue
                mx = max(terms.values())
                Z = sum(math.exp(s - mx) for s in terms.values())
                for (kind, x), s in terms.items():
                    pw = math.exp(s - mx) / Z
                    if kind == "k":
                        w[b, h, i, x] += pw
                    else:
                        sc = torch.tensor([float(scale * q[b, h, i] @ kh[j]) for j in groups[x]], dtype=torch.float64)
                        for j, pj in zip(groups[x], torch.softmax(sc, 0)):
                            w[b, h, i, j] += pw * float(pj)
    return w


@pytest.mark.parametrize("causal,nq,nk", SHAPES)
def test_landmark_grouped_softmax_equals_brute_force(causal, nq, nk):
    q, k, v = _inputs(2, 2, 1, nq, nk, D=8)
    kpm = _padding(2, nk)
    out, w = az.attention(q, k, v, method="landmark", mode="grouped", causal=causal, key_mask=kpm,
                          cross=nq != nk, block_size=8, return_weights=True)
    want = brute_grouped_weights(q, k, kpm, causal, 8, 8 ** -0.5)
    torch.testing.assert_close(w, want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out, want @ v.expand(2, 2, nk, 8), atol=1e-12, rtol=1e-10)
    rows = w.sum(-1)
    assert torch.allclose(rows[rows > 0], torch.ones_like(rows[rows > 0]))


def test_landmark_grouped_given_landmarks_and_gradient_through_the_gates():
    q, k, v = _inputs(1, 2, 2, 24, 24, D=8)
    g = torch.Generator().manual_seed(3)
    lms = torch.randn(1, 2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    _, w = az.attention(q, k, v, method="landmark", mode="grouped", causal=True, block_size=8, landmarks=lms,
                        return_weights=True)
    torch.testing.assert_close(w, brute_grouped_weights(q, k, None, True, 8, 8 ** -0.5, lms.detach()),
                               atol=1e-12, rtol=1e-10)
    (glm,) = torch.autograd.grad(w[..., :8].sum(), lms)  # block 0's mass depends on its landmark
    assert glm[:, :, 0].abs().sum() > 0
    with pytest.raises(UnsupportedImpl, match="grouped"):
        az.attention(q, k, v, method="landmark", mode="grouped", impl="gather", causal=True, block_size=8)


def test_landmark_option_errors():
    q, k, v = _inputs(1, 2, 2, 24, 24)
    with pytest.raises(AttentionInputError, match="landmarks must be"):
        az.attention(q, k, v, method="landmark", block_size=8, landmarks=torch.zeros(1, 2, 2, 16, dtype=torch.float64))
    with pytest.raises(AttentionInputError, match="mode"):
        az.attention(q, k, v, method="landmark", mode="soft")
    with pytest.raises(AttentionInputError, match="block_size"):
        az.attention(q, k, v, method="landmark", block_size=0)


def test_landmark_causal_alignment_lower_right():
    """Per-query retrieval: the last Nq rows of causal self-attention equal causal cross
    with Nq queries (lower-right), and future keys never matter."""
    q, k, v = _inputs(2, 2, 2, 90, 90)
    full = az.attention(q, k, v, method="landmark", causal=True, block_size=8, topk=2)
    tail = az.attention(q[:, :, -25:], k, v, method="landmark", causal=True, block_size=8, topk=2)
    torch.testing.assert_close(tail, full[:, :, -25:], atol=1e-12, rtol=1e-12)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 50:] += 3.0
    v2[:, :, 50:] -= 3.0
    other = az.attention(q, k2, v2, method="landmark", causal=True, block_size=8, topk=2)
    torch.testing.assert_close(other[:, :, :50], full[:, :, :50], atol=1e-12, rtol=1e-12)
    assert not torch.allclose(other[:, :, 50:], full[:, :, 50:])


@pytest.mark.parametrize("impl", ["reference", "gather"])
def test_landmark_padding_is_ignored_and_empty_rows_are_zero(impl):
    q, k, v = _inputs(2, 2, 2, 40, 40)
    kpm = _padding(2, 40)
    a = az.attention(q, k, v, method="landmark", impl=impl, causal=True, key_mask=kpm, block_size=8, topk=2)
    k2, v2 = k.clone(), v.clone()
    k2[~kpm[:, None, :, None].expand_as(k)] = 50.0
    v2[~kpm[:, None, :, None].expand_as(v)] = 1e3
    b = az.attention(q, k2, v2, method="landmark", impl=impl, causal=True, key_mask=kpm, block_size=8, topk=2)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    kpm0 = torch.zeros(2, 40, dtype=torch.bool)
    kpm0[:, 10:] = True  # queries 0..9 see only padding
    z = az.attention(q, k, v, method="landmark", impl=impl, causal=True, key_mask=kpm0, block_size=8, topk=2)
    assert torch.isfinite(z).all() and z[:, :, :10].abs().max() == 0


def test_landmark_decoding_equals_forward_and_caches_one_landmark_per_block():
    B, Hq, Hkv, N, D = 1, 4, 2, 100, 16
    q, k, v = _inputs(B, Hq, Hkv, N, N, D=D)
    opts = {"block_size": 8, "topk": 3}
    full = az.attention(q, k, v, method="landmark", causal=True, **opts)
    state = decoding.init_state("landmark", B, Hkv, D, 8, dtype=torch.float64, **opts)
    outs = [decoding.step("landmark", state, q[:, :, :13], k[:, :, :13], v[:, :, :13], **opts)]
    for t in range(13, N):
        outs.append(decoding.step("landmark", state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], **opts))
        assert state.landmarks.shape[2] == (t + 1) // 8
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-12, rtol=1e-12)
    lm, _ = landmark.compute_landmarks(k.float(), None, 8)  # retrieval runs in float32
    torch.testing.assert_close(state.landmarks, lm[:, :, : N // 8])


# ----------------------------------------------------------------------------- hip


def brute_hip_layout(q, k, kpm, causal, bs, topk, scale, rep):
    """The tree search with Python lists, one query block at a time (float32-rounded
    inputs; ties: the lower segment start, then the lower end)."""
    q, k = q.float().double(), k.float().double()
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nqb, nkb = math.ceil(Nq / bs), math.ceil(Nk / bs)
    off = Nk - Nq
    lay = torch.zeros(B, Hq, nqb, nkb, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            kh = k[b, h // G]
            norms = [float(kh[j].norm()) if kpm is None or bool(kpm[b, j]) else NEG for j in range(Nk)]
            for t in range(nqb):
                rows = range(t * bs, min(Nq, (t + 1) * bs))
                p0, p1 = t * bs + off, rows[-1] + off
                if causal:
                    if p1 < 0:
                        continue
                    lo, hi = max(p0, 0) // bs, p1 // bs
                    H = lo
                else:
                    lo, hi = min(max(p0, 0), Nk - 1) // bs, min(max(p1, 0), Nk - 1) // bs
                    H = nkb
                for blk in range(lo, hi + 1):
                    lay[b, h, t, blk] = True

                def score(seg, b=b, h=h, kh=kh, rows=rows, norms=norms):
                    ka, kb = seg[0] * bs, min(seg[1] * bs, Nk)
                    if kb <= ka:
                        return NEG
                    if rep == "middle":
                        r = (ka + kb - 1) // 2
                    elif rep == "first":
                        r = ka
                    else:
                        r = max(range(ka, kb), key=lambda j: (norms[j], -j))  # noqa: B023
                    if kpm is not None and not bool(kpm[b, r]):
                        return NEG
                    return max(float(scale * (q[b, h, i] @ kh[r])) for i in rows)

                m = 2 * topk
                segs = [((s * H) // m, ((s + 1) * H) // m) for s in range(m)]
                while True:
                    sc = [score(s) for s in segs]
                    order = sorted(range(len(segs)), key=lambda x: (-sc[x], segs[x][0], segs[x][1]))[:topk]
                    segs, kept = [segs[x] for x in order], [sc[x] for x in order]
                    if max(max(e - s, 0) for s, e in segs) <= 1:
                        break
                    firsts, seconds = [], []
                    for s, e in segs:
                        n = max(e - s, 0)
                        mid = s + n // 2 if n >= 2 else e
                        firsts.append((s, mid))
                        seconds.append((mid, e))
                    segs = firsts + seconds
                for (s, e), sc_ in zip(segs, kept):
                    if e - s == 1 and sc_ > NEG:
                        lay[b, h, t, s] = True
    return lay


@pytest.mark.parametrize("causal,nq,nk", SHAPES + [(True, 200, 200), (False, 150, 150)])
@pytest.mark.parametrize("rep", ["middle", "first", "max_norm"])
@pytest.mark.parametrize("ties", [False, True])
def test_hip_selection_equals_brute_force(causal, nq, nk, rep, ties):
    """Both programs' layouts equal the definition; with ``ties`` all keys are equal, so
    every representative scores the same and the lower position must win."""
    q, k, _ = _inputs(2, 4, 2, nq, nk)
    if ties:
        k = k[:, :, :1].expand(-1, -1, nk, -1).contiguous()
    kpm = _padding(2, nk)
    got = hip.select(q, k, causal=causal, key_mask=kpm, scale=0.25, block_size=8, topk=2, representative=rep)
    ref = hip.reference_layout(q, k, causal=causal, key_mask=kpm, scale=0.25, block_size=8, topk=2,
                               representative=rep)
    want = brute_hip_layout(q, k, kpm, causal, 8, 2, 0.25, rep)
    assert torch.equal(got, want)
    assert torch.equal(ref, want)
    # sparse: at most topk searched blocks plus the own blocks per query block
    assert int(got.sum(-1).max()) <= 2 + 2


def test_hip_sparse_table_range_argmax():
    g = torch.Generator().manual_seed(0)
    norms = torch.randn(2, 3, 37, generator=g, dtype=torch.float64)
    norms[0, 0, 5:9] = 7.0  # ties: the lower position wins
    norms[1, 2, 30:] = NEG
    table = hip._sparse_table(norms)
    a = torch.tensor([[[a_ for a_ in range(37) for _ in range(a_ + 1, 38)]]]).expand(2, 3, -1)
    b = torch.tensor([[[b_ for a_ in range(37) for b_ in range(a_ + 1, 38)]]]).expand(2, 3, -1)
    got = hip._range_argmax(table, norms, a.contiguous(), b.contiguous())
    for bi in range(2):
        for h in range(3):
            for n, (x, y) in enumerate(zip(a[0, 0].tolist(), b[0, 0].tolist())):
                want = max(range(x, y), key=lambda j: (float(norms[bi, h, j]), -j))
                assert int(got[bi, h, n]) == want


@pytest.mark.parametrize("causal,nq,nk", SHAPES)
@pytest.mark.parametrize("rep", ["middle", "max_norm"])
def test_hip_fast_matches_reference_float64(causal, nq, nk, rep):
    q, k, v = _inputs(2, 4, 2, nq, nk)
    kpm = _padding(2, nk)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(1, 4, nq, nk, generator=g) > 0.2
    dout = torch.randn(2, 4, nq, 8, generator=g, dtype=torch.float64)
    res = []
    for impl in ("reference", "block"):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = az.attention(qq, kk, vv, method="hip", impl=impl, causal=causal, key_mask=kpm, mask=mask,
                           cross=nq != nk, block_size=8, topk=2, representative=rep)
        res.append([out, *torch.autograd.grad(out, (qq, kk, vv), dout)])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_hip_causal_alignment_and_future_keys():
    q, k, v = _inputs(1, 2, 2, 96, 96)
    lay = hip.select(q, k, causal=True, key_mask=None, scale=0.25, block_size=8, topk=2)
    nb = lay.shape[-1]
    assert not (lay & torch.ones(nb, nb, dtype=torch.bool).triu(1)).any()  # no future block
    assert lay[..., torch.arange(nb), torch.arange(nb)].all()  # the diagonal block
    full = az.attention(q, k, v, method="hip", causal=True, block_size=8, topk=2)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 53:] *= -2.0
    v2[:, :, 53:] += 1.0
    other = az.attention(q, k2, v2, method="hip", causal=True, block_size=8, topk=2)
    torch.testing.assert_close(other[:, :, :53], full[:, :, :53], atol=1e-12, rtol=1e-12)
    # lower-right: 20 queries against 96 keys sit at positions 76..95 (blocks 9..11)
    lay_x = hip.select(q[:, :, -20:], k, causal=True, key_mask=None, scale=0.25, block_size=8, topk=2)
    assert lay_x.shape[2:] == (3, 12)
    assert lay_x[0, 0, 0, 9:11].all() and not lay_x[0, 0, 0, 11]  # queries 0-7 = positions 76..83


@pytest.mark.parametrize("impl", ["reference", "block"])
def test_hip_padding_is_ignored_and_empty_rows_are_zero(impl):
    q, k, v = _inputs(2, 2, 2, 64, 64)
    kpm = _padding(2, 64)
    opts = {"method": "hip", "impl": impl, "causal": True, "key_mask": kpm, "block_size": 8, "topk": 2,
            "representative": "max_norm"}
    a = az.attention(q, k, v, **opts)
    k2, v2 = k.clone(), v.clone()
    k2[~kpm[:, None, :, None].expand_as(k)] = 50.0  # huge padded keys: max_norm must still skip them
    v2[~kpm[:, None, :, None].expand_as(v)] = 1e3
    torch.testing.assert_close(a, az.attention(q, k2, v2, **opts), atol=1e-12, rtol=1e-12)
    kpm0 = torch.zeros(2, 64, dtype=torch.bool)
    kpm0[:, 20:] = True
    z = az.attention(q, k, v, **{**opts, "key_mask": kpm0})
    assert torch.isfinite(z).all() and z[:, :, :20].abs().max() == 0


def test_hip_option_errors():
    q, k, v = _inputs(1, 2, 2, 24, 24)
    with pytest.raises(AttentionInputError, match="representative"):
        az.attention(q, k, v, method="hip", representative="mean")
    with pytest.raises(AttentionInputError, match="topk"):
        az.attention(q, k, v, method="hip", topk=0)


# ----------------------------------------------------------------------------- both


@pytest.mark.parametrize("method,impl,opts", [
    ("landmark", "gather", {"block_size": 64, "topk": 4}),
    ("hip", "block", {"block_size": 64, "topk": 4}),
    ("hip", "block", {"block_size": 64, "topk": 4, "representative": "max_norm"}),
])
def test_never_allocates_n_by_n(method, impl, opts):
    N, D = 8192, 16
    q, k, v = (torch.randn(1, 1, N, D, requires_grad=True) for _ in range(3))
    probe = LargestTensor()
    with probe:
        out = az.attention(q, k, v, method=method, causal=True, impl=impl, **opts)
        out.sum().backward()
    assert probe.largest < N * N // 4, f"a tensor of {probe.largest} elements (N² = {N * N})"
    assert torch.isfinite(q.grad).all() and k.grad.abs().sum() > 0


def _needle(Nk=4096, Nq=64, D=64, seed=0):
    """Random q, k, v; key ``j*`` is a strong match of query ``i*`` (the needle)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, Nq, D, generator=g)
    k = torch.randn(1, 1, Nk, D, generator=g)
    v = torch.randn(1, 1, Nk, D, generator=g)
    i_star, j_star = Nq - 10, 1234
    k[0, 0, j_star] = 60.0 * q[0, 0, i_star] / q[0, 0, i_star].norm()
    return q, k, v, i_star, j_star


@pytest.mark.parametrize("method,impl,opts", [
    ("landmark", "gather", {"block_size": 64, "topk": 3}),
    ("hip", "block", {"block_size": 32, "topk": 4, "representative": "max_norm"}),
])
def test_recall_of_a_planted_needle_with_under_ten_percent_of_the_keys(method, impl, opts):
    q, k, v, i_star, j_star = _needle()
    with stats.collect() as st:
        out = az.attention(q, k, v, method=method, impl=impl, causal=True, **opts)
    density = st["density"][-1]
    assert density < 0.1, density
    # the needle's value dominates the output of its query ...
    cos = torch.nn.functional.cosine_similarity(out[0, 0, i_star], v[0, 0, j_star], dim=0)
    assert cos > 0.99, float(cos)
    torch.testing.assert_close(out[0, 0, i_star], v[0, 0, j_star], atol=1e-3, rtol=1e-3)
    # ... and without the needle key it is gone (the check can fail)
    k_plain = k.clone()
    k_plain[0, 0, j_star] = torch.randn(64, generator=torch.Generator().manual_seed(9))
    out2 = az.attention(q, k_plain, v, method=method, impl=impl, causal=True, **opts)
    assert torch.nn.functional.cosine_similarity(out2[0, 0, i_star], v[0, 0, j_star], dim=0) < 0.5


def test_hip_takes_a_mask_mod_without_densifying_it():
    """Review regression: the fast path evaluates a mask_mod per kept tile (no N×N mask)."""
    from attnzoo import masks as azm
    from helpers import LargestTensor

    g = torch.Generator().manual_seed(3)
    N = 4096
    q, k, v = (torch.randn(1, 1, N, 16, generator=g) for _ in range(3))
    mod = azm.document_mask(torch.arange(N) // 700)
    probe = LargestTensor()
    with probe, torch.no_grad():
        got = az.attention(q, k, v, method="hip", causal=True, mask=mod, impl="block")
    assert probe.largest < N * N // 4
    small = slice(0, 300)
    ref = az.attention(q[:, :, small], k[:, :, small], v[:, :, small], method="hip", causal=True,
                       mask=azm.document_mask(torch.arange(300) // 70), impl="reference")
    fast = az.attention(q[:, :, small], k[:, :, small], v[:, :, small], method="hip", causal=True,
                        mask=azm.document_mask(torch.arange(300) // 70), impl="block")
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=2e-5)
    assert torch.isfinite(got).all()


# ----------------------------------------------------------------- wrong selections are caught


def _compare(method, impl, pattern, case=CASES[2]):
    """The contract's comparison: fast (float32) vs the reference in float32 and float64,
    outputs and q/k/v gradients, by the three-way rule."""
    spec = az.get(method)
    causal, cross = pattern.startswith("causal"), pattern.endswith("cross")
    q, k, v, kpm, dout = make_inputs(case, pattern)
    options = spec.sized_options(max(q.shape[2], k.shape[2]))
    low = [t.float() for t in (q, k, v)]
    ref64 = run(call(method, "reference", causal, kpm, cross, **options), q, k, v, dout)
    ref32 = run(call(method, "reference", causal, kpm, cross, **options), *low, dout)
    fast = run(call(method, impl, causal, kpm, cross, **options), *low, dout)
    assert_three_way(fast, ref32, ref64, spec.get_impl(impl).fudge or spec.fudge, torch.float32)


@pytest.mark.parametrize("pattern", ["causal_self", "causal_cross", "noncausal_self"])
def test_contract_catches_a_dropped_landmark_block(monkeypatch, pattern):
    """The reference selects by its own program: a fast form whose selection loses one
    retrieved block (of one query) fails the contract's comparison."""
    landmark_select = landmark.select

    def lossy(*args, **kwargs):
        idx, valid = landmark_select(*args, **kwargs)
        valid = valid.clone()
        b, h, i = (int(x[-1]) for x in torch.nonzero(valid[..., 1]).unbind(-1))  # the last query that retrieves
        valid[b, h, i, 1] = False  # its best-scoring retrieved block
        return idx, valid

    _compare("landmark", "gather", pattern)
    monkeypatch.setattr(landmark, "select", lossy)
    with pytest.raises(AssertionError, match="err\\(fast\\)"):
        _compare("landmark", "gather", pattern)


@pytest.mark.parametrize("pattern", ["causal_self", "causal_cross", "noncausal_self"])
def test_contract_catches_a_dropped_hip_block(monkeypatch, pattern):
    """The reference searches by its own program: a fast form whose search loses one
    kept block (of one query block and head) fails the contract's comparison."""
    hip_select = hip.select

    def lossy(*args, **kwargs):
        layout = hip_select(*args, **kwargs).clone()
        flat = layout.view(-1, layout.shape[-1])
        row = int(flat.sum(-1).argmax())  # the query block that keeps the most blocks
        flat[row, int(torch.nonzero(flat[row])[0])] = False  # loses its first
        return layout

    _compare("hip", "block", pattern)
    monkeypatch.setattr(hip, "select", lossy)
    with pytest.raises(AssertionError, match="err\\(fast\\)"):
        _compare("hip", "block", pattern)


# ----------------------------------------------------------------------------- sizing


@pytest.mark.parametrize("method", ["landmark", "hip"])
def test_sized_options_are_sparse_at_short_lengths_and_the_defaults_at_long_ones(method):
    """for_length: 8 blocks of N/8 and two retrieved at task lengths (a query sees about
    three eighths of the keys, noncausal), the library defaults (64, 4) from long lengths on."""
    spec = az.get(method)
    for n in (32, 64, 256):
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, 4, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
        _, w = az.attention(q, k, v, method=method, impl="reference", return_weights=True, **spec.sized_options(n))
        assert 0.1 < float((w > 0).double().mean()) < 0.4, n
    assert spec.sized_options(4096) == {"block_size": spec.options["block_size"], "topk": spec.options["topk"]}
    assert all(v >= 1 for v in spec.sized_options(1).values())
