"""SOFT ("Softmax-free Linear Transformers"): the maths written out independently.

    S(x, y) = exp(-‖x - y‖² / (2√d))                 (√d = 1/scale)
    Q̃_a     = mean of q over tokens ⌊a N/m⌋ .. ⌈(a+1) N/m⌉ - 1     (a = 0..m-1, m = min(m, Nq))
    O       = S(Q, Q̃) · S(Q̃, Q̃)⁺ · S(Q̃, K) · V       (padded keys: zero columns of S(Q̃, K))

with ⁺ the Moore–Penrose inverse, here by Newton–Raphson:
X₀ = Bᵀ / (‖B‖₁‖B‖_∞), X ← 2X - XBX.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import attnzoo as az
from attnzoo import decoding

from helpers import LargestTensor

soft = importlib.import_module("attnzoo.methods.linear.softmax_free")


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def kernel(x, y, d):
    """exp(-‖x_i - y_j‖² / (2√d)) for 2-D x (n, D), y (m, D), entry by entry."""
    out = torch.empty(x.shape[0], y.shape[0], dtype=x.dtype)
    for i in range(x.shape[0]):
        for j in range(y.shape[0]):
            out[i, j] = math.exp(-float(((x[i] - y[j]) ** 2).sum()) / (2 * math.sqrt(d)))
    return out


def landmarks(x, m):
    """Adaptive average pooling along tokens, window by window."""
    n = x.shape[0]
    return torch.stack([x[(a * n) // m: -(-(a + 1) * n // m)].mean(0) for a in range(m)])


def formula(q, k, v, *, num_landmarks=32, kpm=None, d=None):
    """Per batch and head, with torch.linalg.pinv (not Newton) for B⁺."""
    B, Hq, Nq, D = q.shape
    Hkv = k.shape[1]
    d = D if d is None else d
    m = min(num_landmarks, Nq)
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hkv)
            ql = landmarks(q[b, h], m)
            c = kernel(ql, k[b, hk], d)
            if kpm is not None:
                c = c * kpm[b].to(c.dtype)
            out[b, h] = kernel(q[b, h], ql, d) @ torch.linalg.pinv(kernel(ql, ql, d)) @ c @ v[b, hk]
    return out


def call(q, k, v, impl, **kw):
    return az.attention(q, k, v, method="softmax_free", impl=impl, **kw)


def test_newton_raphson_equals_pinv_on_a_well_conditioned_matrix():
    x = rand(12, 6, seed=1)
    b = kernel(x, x, 6)  # a Gaussian kernel matrix of spread-out points
    assert torch.linalg.cond(b) < 10
    x0 = b.T / (b.abs().sum(0).max() * b.abs().sum(1).max())
    assert torch.linalg.matrix_norm(torch.eye(12, dtype=b.dtype) - b @ x0, ord=2) < 1  # the start converges
    torch.testing.assert_close(soft.newton_pinv(b, 20), torch.linalg.pinv(b), atol=1e-12, rtol=1e-12)
    errors = [float((soft.newton_pinv(b, it) - torch.linalg.pinv(b)).abs().max()) for it in range(8)]
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:]))
    nonsym = rand(7, 7, seed=2) + 6 * torch.eye(7, dtype=torch.float64)  # not symmetric, still converges
    torch.testing.assert_close(soft.newton_pinv(nonsym, 20), torch.linalg.inv(nonsym), atol=1e-12, rtol=1e-12)
    batched = torch.stack([b, b * 0.5 + 0.5 * torch.eye(12, dtype=b.dtype)])
    torch.testing.assert_close(soft.newton_pinv(batched, 25), torch.linalg.pinv(batched), atol=1e-12, rtol=1e-12)


def test_newton_raphson_reaches_the_pseudo_inverse_of_a_singular_matrix():
    """Coinciding landmarks make B singular: the iteration then tends to B⁺, not to an inverse."""
    x = rand(5, 4, seed=3)
    x = torch.cat([x, x[:2]])
    b = kernel(x, x, 4)
    assert torch.linalg.matrix_rank(b) == 5
    torch.testing.assert_close(soft.newton_pinv(b, 20), torch.linalg.pinv(b), atol=1e-10, rtol=1e-10)


CASES = [  # (B, Hq, Hkv, Nq, Nk, D, Dv, m)
    (1, 2, 2, 20, 20, 6, 4, 5),  # windows of 4
    (2, 2, 2, 23, 23, 5, 3, 7),  # uneven, overlapping windows
    (1, 4, 2, 13, 9, 6, 5, 4),  # GQA, cross
    (2, 2, 1, 6, 17, 4, 3, 32),  # MQA, cross, m capped at Nq
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}Hq{c[1]}Hkv{c[2]}Nq{c[3]}Nk{c[4]}m{c[7]}")
@pytest.mark.parametrize("padding", [False, True], ids=["", "pad"])
def test_reference_and_nystrom_equal_the_formula(case, padding):
    B, Hq, Hkv, Nq, Nk, D, Dv, m = case
    q, k, v = rand(B, Hq, Nq, D, seed=4), rand(B, Hkv, Nk, D, seed=5), rand(B, Hkv, Nk, Dv, seed=6)
    kpm = None
    if padding:
        kpm = torch.ones(B, Nk, dtype=torch.bool)
        kpm[-1, ::3] = False
    # landmarks averaged over a few tokens lie close together: B has condition numbers up to
    # ~2000 here, which takes Newton–Raphson more than the default 20 steps to resolve
    opts = dict(num_landmarks=m, key_mask=kpm, newton_iters=40)
    expected = formula(q, k, v, num_landmarks=m, kpm=kpm)
    for impl in ("reference", "nystrom"):
        torch.testing.assert_close(call(q, k, v, impl, **opts), expected, atol=1e-10, rtol=1e-10)
    # the scale plays 1/√d
    expected = formula(q, k, v, num_landmarks=m, kpm=kpm, d=9.0)
    torch.testing.assert_close(call(q, k, v, "nystrom", scale=1 / 3, **opts), expected, atol=1e-10, rtol=1e-10)


def test_weights_are_the_nystrom_factors_and_tied_qk_is_symmetric():
    q, v = rand(1, 1, 30, 6, seed=7), rand(1, 1, 30, 3, seed=8)
    out, w = call(q, q, v, "reference", num_landmarks=6, return_weights=True)
    ql = landmarks(q[0, 0], 6)
    a = kernel(q[0, 0], ql, 6)
    torch.testing.assert_close(w[0, 0], a @ torch.linalg.pinv(kernel(ql, ql, 6)) @ a.T, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(w, w.transpose(-1, -2), atol=1e-12, rtol=0)  # K = Q: A B⁺ Aᵀ
    torch.testing.assert_close(out, w @ v)
    assert (w.sum(-1) - 1).abs().max() > 0.1  # no row normalisation


def test_all_landmarks_is_exact_unnormalised_gaussian_kernel_attention():
    """m = Nq: each landmark is one query, A = B, so O = S(Q, K) V exactly — the plain
    Gaussian kernel with no softmax and no normalisation."""
    q, k, v = rand(1, 2, 8, 5, seed=9), rand(1, 2, 11, 5, seed=10), rand(1, 2, 11, 4, seed=11)
    expected = torch.stack([kernel(q[0, h], k[0, h], 5) @ v[0, h] for h in range(2)]).unsqueeze(0)
    for impl in ("reference", "nystrom"):
        torch.testing.assert_close(call(q, k, v, impl, num_landmarks=8), expected, atol=1e-10, rtol=1e-10)


def test_nystrom_error_decreases_as_landmarks_grow():
    """On smooth data (a low-frequency curve through R^8), ‖A B⁺ Aᵀ - S(Q, Q)‖ / ‖S(Q, Q)‖
    falls with every doubling of m, down to rounding at m = N."""
    N, D = 64, 8
    t = torch.linspace(0, 1, N, dtype=torch.float64).view(N, 1)
    freq = torch.tensor([0.5, 1.0, 1.5, 2.0] * 2, dtype=torch.float64)
    q = (3 * torch.sin(2 * math.pi * freq * t + torch.linspace(0, 3, D, dtype=torch.float64))).view(1, 1, N, D)
    full = kernel(q[0, 0], q[0, 0], D)
    errors = []
    for m in (1, 2, 4, 8, 16, 32, 64):
        _, w = call(q, q, torch.zeros(1, 1, N, 1, dtype=torch.float64), "reference", num_landmarks=m,
                    newton_iters=80, return_weights=True)
        errors.append(float((w[0, 0] - full).norm() / full.norm()))
    assert all(e1 < e0 for e0, e1 in zip(errors, errors[1:])), errors
    assert errors[0] > 0.9 and errors[-2] < 1e-2 and errors[-1] < 1e-8, errors


def test_padded_keys_drop_out():
    q, k, v = rand(2, 2, 10, 6, seed=12), rand(2, 2, 14, 6, seed=13), rand(2, 2, 14, 4, seed=14)
    kpm = torch.ones(2, 14, dtype=torch.bool)
    kpm[0, 9:] = False
    kpm[1] = False  # nothing to attend to
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 9:], v2[0, :, 9:] = 100.0, -7.0  # the padded keys' content does not matter
    for impl in ("reference", "nystrom"):
        a = call(q, k, v, impl, key_mask=kpm, num_landmarks=4)
        torch.testing.assert_close(call(q, k2, v2, impl, key_mask=kpm, num_landmarks=4), a)
        torch.testing.assert_close(a[:1], call(q[:1], k[:1, :, :9], v[:1, :, :9], impl, num_landmarks=4))
        assert (a[1] == 0).all()
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        grads = torch.autograd.grad(call(qg, kg, vg, impl, key_mask=kpm, num_landmarks=4).sum(), (qg, kg, vg))
        assert all(torch.isfinite(g).all() for g in grads)


def test_gradients_flow_through_the_newton_iterations():
    q, k, v = (rand(1, 2, 7, 4, seed=s).requires_grad_() for s in (15, 16, 17))
    for impl in ("nystrom", "reference"):
        assert torch.autograd.gradcheck(lambda a, b, c, impl=impl: call(a, b, c, impl, num_landmarks=3), (q, k, v))


def test_no_causal_form():
    q = rand(1, 1, 5, 4)
    with pytest.raises(az.UnsupportedPattern, match="noncausal_self, noncausal_cross"):
        az.attention(q, q, q, method="softmax_free", causal=True)
    with pytest.raises(az.UnsupportedPattern, match="decoding"):
        decoding.init_state("softmax_free", 1, 1, 4, 4)


def test_bad_options_raise():
    q = rand(1, 1, 5, 4)
    with pytest.raises(az.AttentionInputError, match="num_landmarks must be an int >= 1, got 0"):
        az.attention(q, q, q, method="softmax_free", num_landmarks=0)
    with pytest.raises(az.AttentionInputError, match="newton_iters must be an int >= 0, got -1"):
        az.attention(q, q, q, method="softmax_free", newton_iters=-1)
    with pytest.raises(az.AttentionInputError, match="newton_iters=2.5 must be an int"):  # the options' type check
        az.attention(q, q, q, method="softmax_free", newton_iters=2.5)
    with pytest.raises(az.AttentionInputError, match="does not take a mask"):
        az.attention(q, q, q, method="softmax_free", mask=torch.ones(5, 5, dtype=torch.bool))


def test_sizing_hook_keeps_landmarks_a_quarter_of_short_sequences():
    spec = az.get("softmax_free")
    assert spec.sized_options(1) == {"num_landmarks": 2}
    assert spec.sized_options(100) == {"num_landmarks": 25}
    assert spec.sized_options(128) == spec.sized_options(4096) == {"num_landmarks": spec.options["num_landmarks"]}


def test_nystrom_never_allocates_n_by_n():
    N, D = 2048, 16
    q, k, v = (torch.randn(1, 1, N, D, requires_grad=True) for _ in range(3))
    for impl, small in (("nystrom", True), ("reference", False)):
        probe = LargestTensor()
        with probe:
            call(q, k, v, impl).sum().backward()
        assert (probe.largest < N * N // 16) if small else (probe.largest >= N * N), (impl, probe.largest)
