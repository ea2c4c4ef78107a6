"""linear, lightning, hedgehog: the explicit references against an independent
token-by-token recurrence (so a wrong reference cannot hide), feature maps, decay,
and the Hedgehog distillation fidelity."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo import decoding
from attnzoo.kernels import linear_scan

hedgehog = importlib.import_module("attnzoo.methods.linear.hedgehog")
linear = importlib.import_module("attnzoo.methods.linear.linear")
lightning = importlib.import_module("attnzoo.methods.linear.lightning")


def qkv(B=2, H=2, N=40, D=8, Dv=6, Nq=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    Nq = Nq or N
    return (torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64),
            torch.randn(B, H, N, D, generator=g, dtype=torch.float64),
            torch.randn(B, H, N, Dv, generator=g, dtype=torch.float64))


def recurrent(fq, fk, v, decay=None, normalize=True, eps=1e-6):
    """The RNN form, one token at a time: S_t = λ S_{t-1} + φ(k_t) v_tᵀ, z_t = λ z_{t-1} + φ(k_t)."""
    B, H, N, Fd = fq.shape
    S = torch.zeros(B, H, Fd, v.shape[-1], dtype=fq.dtype)
    z = torch.zeros(B, H, Fd, dtype=fq.dtype)
    lam = torch.ones(H, dtype=fq.dtype) if decay is None else torch.as_tensor(decay, dtype=fq.dtype)
    outs = []
    for t in range(N):
        S = lam.view(1, H, 1, 1) * S + fk[:, :, t, :, None] * v[:, :, t, None, :]
        z = lam.view(1, H, 1) * z + fk[:, :, t]
        num = torch.einsum("bhf,bhfd->bhd", fq[:, :, t], S)
        if normalize:
            outs.append(num / (torch.einsum("bhf,bhf->bh", fq[:, :, t], z)[..., None] + eps))
        else:
            outs.append(num * torch.rsqrt(num.pow(2).mean(-1, keepdim=True) + eps))
    return torch.stack(outs, dim=2)


MAPS = {"elu": lambda x: F.elu(x) + 1, "relu": F.relu, "identity": lambda x: x}


@pytest.mark.parametrize("fmap", ["elu", "relu"])
@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_linear_causal_equals_recurrence(fmap, impl):
    q, k, v = qkv()
    expected = recurrent(MAPS[fmap](q), MAPS[fmap](k), v)
    got = az.attention(q, k, v, method="linear", causal=True, feature_map=fmap, impl=impl)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_linear_noncausal_formula_and_norm_attention(impl):
    q, k, v = qkv(Nq=17)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    expected = (fq @ (fk.transpose(-1, -2) @ v)) / ((fq @ fk.sum(2, keepdim=True).transpose(-1, -2)) + 1e-6)
    torch.testing.assert_close(az.attention(q, k, v, method="linear", impl=impl), expected)
    num = fq @ (fk.transpose(-1, -2) @ v)
    expected = num / torch.sqrt(num.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(az.attention(q, k, v, method="linear", normalize=False, impl=impl), expected)
    q, k, v = qkv()
    expected = recurrent(F.elu(q) + 1, F.elu(k) + 1, v, normalize=False)
    torch.testing.assert_close(az.attention(q, k, v, method="linear", normalize=False, causal=True, impl=impl),
                               expected)


@pytest.mark.parametrize("impl", ["reference", "chunk"])
def test_cosformer_is_cosine_reweighted_relu(impl):
    q, k, v = qkv(N=30)
    M = 30
    i = torch.arange(30, dtype=torch.float64)
    w = (F.relu(q) @ F.relu(k).transpose(-1, -2)) * torch.cos(math.pi / 2 * (i[:, None] - i[None, :]) / M)
    w = w * torch.ones(30, 30).tril()
    expected = (w @ v) / (w.sum(-1, keepdim=True) + 1e-6)
    got = az.attention(q, k, v, method="linear", feature_map="cosformer", causal=True, impl=impl)
    torch.testing.assert_close(got, expected)


def test_cosformer_decoding_needs_and_uses_its_length():
    q, k, v = qkv(N=25)
    with pytest.raises(az.AttentionInputError, match="cosformer_len"):
        decoding.init_state("linear", 2, 2, 8, 6, feature_map="cosformer")
    full = az.attention(q, k, v, method="linear", feature_map="cosformer", cosformer_len=64, causal=True)
    st = decoding.init_state("linear", 2, 2, 8, 6, dtype=torch.float64, feature_map="cosformer", cosformer_len=64)
    out = torch.cat([decoding.step("linear", st, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                   feature_map="cosformer", cosformer_len=64) for t in range(25)], dim=2)
    torch.testing.assert_close(out, full)


def test_favor_approximates_softmax_and_improves_with_features():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 64, 16, generator=g, dtype=torch.float64) * 0.5
    k = torch.randn(1, 1, 64, 16, generator=g, dtype=torch.float64) * 0.5
    v = torch.randn(1, 1, 64, 8, generator=g, dtype=torch.float64)
    exact = az.attention(q, k, v)
    errs = {}
    for m in (16, 4096):
        outs = [az.attention(q, k, v, method="linear", feature_map="favor", favor_features=m, favor_seed=s)
                for s in range(3)]
        errs[m] = sum(float((o - exact).abs().mean()) for o in outs) / 3
    assert errs[4096] < errs[16] / 3, errs
    assert errs[4096] < 0.03, errs
    a = az.attention(q, k, v, method="linear", feature_map="favor", favor_seed=0)
    b = az.attention(q, k, v, method="linear", feature_map="favor", favor_seed=1)
    assert not torch.allclose(a, b)  # a new seed redraws the projection


def test_favor_projection_rows_are_orthogonal_within_a_block():
    w = linear.favor_projection(16, 16, seed=3).double()
    gram = w @ w.T
    off = gram - torch.diag(torch.diag(gram))
    assert float(off.abs().max()) < 1e-4


@pytest.mark.parametrize("impl", ["reference", "chunk"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_lightning_equals_decayed_recurrence(impl, chunk):
    q, k, v = qkv(N=50)
    lam = torch.tensor([1.0, 0.8], dtype=torch.float64)
    expected = recurrent(q, k, v, decay=lam, normalize=False)
    opts = {"chunk": chunk} if impl == "chunk" else {}
    got = az.attention(q, k, v, method="lightning", causal=True, decay=lam, impl=impl, **opts)
    torch.testing.assert_close(got, expected)


def test_lightning_default_decays_follow_transnormer_rule_and_refuse_noncausal():
    decays = lightning.decays
    # the papers' rule: lambda_h = exp(-ALiBi slope_h (1 - l/(L-1) + 1e-5)); 0.61 ... 0.996 for 8 heads
    slopes8 = torch.tensor([2.0 ** -(i + 1) for i in range(8)])
    torch.testing.assert_close(decays(8), torch.exp(-slopes8 * (1 + 1e-5)))
    assert abs(float(decays(8)[0]) - 0.6065) < 1e-3 and abs(float(decays(8)[-1]) - 0.9961) < 1e-3
    torch.testing.assert_close(decays(8, layer_ratio=0.5), torch.exp(-slopes8 * (0.5 + 1e-5)))
    # attnzoo 0.1's rule, kept as an option
    torch.testing.assert_close(decays(4, schedule="linear"), torch.exp(-torch.tensor([0.0, 2.0, 4.0, 6.0])))
    torch.testing.assert_close(decays(4, layer_ratio=0.5, schedule="linear"),
                               torch.exp(-torch.tensor([0.0, 1.0, 2.0, 3.0])))
    q, k, v = qkv()
    with pytest.raises(az.UnsupportedPattern, match="causal_self, causal_cross"):
        az.attention(q, k, v, method="lightning")
    with pytest.raises(az.AttentionInputError, match="decay must be"):
        az.attention(q, k, v, method="lightning", causal=True, decay=1.5)


def test_lightning_prefill_then_decode_equals_forward():
    q, k, v = qkv(N=100)
    full = az.attention(q, k, v, method="lightning", causal=True)
    st = decoding.init_state("lightning", 2, 2, 8, 6, dtype=torch.float64)
    outs = [decoding.step("lightning", st, q[:, :, :67], k[:, :, :67], v[:, :, :67])]  # 67: not a chunk multiple
    outs += [decoding.step("lightning", st, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]) for t in range(67, 100)]
    torch.testing.assert_close(torch.cat(outs, 2), full)
    assert st.nbytes() == 2 * 2 * 8 * 6 * 8  # constant: D x Dv per head, float64


def test_hedgehog_feature_map_formula():
    q, k, v = qkv(N=20)
    W = torch.randn(2, 8, 5, dtype=torch.float64)
    b = torch.randn(2, 5, dtype=torch.float64)

    def z(x):
        return torch.einsum("bhnd,hdf->bhnf", x, W) + b[None, :, None, :]

    def paper(x):  # the paper's map: [exp(Wx + b), exp(-(Wx + b))]
        return torch.cat([torch.exp(z(x)), torch.exp(-z(x))], -1)

    def released(x):  # the released code's variant: each half normalised over its features
        return torch.cat([torch.softmax(z(x), -1), torch.softmax(-z(x), -1)], -1)

    for activation, phi in (("exp", paper), ("softmax", released)):
        expected = recurrent(phi(q), phi(k), v)
        for impl in ("reference", "chunk"):
            opts = {} if activation == "exp" else {"activation": "softmax"}  # exp is the default
            got = az.attention(q, k, v, method="hedgehog", causal=True, weight=W, bias=b, impl=impl, **opts)
            torch.testing.assert_close(got, expected)
    # the two maps are different maps, not the same up to a per-row factor
    a = az.attention(q, k, v, method="hedgehog", weight=W, bias=b, return_weights=True)[1]
    s = az.attention(q, k, v, method="hedgehog", weight=W, bias=b, activation="softmax", return_weights=True)[1]
    assert float((a - s).abs().max()) > 1e-3


def test_hedgehog_distillation_beats_elu_linear_attention():
    """Fidelity (acceptance): trained Hedgehog maps bring the KL to softmax weights below
    half of what elu+1 linear attention gets on the same fixed random q/k."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 64, 16, generator=g) * 1.5
    k = torch.randn(1, 2, 64, 16, generator=g) * 1.5
    target = hedgehog.softmax_weights(q, k)
    _, w_elu = az.attention(q, k, torch.zeros(1, 2, 64, 1), method="linear", impl="reference", return_weights=True)
    kl_elu = float(hedgehog.attention_kl(target, w_elu))
    result = hedgehog.distill_hedgehog(q, k, steps=300)
    assert result["kl_after"] < result["kl_before"]
    assert result["kl_after"] < 0.5 * kl_elu, (result["kl_after"], kl_elu)


def aaren_rnn(q, k, v, scale):
    """Aaren as the paper's RNN: one (m, u, w) update per token."""
    s = (k @ q.transpose(-1, -2)).squeeze(-1) * scale  # (B, H, N)
    m = torch.full(s.shape[:2], float("-inf"), dtype=s.dtype)
    u = torch.zeros(s.shape[:2], dtype=s.dtype)
    w = torch.zeros(*s.shape[:2], v.shape[-1], dtype=s.dtype)
    outs = []
    for t in range(s.shape[-1]):
        m_new = torch.maximum(m, s[..., t])
        u = u * torch.exp(m - m_new) + torch.exp(s[..., t] - m_new)
        w = w * torch.exp(m - m_new)[..., None] + torch.exp(s[..., t] - m_new)[..., None] * v[:, :, t]
        m = m_new
        outs.append(w / u[..., None])
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("impl,chunk", [("reference", None), ("scan", 1), ("scan", 8), ("scan", 64)])
def test_aaren_equals_its_rnn(impl, chunk):
    q, k, v = qkv(N=45)
    q = q[:, :, :1] * 3  # sharp scores exercise the running max
    expected = aaren_rnn(q, k * 1.0, v, 8 ** -0.5)
    opts = {"chunk": chunk} if chunk else {}
    torch.testing.assert_close(az.attention(q, k, v, method="aaren", causal=True, impl=impl, **opts), expected)


def test_aaren_padding_and_module_in_a_layer():
    q, k, v = qkv(N=20)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[0, :3] = False  # the first outputs of sequence 0 see only padding: zeros, not NaN
    for impl in ("reference", "scan"):
        out = az.attention(q[:, :, :1], k, v, method="aaren", causal=True, key_mask=kpm, impl=impl)
        assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))
        keep = kpm[0]
        torch.testing.assert_close(out[0:1, :, 3:], aaren_rnn(q[0:1, :, :1], k[0:1, :, keep], v[0:1, :, keep], 8 ** -0.5))
    layer = az.Attention(dim=16, heads=2, method="aaren", causal=True).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    y = layer(x)
    cache = layer.init_cache(2)
    torch.testing.assert_close(torch.cat([layer.step(x[:, t:t + 1], cache) for t in range(12)], 1), y)
    y.sum().backward()
    assert layer.attn.query.grad is not None and layer.attn.query.grad.abs().sum() > 0
    assert cache.state.nbytes() == 2 * 2 * (8 + 2) * 8  # (m, u, w) per head (Dv = 8): constant in N


def test_long_sequences_run_in_segments_with_the_same_result(monkeypatch):
    """Segmenting the causal scan (to keep temporaries small) changes nothing, grads included."""
    q, k, v = (t.requires_grad_(True) for t in qkv(N=90))
    lam = torch.tensor([1.0, 0.9], dtype=torch.float64)

    def run():
        out = az.attention(q, k, v, method="lightning", causal=True, decay=lam, chunk=8)
        return [out, *torch.autograd.grad(out.square().sum(), (q, k, v))]

    whole = run()
    monkeypatch.setattr(linear_scan, "SEGMENT_ELEMENTS", 2 * 2 * 8 * 3)  # 24-token segments
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(whole[0], recurrent(q.detach(), k.detach(), v.detach(), decay=lam, normalize=False))


@pytest.mark.parametrize("method,opts", [("linear", {}), ("linear", {"feature_map": "cosformer"}),
                                         ("linear", {"normalize": False}), ("lightning", {})])
def test_segmented_pipeline_equals_whole(monkeypatch, method, opts):
    """Feature maps and the scan run segment by segment for long causal inputs: same
    outputs and gradients as one segment (positions for cosFormer carried across)."""
    q, k, v = (t.requires_grad_(True) for t in qkv(N=90))
    kpm = torch.ones(2, 90, dtype=torch.bool)
    kpm[1, 30:45] = False

    def run():
        out = az.attention(q, k, v, method=method, causal=True, key_mask=kpm, impl="chunk", chunk=8, **opts)
        return [out, *torch.autograd.grad(out.square().sum(), (q, k, v))]

    whole = run()
    monkeypatch.setattr(linear_scan, "SEGMENT_ELEMENTS", 2 * 2 * 8 * 24)
    assert linear_scan.segment_length(2, 2, 8, 8) == 24  # 90 tokens: segments of 24, 24, 24, 18
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b)
    ref = az.attention(q, k, v, method=method, causal=True, key_mask=kpm, impl="reference", **opts)
    torch.testing.assert_close(whole[0], ref)


def test_aaren_scan_gradients_stay_finite_with_spread_scores():
    """Regression: masked entries are excluded before the exp (no 0 * inf in the backward)."""
    q = torch.ones(1, 1, 1, 4)
    k = torch.zeros(1, 1, 8, 4)
    k[0, 0, 5] = 100.0  # a later key scoring far above the running max before it
    v = torch.randn(1, 1, 8, 4)
    grads = {}
    for impl in ("reference", "scan"):
        qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        out = az.attention(qq, kk, v, method="aaren", causal=True, impl=impl)
        grads[impl] = torch.autograd.grad(out.sum(), (qq, kk))
        assert all(torch.isfinite(g).all() for g in grads[impl])
    for a, b in zip(grads["scan"], grads["reference"]):
        torch.testing.assert_close(a, b)


def test_decoding_states_refuse_another_shape_and_unknown_impls():
    q, k, v = qkv(B=1, N=4)
    for method in ("linear", "lightning"):
        st = decoding.init_state(method, 1, 2, 8, 6, dtype=torch.float64)
        decoding.step(method, st, q[:, :, :1], k[:, :, :1], v[:, :, :1])
        q3, k3, v3 = qkv(B=3, N=1)
        with pytest.raises(az.AttentionInputError, match=r"made for \(B, Hq, Hkv, D, Dv\) = \(1, 2, 2, 8, 6\)"):
            decoding.step(method, st, q3, k3, v3)
        with pytest.raises(az.UnsupportedImpl, match="no decoding impl 'split_k'.*'auto'"):
            decoding.step(method, st, q[:, :, 1:2], k[:, :, 1:2], v[:, :, 1:2], impl="split_k")


def test_cosformer_length_must_cover_the_sequence():
    q, k, v = qkv(N=12)
    with pytest.raises(az.AttentionInputError, match="cosformer_len=8 is shorter than the sequence"):
        az.attention(q, k, v, method="linear", feature_map="cosformer", cosformer_len=8)
    st = decoding.init_state("linear", 2, 2, 8, 6, dtype=torch.float64, feature_map="cosformer", cosformer_len=4)
    decoding.step("linear", st, q[:, :, :4], k[:, :, :4], v[:, :, :4], feature_map="cosformer", cosformer_len=4)
    with pytest.raises(az.AttentionInputError, match="decoding past cosformer_len=4"):
        decoding.step("linear", st, q[:, :, 4:5], k[:, :, 4:5], v[:, :, 4:5], feature_map="cosformer", cosformer_len=4)


@pytest.mark.parametrize("method,opts,match", [
    ("linear", {"chunk": 0}, "option chunk must be a positive int"),
    ("hedgehog", {"chunk": -3}, "option chunk must be a positive int"),
    ("lightning", {"chunk": 0}, "option chunk must be a positive int"),
    ("aaren", {"chunk": 0}, "option chunk must be a positive int"),
    ("linear", {"feature_map": "favor", "favor_features": 0}, "option favor_features must be a positive int"),
    ("linear", {"feature_map": "cosformer", "cosformer_len": 0}, "option cosformer_len must be a positive int"),
    ("lightning", {"decay": 1.5}, r"decay must be one value or one per head, in \(0, 1\]"),
    ("lightning", {"decay": (0.5, 0.0)}, r"decay must be one value or one per head, in \(0, 1\]"),
    ("lightning", {"layer_ratio": 1.5}, r"layer_ratio must be l / L of the layer, in \[0, 1\]"),
])
def test_bad_options_raise_when_validated(method, opts, match):
    """Values the maths cannot take are refused by the options, before any call is run
    (a chunk of 0 used to run silently with chunks of 1, a layer ratio above 1 gave
    decays above 1)."""
    with pytest.raises(az.AttentionInputError, match=match):
        az.get(method).resolve_options(opts)
    q, k, v = qkv(N=6)
    with pytest.raises(az.AttentionInputError, match=match):
        az.attention(q[:, :, :1] if method == "aaren" else q, k, v, method=method, causal=True, **opts)
