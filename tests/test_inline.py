"""InLine attention ("Bridging the Divide: Reconsidering Softmax and Linear Attention"):
the maths written out independently, the recurrent form, decoding, the local term and
its learnable module.

For query i with visible keys V_i (n_i = |V_i|; causal lower-right: j <= i + Nk - Nq;
padded keys never visible):

    κ_ij   = scale / n_i · φ(q_i)·φ(k_j)
    InL_ij = κ_ij - (1/n_i) Σ_{s∈V_i} κ_is + 1/n_i
    O_i    = Σ_{j∈V_i} InL_ij v_j + Σ_t w_t v_{p_i - left + t}

with p_i = i (noncausal) or i + Nk - Nq (causal), left = ⌊(k-1)/2⌋ noncausal ("same")
or k - 1 causal, and values outside [0, Nk) (or padded) zero.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo import decoding

from helpers import LargestTensor

inline = importlib.import_module("attnzoo.methods.linear.inline")

PHI = {
    "relu": lambda x: x.clamp(min=0),
    "elu": lambda x: torch.where(x > 0, x + 1, torch.exp(x)),
    "identity": lambda x: x,
}


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def formula(q, k, v, *, causal, kpm=None, feature_map="relu", local_weight=None, scale=None):
    """Row by row, straight from the definition (float64, Python loops)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = D**-0.5 if scale is None else scale
    phi = PHI[feature_map]
    out = torch.zeros(B, Hq, Nq, Dv, dtype=q.dtype)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            for i in range(Nq):
                p = i + Nk - Nq if causal else i
                vis = [j for j in range(Nk) if (not causal or j <= p) and (kpm is None or bool(kpm[b, j]))]
                n = len(vis)
                if n:
                    kappa = {j: scale / n * float(phi(q[b, h, i]) @ phi(k[b, hk, j])) for j in vis}
                    mean = sum(kappa.values()) / n
                    for j in vis:
                        out[b, h, i] += (kappa[j] - mean + 1.0 / n) * v[b, hk, j]
                if local_weight is not None:
                    ks = local_weight.shape[-1]
                    left = ks - 1 if causal else (ks - 1) // 2
                    for t in range(ks):
                        j = p - left + t
                        if 0 <= j < Nk and (kpm is None or bool(kpm[b, j])):
                            out[b, h, i] += local_weight[h, :, t] * v[b, hk, j]
    return out


def recurrent(q, k, v, *, kpm=None, feature_map="relu", local_weight=None, scale=None):
    """The causal form as an RNN over tokens: state S = Σφ(k)vᵀ, z = Σφ(k), u = Σv, n,
    and the window of the last k values; keys before the first query (Nk > Nq) are
    absorbed first."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    phi = PHI[feature_map]
    S = torch.zeros(B, Hq, D, Dv, dtype=q.dtype)
    z = torch.zeros(B, Hq, D, dtype=q.dtype)
    u = torch.zeros(B, Hq, Dv, dtype=q.dtype)
    n = torch.zeros(B, 1, 1, dtype=q.dtype)
    ks = 0 if local_weight is None else local_weight.shape[-1]
    window = torch.zeros(B, Hq, max(ks, 1), Dv, dtype=q.dtype)
    out = torch.zeros(B, Hq, Nq, Dv, dtype=q.dtype)
    off = Nk - Nq
    for j in range(Nk):
        keep = torch.ones(B, 1, 1, dtype=q.dtype) if kpm is None else kpm[:, j].to(q.dtype).view(B, 1, 1)
        fk = phi(k[:, :, j]).repeat_interleave(G, dim=1)
        vj = v[:, :, j].repeat_interleave(G, dim=1)
        S = S + keep.unsqueeze(-1) * fk.unsqueeze(-1) * vj.unsqueeze(-2)
        z, u, n = z + keep * fk, u + keep * vj, n + keep
        window = torch.cat([window[:, :, 1:], (keep * vj).unsqueeze(2)], dim=2)
        i = j - off
        if i < 0:
            continue
        a = scale * phi(q[:, :, i]) / n.clamp(min=1)
        num = torch.einsum("bhd,bhde->bhe", a, S)
        den = (a * z).sum(-1, keepdim=True)
        out[:, :, i] = num + (1 - den) * u / n.clamp(min=1)
        if ks:
            out[:, :, i] += torch.einsum("hdt,bhtd->bhd", local_weight, window)
    return out


def call(q, k, v, impl, **kw):
    return az.attention(q, k, v, method="inline", impl=impl, **kw)


SHAPES = [  # (B, Hq, Hkv, Nq, Nk, D, Dv)
    (2, 2, 2, 9, 9, 5, 4),
    (1, 4, 2, 7, 12, 6, 3),  # GQA, Nq < Nk
    (2, 2, 1, 11, 6, 4, 5),  # MQA, Nq > Nk
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}Hq{s[1]}Hkv{s[2]}Nq{s[3]}Nk{s[4]}")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("feature_map", inline.FEATURE_MAPS)
@pytest.mark.parametrize("padding", [False, True], ids=["", "pad"])
def test_reference_and_chunk_equal_the_formula(shape, causal, feature_map, padding):
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    q, k, v = rand(B, Hq, Nq, D, seed=1), rand(B, Hkv, Nk, D, seed=2), rand(B, Hkv, Nk, Dv, seed=3)
    kpm = None
    if padding:
        kpm = torch.ones(B, Nk, dtype=torch.bool)
        kpm[-1, 1::3] = False  # holes, not only a padded tail
    local = rand(Hq, Dv, 3, seed=4) if (causal or Nq == Nk) else None
    kw = dict(causal=causal, key_mask=kpm, feature_map=feature_map, local_weight=local, scale=0.7)
    expected = formula(q, k, v, kpm=kpm, **{n: kw[n] for n in ("causal", "feature_map", "local_weight", "scale")})
    torch.testing.assert_close(call(q, k, v, "reference", **kw), expected, atol=1e-12, rtol=1e-12)
    for chunk in (1, 4, 64):
        torch.testing.assert_close(call(q, k, v, "chunk", chunk=chunk, **kw), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("nq,nk", [(13, 13), (9, 16), (16, 9)])
@pytest.mark.parametrize("ks", [0, 1, 3, 4])
def test_causal_token_loop_equals_reference_and_chunk(nq, nk, ks):
    """The recurrence (one token at a time) = the explicit N×N reference = the chunked scan."""
    q, k, v = rand(2, 4, nq, 6, seed=5), rand(2, 2, nk, 6, seed=6), rand(2, 2, nk, 5, seed=7)
    kpm = torch.ones(2, nk, dtype=torch.bool)
    kpm[0, :3] = False
    kpm[1, -4:] = False
    local = rand(4, 5, ks, seed=8) if ks else None
    loop = recurrent(q, k, v, kpm=kpm, local_weight=local, feature_map="elu")
    kw = dict(causal=True, key_mask=kpm, local_weight=local, feature_map="elu")
    torch.testing.assert_close(call(q, k, v, "reference", **kw), loop, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(call(q, k, v, "chunk", chunk=5, **kw), loop, atol=1e-12, rtol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_local_term_is_a_depthwise_convolution():
    """Noncausal taps are PyTorch's conv1d(padding="same"), causal ones a left-padded conv1d."""
    B, H, N, Dv = 2, 3, 10, 4
    v = rand(B, H, N, Dv, seed=9)
    q, k = torch.zeros(B, H, N, 5, dtype=torch.float64), torch.zeros(B, H, N, 5, dtype=torch.float64)
    for ks in (1, 3, 4):
        w = rand(H, Dv, ks, seed=10 + ks)
        x = v.permute(0, 1, 3, 2).reshape(B, H * Dv, N)
        same = F.conv1d(x, w.reshape(H * Dv, 1, ks), padding="same", groups=H * Dv)
        causal = F.conv1d(F.pad(x, (ks - 1, 0)), w.reshape(H * Dv, 1, ks), groups=H * Dv)
        for is_causal, conv in ((False, same), (True, causal)):
            expected = conv.reshape(B, H, Dv, N).permute(0, 1, 3, 2)
            # with q = k = 0 and relu, κ = 0: the global term is the mean of the visible values
            mean = v.cumsum(2) / torch.arange(1, N + 1).view(1, 1, N, 1) if is_causal else v.mean(2, keepdim=True)
            for impl in ("reference", "chunk"):
                out = call(q, k, v, impl, causal=is_causal, local_weight=w)
                torch.testing.assert_close(out - mean, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_rows_of_the_weights_sum_to_one(causal):
    q, k, v = rand(2, 2, 12, 8, seed=11), rand(2, 2, 9, 8, seed=12), rand(2, 2, 9, 4, seed=13)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, :5] = False
    out, w = call(q, k, v, "reference", causal=causal, key_mask=kpm, return_weights=True, scale=4.0)
    visible = kpm.view(2, 1, 1, 9).expand(2, 2, 12, 9).clone()
    if causal:
        visible &= torch.ones(12, 9, dtype=torch.bool).tril(diagonal=9 - 12)
    rows = visible.any(-1)
    torch.testing.assert_close(w.sum(-1)[rows], torch.ones(int(rows.sum()), dtype=w.dtype), atol=1e-13, rtol=0)
    assert (w[~visible] == 0).all()  # invisible pairs (future, padded) weigh exactly 0
    assert (out[~rows] == 0).all() and (~rows).any() == causal  # rows that see nothing (causal, Nq > Nk): zeros
    assert (w < 0).any()  # not a probability distribution: the row mean is subtracted
    torch.testing.assert_close(w @ v, out)  # without a local term the weights are the whole story


def test_injective_where_normalised_linear_attention_is_not():
    """The paper's point: φ(q) and 2φ(q) (same direction) get the same distribution
    from normalised linear attention, two different ones from InLine."""
    q1 = rand(1, 1, 1, 6, seed=14).abs()
    q = torch.cat([q1, 2 * q1], dim=2)
    k = rand(1, 1, 8, 6, seed=15)
    _, w = call(q, k, torch.zeros(1, 1, 8, 2, dtype=torch.float64), "reference", return_weights=True)
    fq, fk = q.clamp(min=0), k.clamp(min=0)
    s = fq @ fk.transpose(-1, -2)
    linear = s / s.sum(-1, keepdim=True)
    torch.testing.assert_close(linear[..., 0, :], linear[..., 1, :])
    assert (w[..., 0, :] - w[..., 1, :]).abs().max() > 1e-3


@pytest.mark.parametrize("ks", [None, 1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decoding_equals_causal_forward(ks, dtype):
    """Prefill 5 tokens, one step of 3, then token by token: the last rows of the causal forward."""
    B, Hq, Hkv, N, D, Dv = 2, 4, 2, 23, 8, 6
    q, k, v = (rand(B, Hq, N, D, seed=16, dtype=dtype), rand(B, Hkv, N, D, seed=17, dtype=dtype),
               rand(B, Hkv, N, Dv, seed=18, dtype=dtype))
    local = None if ks is None else rand(Hq, Dv, ks, seed=19, dtype=dtype)
    full = call(q, k, v, "reference", causal=True, local_weight=local)
    state = decoding.init_state("inline", B, Hkv, D, Dv, dtype=dtype, local_weight=local)
    bounds = [0, 5, 8, *range(9, N + 1)]
    outs = [decoding.step("inline", state, q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], local_weight=local)
            for s, e in zip(bounds[:-1], bounds[1:])]
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=tol, rtol=tol)
    assert state.count == N and state.S.shape == (B, Hkv, D, Dv + 1)  # constant size, not a cache
    if ks is not None:
        assert state.tail.shape == (B, Hkv, ks - 1, Dv)


def test_module_gradients_reach_the_local_weight():
    torch.manual_seed(0)
    mod = az.build("inline", heads=4, kv_heads=2, head_dim=8, v_dim=6).double()
    assert tuple(mod.local_weight.shape) == (4, 6, 3)
    q, k, v = rand(2, 4, 17, 8, seed=20), rand(2, 2, 17, 8, seed=21), rand(2, 2, 17, 6, seed=22)
    dout = rand(2, 4, 17, 6, seed=23)
    grads = {}
    for impl in ("chunk", "reference"):
        mod.zero_grad()
        (mod(q, k, v, causal=True, impl=impl) * dout).sum().backward()
        grads[impl] = mod.local_weight.grad.clone()
    assert grads["chunk"].abs().min() > 0  # every tap of every channel gets a gradient
    torch.testing.assert_close(grads["chunk"], grads["reference"], atol=1e-12, rtol=1e-12)
    # dL/dw[h, c, t] = Σ_{b,i} dout[b,h,i,c] · v[b, h//2, i-2+t, c] (causal taps, zero before 0)
    vp = F.pad(v.repeat_interleave(2, dim=1), (0, 0, 2, 0))
    expected = torch.stack([(dout * vp[:, :, t:t + 17]).sum(dim=(0, 2)) for t in range(3)], dim=-1)
    torch.testing.assert_close(grads["chunk"], expected, atol=1e-12, rtol=1e-12)


def test_module_skips_the_local_term_for_cross_attention():
    mod = az.build("inline", heads=2, head_dim=8, feature_map="elu").double()
    q, k, v = rand(1, 2, 5, 8, seed=24), rand(1, 2, 5, 8, seed=25), rand(1, 2, 5, 8, seed=26)
    plain = az.attention(q, k, v, method="inline", feature_map="elu")
    torch.testing.assert_close(mod(q, k, v, cross=True), plain)  # equal lengths, but cross: no local term
    assert not torch.allclose(mod(q, k, v), plain)  # self-attention: the local term is there
    kc, vc = rand(1, 2, 9, 8, seed=27), rand(1, 2, 9, 8, seed=28)
    torch.testing.assert_close(mod(q, kc, vc), az.attention(q, kc, vc, method="inline", feature_map="elu"))


def test_module_decoding_equals_module_forward():
    torch.manual_seed(1)
    mod = az.build("inline", heads=4, kv_heads=1, head_dim=8, kernel_size=4).double()
    q, k, v = rand(1, 4, 15, 8, seed=29), rand(1, 1, 15, 8, seed=30), rand(1, 1, 15, 8, seed=31)
    full = mod(q, k, v, causal=True)
    state = mod.init_state(1, 1, 8, 8, dtype=torch.float64)
    outs = [mod.step(state, q[:, :, :4], k[:, :, :4], v[:, :, :4])]
    outs += [mod.step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]) for t in range(4, 15)]
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-12, rtol=1e-12)


def test_nothing_visible_gives_zeros_and_finite_gradients():
    q, k, v = (t.requires_grad_() for t in (rand(2, 2, 8, 4, seed=32), rand(2, 2, 5, 4, seed=33),
                                             rand(2, 2, 5, 3, seed=34)))
    kpm = torch.ones(2, 5, dtype=torch.bool)
    kpm[1] = False  # the second sequence is all padding
    w = rand(2, 3, 3, seed=35)
    for impl in ("reference", "chunk"):
        out = call(q, k, v, impl, causal=True, key_mask=kpm, local_weight=w)
        assert (out[:, :, :3] == 0).all()  # causal, Nq > Nk: the first Nq - Nk queries see nothing
        assert (out[1] == 0).all()
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)


def test_bad_options_raise():
    q, k, v = rand(1, 2, 4, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)
    with pytest.raises(az.AttentionInputError, match="feature_map must be one of"):
        az.attention(q, k, v, method="inline", feature_map="softmax")
    with pytest.raises(az.AttentionInputError, match="self-attention.*Nq=4, Nk=6"):
        az.attention(q, k, v, method="inline", local_weight=torch.ones(2, 8, 3, dtype=torch.float64))
    with pytest.raises(az.AttentionInputError, match=r"does not broadcast to \(Hq, Dv, k\) = \(2, 8, 3\)"):
        az.attention(q, k, v, method="inline", causal=True, local_weight=torch.ones(3, 8, 3, dtype=torch.float64))
    with pytest.raises(az.AttentionInputError, match="does not take a mask"):
        az.attention(q, k, v, method="inline", mask=torch.ones(4, 6, dtype=torch.bool))
    with pytest.raises(az.AttentionInputError, match="option chunk must be a positive int"):
        az.attention(q, k, v, method="inline", causal=True, chunk=0)


@pytest.mark.parametrize("causal", [False, True])
def test_chunk_never_allocates_n_by_n(causal):
    N, D = 2048, 16
    q, k, v = (torch.randn(1, 1, N, D, requires_grad=True) for _ in range(3))
    w = torch.randn(1, D, 3, requires_grad=True)
    for impl, small in (("chunk", True), ("reference", False)):
        probe = LargestTensor()
        with probe:
            call(q, k, v, impl, causal=causal, local_weight=w).sum().backward()
        assert (probe.largest < N * N // 16) if small else (probe.largest >= N * N), (impl, probe.largest)
