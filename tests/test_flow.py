"""Flow attention (Flowformer): the library's explicit reference and its chunked form
against formulas written out here, independently of the library code — the noncausal
equations of the paper and a token-by-token recurrence of the causal form."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo import decoding
from attnzoo.errors import AttentionInputError, UnsupportedPattern

EPS = 1e-6
IMPLS = ["reference", "chunk"]


def qkv(B=2, Hq=2, Hkv=2, Nq=30, Nk=30, D=8, Dv=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=dtype))


def flow_noncausal(q, k, v, eps=EPS, clamp=None):
    """The paper's equations, one (batch, head) at a time; k, v have q's heads."""
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            pq, pk, vv = torch.sigmoid(q[b, h]), torch.sigmoid(k[b, h]), v[b, h]
            nq, nk = pq.shape[0], pk.shape[0]
            incoming = torch.stack([pq[i] @ pk.sum(0) for i in range(nq)])  # I_i = φ(q_i)·Σ_j φ(k_j)
            outgoing = torch.stack([pk[j] @ pq.sum(0) for j in range(nk)])  # O_j = φ(k_j)·Σ_i φ(q_i)
            in_hat = torch.stack([sum(pq[i] @ pk[j] / (outgoing[j] + eps) for j in range(nk)) for i in range(nq)])
            out_hat = torch.stack([sum(pk[j] @ pq[i] / (incoming[i] + eps) for i in range(nq)) for j in range(nk)])
            if clamp is not None:
                out_hat = out_hat.clamp(-clamp, clamp)
            compete = torch.exp(out_hat) / torch.exp(out_hat).sum() * nk
            alloc = torch.sigmoid(in_hat * nq / nk)
            for i in range(nq):
                acc = sum((pq[i] @ pk[j]) * compete[j] * vv[j] for j in range(nk))
                out[b, h, i] = alloc[i] * acc / (incoming[i] + eps)
    return out


def flow_recurrent(q, k, v, kpm=None, eps=EPS, clamp=None):
    """The causal form as an RNN, one token at a time (k, v have q's heads):

    ksum += φk_t; qsum += φq_t; I_t = φq_t·ksum; O_t = φk_t·qsum
    kw += φk_t r_t / O_t; qw += φq_t n_t / I_t; Î_t = φq_t·kw / n_t; Ô_t = φk_t·qw / r_t
    Z += exp(Ô_t); c_t = n_t exp(Ô_t) / Z; S += φk_t (c_t v_t)ᵀ
    o_t = sigmoid(Î_t) φq_t S / I_t
    with r_t = t + 1 and n_t the number of real keys so far (padded keys: φk = 0, no c).
    """
    B, H, N, D = q.shape
    out = torch.zeros(B, H, N, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            ksum = torch.zeros(D, dtype=q.dtype)
            qsum, kw, qw = ksum.clone(), ksum.clone(), ksum.clone()
            Z, n = 0.0, 0
            S = torch.zeros(D, v.shape[-1], dtype=q.dtype)
            for t in range(N):
                real = kpm is None or bool(kpm[b, t])
                pq = torch.sigmoid(q[b, h, t])
                pk = torch.sigmoid(k[b, h, t]) * (1.0 if real else 0.0)
                r, n = t + 1, n + (1 if real else 0)
                ksum, qsum = ksum + pk, qsum + pq
                incoming, outgoing = pq @ ksum, pk @ qsum
                kw = kw + pk * r / (outgoing + eps)
                qw = qw + pq * n / (incoming + eps)
                in_hat = pq @ kw / max(n, 1)
                out_hat = pk @ qw / r
                if clamp is not None:
                    out_hat = out_hat.clamp(-clamp, clamp)
                if real:
                    Z = Z + torch.exp(out_hat)
                    S = S + torch.outer(pk, n * torch.exp(out_hat) / Z * v[b, h, t])
                out[b, h, t] = torch.sigmoid(in_hat) * (pq @ S) / (incoming + eps)
    return out


# ----------------------------------------------------------------------------- noncausal


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("Nq,Nk", [(13, 13), (9, 17), (21, 5)])
def test_noncausal_is_paper_formula(impl, Nq, Nk):
    q, k, v = qkv(Nq=Nq, Nk=Nk)
    got = az.attention(q, k, v, method="flow", impl=impl)
    torch.testing.assert_close(got, flow_noncausal(q, k, v))


@pytest.mark.parametrize("impl", IMPLS)
def test_official_clamp_option(impl):
    q, k, v = qkv(Nq=20, Nk=6)  # Ô ~ Nq / Nk > 1: the clamp acts
    expected = flow_noncausal(q, k, v, clamp=1.0)
    torch.testing.assert_close(az.attention(q, k, v, method="flow", impl=impl, clamp=1.0), expected)
    assert not torch.allclose(expected, flow_noncausal(q, k, v))
    for bad in (0.0, -1.0):  # clamp(-c, c) with c <= 0 would set every Ô to c
        with pytest.raises(AttentionInputError, match="option clamp must be a positive number"):
            az.attention(q, k, v, method="flow", impl=impl, clamp=bad)


@pytest.mark.parametrize("impl", IMPLS)
def test_noncausal_padding_equals_removing_the_keys(impl):
    q, k, v = qkv(Nq=11, Nk=16)
    kpm = torch.ones(2, 16, dtype=torch.bool)
    kpm[0, 12:] = False
    kpm[1, :5] = False
    got = az.attention(q, k, v, method="flow", impl=impl, key_mask=kpm)
    for b in range(2):
        keep = kpm[b]
        expected = flow_noncausal(q[b:b + 1], k[b:b + 1, :, keep], v[b:b + 1, :, keep])
        torch.testing.assert_close(got[b:b + 1], expected)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_fully_padded_rows_are_zero(impl, causal):
    q, k, v = qkv(Nq=10, Nk=10)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[0] = False  # nothing to attend to at all
    kpm[1, :4] = False  # causal: the first 4 rows see no real key
    out = az.attention(q, k, v, method="flow", impl=impl, causal=causal, key_mask=kpm)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    if causal:
        assert torch.equal(out[1, :, :4], torch.zeros_like(out[1, :, :4]))
        assert out[1, :, 4:].abs().sum() > 0


# -------------------------------------------------------------------------------- causal


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N", [1, 7, 40])
def test_causal_equals_token_recurrence(impl, N):
    q, k, v = qkv(Nq=N, Nk=N)
    got = az.attention(q, k, v, method="flow", impl=impl, causal=True, chunk=8) if impl == "chunk" else \
        az.attention(q, k, v, method="flow", impl=impl, causal=True)
    torch.testing.assert_close(got, flow_recurrent(q, k, v))


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_with_padding_and_clamp_equals_token_recurrence(impl):
    q, k, v = qkv(Nq=25, Nk=25)
    q = q * 3
    kpm = torch.ones(2, 25, dtype=torch.bool)
    kpm[0, 18:] = False
    kpm[1, :3] = False
    kpm[1, 10:13] = False
    for clamp in (None, 1.0):
        got = az.attention(q, k, v, method="flow", impl=impl, causal=True, key_mask=kpm, clamp=clamp)
        torch.testing.assert_close(got, flow_recurrent(q, k, v, kpm, clamp=clamp))


def test_causal_chunk_size_does_not_matter():
    q, k, v = qkv(Nq=50, Nk=50)
    base = az.attention(q, k, v, method="flow", impl="reference", causal=True)
    for chunk in (1, 3, 16, 64, 100):
        torch.testing.assert_close(az.attention(q, k, v, method="flow", impl="chunk", causal=True, chunk=chunk), base)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_equals_repeated_heads(impl, causal):
    q, k, v = qkv(Hq=4, Hkv=2, Nq=12, Nk=12)
    got = az.attention(q, k, v, method="flow", impl=impl, causal=causal)
    rep = az.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), method="flow", impl=impl, causal=causal)
    torch.testing.assert_close(got, rep)


@pytest.mark.parametrize("causal", [False, True])
def test_weights_are_the_effective_matrix(causal):
    q, k, v = qkv(Nq=12, Nk=12)
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[1, 8:] = False
    out, w = az.attention(q, k, v, method="flow", causal=causal, key_mask=kpm, return_weights=True)
    assert w.shape == (2, 2, 12, 12)
    torch.testing.assert_close(w @ v, out)
    assert torch.equal(w[1, :, :, 8:], torch.zeros_like(w[1, :, :, 8:]))
    if causal:
        assert torch.equal(w.triu(1), torch.zeros_like(w))


def test_causal_cross_is_unsupported():
    q, k, v = qkv(Nq=5, Nk=9)
    with pytest.raises(UnsupportedPattern, match="noncausal_self"):
        az.attention(q, k, v, method="flow", causal=True)


# ------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decoding_in_uneven_chunks_equals_forward_and_recurrence(dtype):
    q, k, v = qkv(Hq=4, Hkv=2, Nq=31, Nk=31, dtype=dtype)
    full = az.attention(q, k, v, method="flow", causal=True)
    state = decoding.init_state("flow", 2, 2, 8, 6, dtype=dtype)
    outs, t = [], 0
    for size in (1, 4, 1, 1, 9, 2, 13):
        outs.append(decoding.step("flow", state, q[:, :, t:t + size], k[:, :, t:t + size], v[:, :, t:t + size]))
        t += size
    assert t == 31
    got = torch.cat(outs, dim=2)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got, full, atol=tol, rtol=tol)
    expected = flow_recurrent(q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1))
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)
    # the state is constant-size: D·Dv + 4·D + 1 numbers per query head
    assert state.nbytes() == 2 * 4 * (8 * 6 + 4 * 8 + 1) * torch.finfo(dtype).bits // 8


def test_decoding_state_rejects_other_heads():
    q, k, v = qkv(Nq=3, Nk=3)
    state = decoding.init_state("flow", 2, 2, 8, 6, dtype=torch.float64)
    decoding.step("flow", state, q, k, v)
    q2, k2, v2 = qkv(Hq=4, Hkv=4, Nq=1, Nk=1)
    with pytest.raises(AttentionInputError, match=r"decoding state was made for \(B, Hq, Hkv, D, Dv\) = \(2, 2, 2, 8, 6\), got \(2, 4, 4, 8, 6\)"):
        decoding.step("flow", state, q2, k2, v2)


# ------------------------------------------------------------------- numerics, gradients


def test_large_logits_stay_finite_and_accurate():
    """Large |q|, |k| make φ nearly 0/1 and Ô large: float32 fast paths stay finite and
    close to the float64 reference (stable softmax / logcumsumexp, no exp overflow)."""
    q, k, v = qkv(Nq=200, Nk=200, D=4, seed=3)
    q, k = q * 40, k * 40
    for causal in (False, True):
        ref = az.attention(q, k, v, method="flow", impl="reference", causal=causal)
        fast = az.attention(q.float(), k.float(), v.float(), method="flow", impl="chunk", causal=causal)
        assert torch.isfinite(ref).all() and torch.isfinite(fast).all()
        torch.testing.assert_close(fast.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_chunk(causal):
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Nq=6, Nk=6, D=3, Dv=2)
    kpm = torch.tensor([[True, True, False, True, True, True]])
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    fn = lambda a, b, c: az.attention(a, b, c, method="flow", impl="chunk", causal=causal, key_mask=kpm,
                                      chunk=4)
    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("causal", [False, True])
def test_chunk_never_saves_an_n_by_n_tensor(causal):
    N = 1024  # the causal kernel keeps (N/C) C×C blocks: N·C = N²/16 numbers
    q, k, v = qkv(B=1, Hq=1, Hkv=1, Nq=N, Nk=N, D=8, Dv=8, dtype=torch.float32)
    q.requires_grad_(True)
    biggest = []

    def pack(t):
        biggest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        az.attention(q, k, v, method="flow", impl="chunk", causal=causal).sum().backward()
    assert 0 < max(biggest) < N * N // 8
    biggest.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        az.attention(q, k, v, method="flow", impl="reference", causal=causal).sum()
    assert max(biggest) >= N * N  # the check can see an N×N tensor when there is one
