"""dilated (LongNet) and moa (MoA): the per-head patterns against brute force, exact block
layouts, the block kernel against the reference with gradients, bounded decoding caches,
no N×N tensor, and MoA's span profiler."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo import decoding, masks
from attnzoo.kernels import windows
from attnzoo.methods.local import dilated, moa

from attnzoo.registry import PATTERNS as ALL_PATTERNS

from helpers import CASES, LargestTensor, call, contract_check, run


def brute(allowed, heads, nq, nk):
    """(heads, nq, nk) bool from a Python predicate allowed(h, i, j)."""
    return torch.tensor([[[bool(allowed(h, i, j)) for j in range(nk)] for i in range(nq)] for h in range(heads)])


def dilated_keys(h, i, nq, nk, window, dilations, causal):
    """The key set of query i in head h, built by enumerating the dilated steps."""
    r = dilations[h % len(dilations)]
    pos = i + nk - nq
    steps = range(window) if causal else range(-(window // 2), window // 2 + 1)
    return {pos - r * t for t in steps if 0 <= pos - r * t < nk}


def moa_keys(h, i, nq, nk, spans, sinks, causal):
    """The key set of query i in head h: its window enumerated, plus the sinks."""
    w = spans[h % len(spans)]
    pos = i + nk - nq
    if causal:
        window = {pos - t for t in range(w)}
        sink = {j for j in range(sinks) if j <= pos}
    else:
        window = {pos + t for t in range(-(w // 2), w // 2 + 1)}
        sink = set(range(sinks))
    return {j for j in window | sink if 0 <= j < nk}


SIZES = [(17, 17), (9, 23), (23, 9), (1, 13)]


# ------------------------------------------------------------------------------ patterns


@pytest.mark.parametrize("window", [1, 3, 6])
@pytest.mark.parametrize("dilations", [(1,), (2,), (1, 3, 2), (5, 1)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk", SIZES)
def test_dilated_mask_equals_brute_force(window, dilations, causal, nq, nk):
    heads = 4
    got = masks.dense_mask(masks.dilated_window_mask(window, dilations, causal, nq, nk), 1, heads, nq, nk,
                           expand=True)[0]
    expected = brute(lambda h, i, j: j in dilated_keys(h, i, nq, nk, window, dilations, causal), heads, nq, nk)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("spans", [(1,), (4,), (3, 8, 1), (2, 30)])
@pytest.mark.parametrize("sinks", [0, 2])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk", SIZES)
def test_per_head_window_mask_equals_brute_force(spans, sinks, causal, nq, nk):
    heads = 4
    mod = masks.per_head_window_mask(torch.tensor(spans), sinks, causal, nq, nk)
    got = masks.dense_mask(mod, 1, heads, nq, nk, expand=True)[0]
    expected = brute(lambda h, i, j: j in moa_keys(h, i, nq, nk, spans, sinks, causal), heads, nq, nk)
    assert torch.equal(got, expected)


def test_elastic_spans_per_head():
    """span_h = clamp(round(alpha_h + beta_h * Nk), 1, Nk), alpha and beta cycled over heads."""
    alpha, beta, nk = (3.0, 10.4, 0.0), (0.0, 0.25), 37
    got = moa.head_spans(alpha, beta, 6, nk)
    expected = [max(1, min(nk, round(alpha[h % 3] + beta[h % 2] * nk))) for h in range(6)]
    assert got.tolist() == expected == [3, 20, 1, 12, 10, 9]
    assert moa.head_spans((500,), 0.0, 2, 37).tolist() == [37, 37]  # clamped to Nk


def test_moa_reference_is_the_elastic_per_head_window():
    """The reference equals plain softmax with the brute-force mask of the elastic spans."""
    q, k, v = (torch.randn(1, 4, 40, 8, dtype=torch.float64) for _ in range(3))
    alpha, beta = (2, 6), (0.1, 0.0, 0.3)
    spans = [max(1, min(40, round(alpha[h % 2] + beta[h % 3] * 40))) for h in range(4)]
    allowed = brute(lambda h, i, j: j in moa_keys(h, i, 40, 40, spans, 1, True), 4, 40, 40)
    expected = az.attention(q, k, v, mask=allowed.unsqueeze(0))
    got = az.attention(q, k, v, method="moa", causal=True, alpha=alpha, beta=beta, sinks=1, impl="reference")
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window,dilations,block", [(5, (1, 2, 4, 8), 8), (4, (1, 11, 3), 4), (3, (20, 1), 8),
                                                    (64, (1, 2), 16), (1, (7,), 4)])
def test_dilated_layout_is_exactly_the_touched_blocks(causal, window, dilations, block):
    heads = 4
    rates = dilated.head_rates(dilations, heads)
    gapped = False
    for nq, nk in ((70, 70), (30, 70), (70, 45), (1, 33)):
        layout = windows.dilated_layout(nq, nk, block, window, rates, causal)
        mod = masks.dilated_window_mask(window, dilations, causal, nq, nk)
        expected = masks.block_layout(mod, 1, heads, nq, nk, block_size=block)[0]
        assert torch.equal(layout, expected.expand_as(layout))
        idx = torch.arange(layout.shape[-1])
        for row in layout.reshape(-1, layout.shape[-1]):
            kept = idx[row]
            gapped |= kept.numel() > 1 and int(kept[-1] - kept[0]) + 1 > kept.numel()
    if max(dilations) > block and window > 1:  # a dilation wider than a block leaves empty blocks: skipped
        assert gapped


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("spans,sinks,block", [((3, 9, 1), 0, 4), ((24, 5), 3, 16), ((64,), 4, 16), ((2, 40), 9, 8)])
def test_moa_layout_is_exactly_the_touched_blocks(causal, spans, sinks, block):
    heads = 4
    widths = moa.head_spans(spans, 0.0, heads, None)
    for nq, nk in ((70, 70), (30, 70), (70, 45), (1, 33)):
        layout = windows.window_layout(nq, nk, block, widths, sinks, causal)
        mod = masks.per_head_window_mask(widths, sinks, causal, nq, nk)
        expected = masks.block_layout(mod, 1, heads, nq, nk, block_size=block)[0]
        assert torch.equal(layout, expected.expand_as(layout))


def test_kept_blocks_grow_with_the_window_not_with_n():
    """The kernel's work per query block is bounded by the window (times the dilation), not N."""
    for n in (512, 4096):
        lay = windows.dilated_layout(n, n, 64, 64, dilated.head_rates((1, 2, 4, 8), 4), True)
        assert int(lay.sum(-1).max()) <= -(-(8 * 63 + 1) // 64) + 1
        lay = windows.window_layout(n, n, 64, moa.head_spans((64, 128, 256, 512), 0.0, 4, n), 0, True)
        assert int(lay.sum(-1).max()) <= 512 // 64 + 1


# ------------------------------------------------------------------------ fast vs reference

PATTERNS = [(True, 90, 90), (False, 90, 90), (True, 50, 130), (False, 130, 50), (True, 130, 50)]


def _grads(method, impl, q, k, v, dout, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = az.attention(q, k, v, method=method, impl=impl, **kw)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]


@pytest.mark.parametrize("method,opts", [
    ("dilated", {"window": 5, "dilations": (1, 3, 19, 2)}),
    ("dilated", {"window": 12, "dilations": 4}),
    ("moa", {"alpha": (3, 40, 9, 1), "sinks": 2}),
    ("moa", {"alpha": (2, 10), "beta": (0.05, 0.4), "sinks": 0}),
])
@pytest.mark.parametrize("causal,nq,nk", PATTERNS)
@pytest.mark.parametrize("extra", ["none", "padding", "mask", "mask_mod"])
def test_block_equals_reference_float64_with_grads(method, opts, causal, nq, nk, extra):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, nq, 12, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, nk, 12, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, nk, 7, generator=g, dtype=torch.float64)
    dout = torch.randn(2, 4, nq, 7, generator=g, dtype=torch.float64)
    kw = dict(opts, causal=causal, cross=nq != nk)
    if extra == "padding":
        kpm = torch.ones(2, nk, dtype=torch.bool)
        kpm[1, nk // 2:] = False
        kw["key_mask"] = kpm
    elif extra == "mask":
        kw["mask"] = torch.rand(nq, nk, generator=g) < 0.7
    elif extra == "mask_mod":
        kw["mask"] = lambda b, h, i, j: (i + 2 * j + h) % 5 != 0
    ref = _grads(method, "reference", q, k, v, dout, **kw)
    for block_size in (16, 64):
        fast = _grads(method, "block", q, k, v, dout, block_size=block_size, **kw)
        for name, a, b in zip(("out", "dq", "dk", "dv"), fast, ref):
            torch.testing.assert_close(a, b, msg=f"{name}, block_size={block_size}")


def test_dilated_patterns_differ_per_head():
    """Each head really uses its own dilation: head h of the multi-rate call equals a call
    with that single rate."""
    q, k, v = (torch.randn(1, 3, 100, 8, dtype=torch.float64) for _ in range(3))
    out = az.attention(q, k, v, method="dilated", causal=True, window=4, dilations=(1, 5, 9), impl="block",
                       block_size=16)
    for h, r in enumerate((1, 5, 9)):
        single = az.attention(q, k, v, method="dilated", causal=True, window=4, dilations=r)
        torch.testing.assert_close(out[:, h], single[:, h])
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------- decoding


def _decode(method, q, k, v, prefill, max_len=None, **opts):
    B, Hkv, _, D = k.shape
    state = decoding.init_state(method, B, Hkv, D, v.shape[-1], dtype=q.dtype, max_len=max_len, **opts)
    outs = [decoding.step(method, state, q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], **opts)]
    sizes = [state.tokens]
    for t in range(prefill, q.shape[2]):
        sl = slice(t, t + 1)
        outs.append(decoding.step(method, state, q[:, :, sl], k[:, :, sl], v[:, :, sl], **opts))
        sizes.append(state.tokens)
    return torch.cat(outs, 2), sizes, state


@pytest.mark.parametrize("method,opts,bound", [
    ("dilated", {"window": 5, "dilations": (1, 3, 7)}, 7 * 4 + 1),
    ("dilated", {"window": 3, "dilations": 10}, 10 * 2 + 1),
    ("moa", {"alpha": (4, 9, 20), "sinks": 3}, 20 + 3),
    ("moa", {"alpha": (6,), "sinks": 0}, 6),
])
def test_decoding_equals_causal_forward_with_a_bounded_cache(method, opts, bound):
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, N, D = 2, 6, 2, 120, 8
    q = torch.randn(B, Hq, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    full = az.attention(q, k, v, method=method, causal=True, **opts)
    got, sizes, state = _decode(method, q, k, v, prefill=11, **opts)
    torch.testing.assert_close(got, full)
    assert max(sizes) == bound and sizes[-1] == bound  # reached and never exceeded: constant memory
    assert state.k.shape[2] == bound and state.nbytes() == 2 * B * Hkv * bound * D * 8


def test_moa_elastic_decoding_uses_span_of_max_len():
    g = torch.Generator().manual_seed(6)
    B, H, N, D = 1, 4, 80, 8
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    opts = {"alpha": (2, 4), "beta": (0.1, 0.25), "sinks": 1}
    full = az.attention(q, k, v, method="moa", causal=True, **opts)
    spans = moa.head_spans(opts["alpha"], opts["beta"], H, N)
    assert spans.tolist() == [10, 24, 10, 24]
    got, sizes, _ = _decode("moa", q, k, v, prefill=7, max_len=N, **opts)
    torch.testing.assert_close(got, full)
    assert max(sizes) == 24 + 1
    with pytest.raises(az.AttentionInputError, match=r"beta=.*needs init_state\(\.\.\., max_len=N\)"):
        decoding.init_state("moa", B, H, D, D, **opts)
    state = decoding.init_state("moa", B, H, D, D, max_len=3, dtype=torch.float64, **opts)
    decoding.step("moa", state, q[:, :, :3], k[:, :, :3], v[:, :, :3], **opts)
    with pytest.raises(az.AttentionInputError, match="past max_len=3"):
        decoding.step("moa", state, q[:, :, 3:4], k[:, :, 3:4], v[:, :, 3:4], **opts)


def test_step_with_other_options_than_the_state_raises():
    x = torch.randn(1, 2, 1, 8)
    state = decoding.init_state("dilated", 1, 2, 8, 8, window=4, dilations=(1, 2))
    with pytest.raises(az.AttentionInputError, match="same options to init_state"):
        decoding.step("dilated", state, x, x, x, window=4, dilations=(1, 5))
    state = decoding.init_state("moa", 1, 2, 8, 8, alpha=(4, 8))
    with pytest.raises(az.AttentionInputError, match="same options to init_state"):
        decoding.step("moa", state, x, x, x, alpha=(4, 16))


def test_option_errors():
    q = torch.randn(1, 2, 10, 8)
    with pytest.raises(az.AttentionInputError, match="dilations must be"):
        az.attention(q, q, q, method="dilated", dilations=(1, 0))
    with pytest.raises(az.AttentionInputError, match="window must be a positive int"):
        az.attention(q, q, q, method="dilated", window=0)
    with pytest.raises(az.AttentionInputError, match="alpha must be finite numbers >= 0"):
        az.attention(q, q, q, method="moa", alpha=(4, -1))
    with pytest.raises(az.AttentionInputError, match="sinks must be an int >= 0"):
        az.attention(q, q, q, method="moa", sinks=-2)


# ------------------------------------------------------------------------------ memory


@pytest.mark.parametrize("method,opts", [("dilated", {"window": 64, "dilations": (1, 8)}),
                                         ("moa", {"alpha": (64, 512), "sinks": 4})])
@pytest.mark.parametrize("causal", [True, False])
def test_block_never_allocates_n_by_n(method, opts, causal):
    N, D = 8192, 16  # large enough that the kernel's 4 Mi-element segment cap is far below N²/4
    q, k, v = (torch.randn(1, 2, N, D, requires_grad=True) for _ in range(3))
    probe = LargestTensor()
    with probe:
        out = az.attention(q, k, v, method=method, causal=causal, impl="block", **opts)
        out.sum().backward()
    assert probe.largest < N * N // 4, f"a tensor of {probe.largest} elements (N² = {N * N})"
    assert torch.isfinite(q.grad).all() and k.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ profiler


def _synthetic_attention(n):
    """Head 0 is local (the token itself and the one before); head 1 splits its weight
    between the first token (far back) and itself. Rows sum to 1."""
    a = torch.zeros(2, n, n, dtype=torch.float64)
    for i in range(n):
        a[0, i, i] += 0.5
        a[0, i, max(0, i - 1)] += 0.5
        a[1, i, 0] += 0.5
        a[1, i, i] += 0.5
    return a


def _brute_kept(a, h, span):
    n = a.shape[-1]
    return sum(float(a[h, i, max(0, i - span + 1):i + 1].sum()) for i in range(n)) / n


def test_fit_spans_gives_the_far_looking_head_the_longer_span():
    n, budget = 64, 33
    a = _synthetic_attention(n)
    fit = moa.fit_spans(a.unsqueeze(0).expand(3, -1, -1, -1), budget)  # (B, H, N, N): averaged over B
    spans = fit["spans"]
    assert spans.dtype == torch.long and spans.shape == (2,)
    assert spans[1] > spans[0] and spans.tolist() == [2, 64]
    assert fit["mean_span"] <= budget and fit["budget"] == budget
    for h in range(2):
        assert abs(float(fit["kept_mass"][h]) - _brute_kept(a, h, int(spans[h]))) < 1e-12
    uniform = sum(_brute_kept(a, h, budget) for h in range(2))  # every head gets the budget
    assert float(fit["kept_mass"].sum()) > uniform + 0.2
    # the spans drive the method directly
    q, k, v = (torch.randn(1, 2, n, 8, dtype=torch.float64) for _ in range(3))
    got = az.attention(q, k, v, method="moa", causal=True, alpha=spans, beta=0, impl="block", block_size=16)
    allowed = brute(lambda h, i, j: j in moa_keys(h, i, n, n, spans.tolist(), 0, True), 2, n, n)
    torch.testing.assert_close(got, az.attention(q, k, v, mask=allowed.unsqueeze(0)))


def test_fit_spans_on_real_weights_respects_the_budget_and_candidates():
    q, k, v = (torch.randn(2, 4, 50, 8) for _ in range(3))
    weights = az.attention(q, k, v, causal=True, return_weights=True)[1]
    fit = moa.fit_spans(weights, 12.5, candidates=[3, 10, 25, 50])
    assert set(fit["spans"].tolist()) <= {3, 10, 25, 50} and fit["mean_span"] <= 12.5
    full = moa.fit_spans(weights, 50)  # budget for the whole sequence: every head keeps all
    assert full["spans"].tolist() == [50] * 4
    torch.testing.assert_close(full["kept_mass"], torch.ones(4, dtype=torch.float64), atol=1e-6, rtol=0)
    with pytest.raises(az.AttentionInputError, match="smallest candidate span 3 exceeds budget=2"):
        moa.fit_spans(weights, 2, candidates=[3, 10])
    with pytest.raises(az.AttentionInputError, match="reference_attention must be"):
        moa.fit_spans(weights[0, 0, 0], 4)


# ------------------------------------------------------------------ sizing and edge options


def _density(method, n, **opts):
    """Fraction of (query, key) pairs the reference gives a nonzero weight (causal self),
    relative to the causally visible ones."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 4, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    _, w = az.attention(q, k, v, method=method, causal=True, impl="reference", return_weights=True, **opts)
    return float((w > 0).double().sum() / (4 * n * (n + 1) / 2))


@pytest.mark.parametrize("method", ["dilated", "moa"])
def test_sized_options_stay_local_at_short_lengths_and_are_the_defaults_at_long_ones(method):
    """for_length: windows of N/4 (dilated), spans N/8, N/4, N/4, N/2 (moa) at task
    lengths, so a query sees a fraction of the keys; the library defaults from N = 1024."""
    spec = az.get(method)
    for n in (32, 64, 256):
        assert 0.1 < _density(method, n, **spec.sized_options(n)) < 0.6, n
    for n in (1024, 8192):
        assert spec.sized_options(n) == {name: spec.options[name] for name in spec.sized_options(n)}
    assert spec.sized_options(64) == ({"window": 16} if method == "dilated" else {"alpha": (8, 16, 16, 32)})


EDGE_OPTIONS = [  # what the old test_options exercised: a dilation wider than the kernel's 64-token
    ("dilated", {"window": 6, "dilations": (1, 70, 3)}),  # block (gapped layouts), three rates
    ("moa", {"alpha": (5, 100, 17), "sinks": 2}),  # spans from 5 to 100 (one over a block), sinks
]


@pytest.mark.parametrize("method,opts", EDGE_OPTIONS, ids=[m for m, _ in EDGE_OPTIONS])
@pytest.mark.parametrize("pattern", ALL_PATTERNS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_block_matches_reference_with_wide_dilations_and_spans(method, opts, pattern, case):
    """The contract's three-way rule (outputs and q/k/v gradients) on its awkward shapes,
    with the default 64-token blocks."""
    contract_check(method, "block", pattern, opts, case)


@pytest.mark.parametrize("method,opts", EDGE_OPTIONS, ids=[m for m, _ in EDGE_OPTIONS])
def test_decoding_with_wide_dilations_and_spans(method, opts):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 45, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 45, 16, generator=g, dtype=torch.float64) for _ in range(2))
    got, _, _ = _decode(method, q, k, v, prefill=7, **opts)
    torch.testing.assert_close(got, az.attention(q, k, v, method=method, causal=True, **opts), atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------------------ score_mods


def _tilted(score, b, h, q_idx, kv_idx):  # not additive: the block kernel must chain through it
    return 3.0 * torch.tanh(score / 3.0) - 0.05 * (h + 1) * (q_idx - kv_idx).abs()


@pytest.mark.parametrize("method,opts", [("dilated", {"window": 5, "dilations": (1, 3)}),
                                         ("moa", {"alpha": (4, 11), "sinks": 1})])
@pytest.mark.parametrize("causal", [True, False])
def test_score_mods_in_every_path(method, opts, causal):
    """A caller's score_mod is applied by the reference — equal to softmax with the
    pattern as a mask and the same score_mod — and by ``block``, outputs and gradients."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64)
    ref = run(call(method, "reference", causal, None, False, **opts, score_mod=_tilted), q, k, v, dout)
    fast = run(call(method, "block", causal, None, False, **opts, block_size=16, score_mod=_tilted), q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, ref):
        torch.testing.assert_close(a, b, msg=name)
    _, w = az.attention(q, k, v, method=method, causal=causal, impl="reference", return_weights=True, **opts)
    expected = az.attention(q, k, v, mask=w > 0, score_mod=_tilted)
    torch.testing.assert_close(ref[0], expected)


# ------------------------------------------------------------------- flex block-mask cache


@pytest.mark.skipif(not masks.flex_available(), reason="FlexAttention missing from this torch build")
@pytest.mark.parametrize("method,opts,other", [
    ("dilated", {"window": 8, "dilations": (1, 3)}, {"window": 8, "dilations": (1, 4)}),
    ("moa", {"alpha": (16, 64), "sinks": 2}, {"alpha": (16, 64), "sinks": 3}),
])
def test_flex_block_masks_are_cached_by_the_pattern(monkeypatch, method, opts, other):
    """The flex paths give FlexAttention their pattern with a ``cache_key``: a second call
    with the same options reuses the block mask, other options build a new one. (The
    compiled kernel is stubbed out: only the block masks are under test.)"""
    from collections import OrderedDict

    from attnzoo.kernels import flex

    monkeypatch.setattr(flex, "_compiled", lambda: (lambda q, k, v, **kw: torch.zeros_like(q)))
    monkeypatch.setattr(flex, "_BLOCK_MASKS", OrderedDict())
    q = torch.randn(1, 2, 96, 16)
    with torch.no_grad():
        for causal in (True, False):
            az.attention(q, q, q, method=method, causal=causal, impl="flex", **opts)
            az.attention(q, q, q, method=method, causal=causal, impl="flex", **opts)
        assert len(flex._BLOCK_MASKS) == 2
        az.attention(q, q, q, method=method, causal=True, impl="flex", **other)
        assert len(flex._BLOCK_MASKS) == 3
    assert masks.dilated_window_mask(8, (1, 3), True, 90, 96).cache_key == ("dilated_window", 8, (1, 3), True, 6)
    assert masks.per_head_window_mask((16, 64), 2, False).cache_key == ("per_head_window", (16, 64), 2, False, 0)
