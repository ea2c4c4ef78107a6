"""sliding_window and block_sparse: the patterns against brute force, the kernel's
memory, decoding with a bounded cache, layouts from mask_mods."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo import decoding, masks
from attnzoo.methods.sparse import block_sparse

from attnzoo.registry import PATTERNS

from helpers import CASES, LargestTensor, call, contract_check, run


def brute(fn, nq, nk):
    return torch.tensor([[bool(fn(i, j)) for j in range(nk)] for i in range(nq)])


@pytest.mark.parametrize("window,sinks", [(1, 0), (5, 0), (5, 2), (8, 3), (40, 1)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk", [(17, 17), (9, 23), (23, 9)])
def test_window_sink_pattern_equals_brute_force(window, sinks, causal, nq, nk):
    got = masks.dense_mask(masks.sliding_window_sink_mask(window, sinks, causal, nq, nk), 1, 1, nq, nk)[0, 0]
    off = nk - nq

    def allowed(i, j):
        pos = i + off
        if causal:
            return j <= pos and (j > pos - window or j < sinks)
        return abs(j - pos) <= window // 2 or j < sinks

    assert torch.equal(got, brute(allowed, nq, nk))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window,sinks,block", [(7, 0, 4), (24, 3, 16), (64, 4, 16), (3, 5, 8)])
def test_window_layout_covers_exactly_the_touched_blocks(causal, window, sinks, block):
    from attnzoo.kernels.windows import window_layout

    for nq, nk in ((70, 70), (30, 70), (70, 45)):
        layout = window_layout(nq, nk, block, window, sinks, causal)[0]
        mod = masks.sliding_window_sink_mask(window, sinks, causal, nq, nk)
        expected = masks.block_layout(mod, 1, 1, nq, nk, block_size=block)[0, 0]
        assert torch.equal(layout | expected, layout), "a touched block is missing from the layout"
        assert int(layout.sum()) <= int(expected.sum()) + layout.shape[0], "the layout keeps far too many blocks"


@pytest.mark.parametrize("impl", ["reference", "block"])
def test_sliding_window_equals_sdpa_with_the_band_mask(impl):
    import torch.nn.functional as F

    q, k, v = (torch.randn(2, 4, 130, 16) for _ in range(3))
    band = masks.dense_mask(masks.sliding_window_sink_mask(32, 4, True), 1, 1, 130, 130)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
    got = az.attention(q, k, v, method="sliding_window", causal=True, window=32, sinks=4, impl=impl,
                       **({"block_size": 16} if impl == "block" else {}))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("sinks", [0, 4])
def test_sliding_window_decoding_keeps_w_plus_s_tokens(sinks):
    """Decoding equals the causal forward and the cache never holds more than w + s tokens."""
    B, H, N, D, w = 1, 2, 90, 8, 16
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    full = az.attention(q, k, v, method="sliding_window", causal=True, window=w, sinks=sinks)
    state = decoding.init_state("sliding_window", B, H, D, D, dtype=torch.float64, window=w, sinks=sinks)
    outs, sizes = [decoding.step("sliding_window", state, q[:, :, :20], k[:, :, :20], v[:, :, :20], window=w,
                                 sinks=sinks)], []
    for t in range(20, N):
        outs.append(decoding.step("sliding_window", state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                  window=w, sinks=sinks))
        sizes.append(state.tokens)
    torch.testing.assert_close(torch.cat(outs, 2), full)
    assert max(sizes) == w + sinks and sizes[-1] == w + sinks


@pytest.mark.parametrize("method,opts", [("sliding_window", {"window": 128, "sinks": 4}),
                                         ("block_sparse", {"layout": block_sparse.random_layout(0.05, 1)})])
def test_block_kernel_never_allocates_n_by_n(method, opts):
    N, D = 8192, 16  # large enough that the kernel's 4 Mi-element segment cap is far below N²/4
    q, k, v = (torch.randn(1, 1, N, D, requires_grad=True) for _ in range(3))
    probe = LargestTensor()
    with probe:
        out = az.attention(q, k, v, method=method, causal=True, impl="block", **opts)
        out.sum().backward()
    assert probe.largest < N * N // 4, f"a tensor of {probe.largest} elements (N² = {N * N})"
    assert torch.isfinite(q.grad).all() and k.grad.abs().sum() > 0


def test_block_sparse_layout_from_a_mask_mod_and_per_head_layouts():
    q, k, v = (torch.randn(1, 2, 50, 8, dtype=torch.float64) for _ in range(3))
    mod = masks.and_masks(masks.causal_mask(), masks.sliding_window_mask(10))
    ref = az.attention(q, k, v, mask=mod)  # exact softmax with the element mask
    # the layout built from the mask_mod keeps every needed tile, and the element mask does the rest
    torch.testing.assert_close(az.attention(q, k, v, method="block_sparse", mask=mod, block_size=8, impl="block"), ref)
    lay = torch.zeros(2, 7, 7, dtype=torch.bool)
    lay[0] = torch.eye(7, dtype=torch.bool)  # head 0: diagonal tiles only
    lay[1] = True  # head 1: everything
    out = az.attention(q, k, v, method="block_sparse", layout=lay, block_size=8, impl="block")
    torch.testing.assert_close(out, az.attention(q, k, v, method="block_sparse", layout=lay, block_size=8))
    torch.testing.assert_close(out[:, 1], az.attention(q, k, v)[:, 1])
    blockdiag = torch.block_diag(*[torch.ones(8, 8)] * 6, torch.ones(2, 2)).bool()
    torch.testing.assert_close(out[:, 0], az.attention(q, k, v, mask=blockdiag)[:, 0])


def test_block_sparse_errors():
    q = torch.randn(1, 2, 50, 8)
    with pytest.raises(az.AttentionInputError, match="needs layout="):
        az.attention(q, q, q, method="block_sparse")
    with pytest.raises(az.AttentionInputError, match=r"layout must have shape \(1 or Hq, ceil\(Nq/block\), ceil\(Nk/block\)\) = \(1 or 2, 4, 4\)"):
        az.attention(q, q, q, method="block_sparse", layout=torch.ones(1, 3, 3, dtype=torch.bool), block_size=16)


def test_kernel_takes_per_sequence_layouts():
    """Content-routed methods select different blocks per sequence: (B, H, nqb, K) indices."""
    from attnzoo.kernels.blocksparse import block_indices, block_sparse_attention

    q, k, v = (torch.randn(2, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    lay = torch.zeros(2, 2, 5, 5, dtype=torch.bool)
    lay[0, :, :, 0] = True  # sequence 0: every query block sees key block 0 only
    lay[1] = torch.eye(5, dtype=torch.bool)  # sequence 1: the diagonal
    idx, valid = block_indices(lay)
    out = block_sparse_attention(q, k, v, idx=idx, valid=valid, block=8, scale=8 ** -0.5)
    m0 = torch.zeros(40, 40, dtype=torch.bool)
    m0[:, :8] = True
    m1 = torch.block_diag(*[torch.ones(8, 8)] * 5).bool()
    torch.testing.assert_close(out[0], az.attention(q[:1], k[:1], v[:1], mask=m0)[0])
    torch.testing.assert_close(out[1], az.attention(q[1:], k[1:], v[1:], mask=m1)[0])


@pytest.mark.slow
@pytest.mark.skipif(not masks.flex_available(), reason="FlexAttention missing from this torch build")
def test_flex_paths_of_pattern_methods_equal_their_references():
    """Every pattern-defined method's FlexAttention path (compiled; CPU inference) runs the
    same mask_mod as its reference (one shape for all, so one compilation)."""
    q, k, v = (torch.randn(1, 2, 256, 16) for _ in range(3))
    kpm = torch.ones(1, 256, dtype=torch.bool)
    kpm[0, 200:] = False
    cases = [
        ("sliding_window", {"window": 40, "sinks": 3}, True),
        ("block_sparse", {"layout": block_sparse.random_layout(0.4, 2), "block_size": 32}, True),
        ("dilated", {"window": 8, "dilations": (1, 3)}, True),
        ("moa", {"alpha": (16, 64), "sinks": 2}, False),
        ("neighborhood", {"kernel_size": 5, "grid": (16, 16)}, False),
    ]
    with torch.no_grad():
        for method, opts, causal in cases:
            expected = az.attention(q, k, v, method=method, causal=causal, key_mask=kpm, impl="reference",
                                    **opts)
            got = az.attention(q, k, v, method=method, causal=causal, key_mask=kpm, impl="flex", **opts)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5, msg=method)


# ------------------------------------------------------------------ sizing and edge options


def _density(method, n, **opts):
    """Fraction of (query, key) pairs the reference gives a nonzero weight (noncausal self)."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 4, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    _, w = az.attention(q, k, v, method=method, impl="reference", return_weights=True, **opts)
    return float((w > 0).double().mean())


@pytest.mark.parametrize("method", ["sliding_window", "block_sparse"])
def test_sized_options_stay_local_at_short_lengths_and_are_the_defaults_at_long_ones(method):
    """for_length: a query sees roughly a quarter of the keys at task lengths; the library
    defaults (window 256, blocks of 64) from long lengths on."""
    spec = az.get(method)
    for n in (32, 64, 256):
        assert 0.1 < _density(method, n, **spec.sized_options(n)) < 0.4, n
    long = spec.sized_options(4096)
    if method == "sliding_window":
        assert long == {"window": spec.options["window"]}
    else:
        assert long["block_size"] == spec.options["block_size"]
        assert long["layout"] == block_sparse.FixedLayout(local=1, stride=4)
    assert spec.sized_options(1) and all(v >= 1 for v in spec.sized_options(1).values() if isinstance(v, int))


EDGE_OPTIONS = [  # what the old test_options exercised: sinks; a random layout of small tiles
    ("sliding_window", {"window": 24, "sinks": 3}),
    ("block_sparse", {"layout": block_sparse.random_layout(0.5, seed=0), "block_size": 16}),
]


@pytest.mark.parametrize("method,opts", EDGE_OPTIONS, ids=[m for m, _ in EDGE_OPTIONS])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_block_matches_reference_with_sinks_and_random_layouts(method, opts, pattern, case):
    """The contract's three-way rule (outputs and q/k/v gradients) on its awkward shapes."""
    contract_check(method, "block", pattern, opts, case)


# ------------------------------------------------------------------------------ score_mods


def _tilted(score, b, h, q_idx, kv_idx):  # not additive: the block kernel must chain through it
    return 3.0 * torch.tanh(score / 3.0) - 0.05 * (h + 1) * (q_idx - kv_idx).abs()


@pytest.mark.parametrize("method,opts", [("sliding_window", {"window": 9, "sinks": 2}),
                                         ("block_sparse", {"layout": block_sparse.FixedLayout(1, 3),
                                                           "block_size": 8})])
@pytest.mark.parametrize("causal", [True, False])
def test_score_mods_in_every_path(method, opts, causal):
    """A caller's score_mod (ALiBi-like bias over a soft cap) is applied by the reference —
    equal to softmax with the pattern as a mask and the same score_mod — and by ``block``,
    outputs and gradients."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64)
    kw = dict(opts, causal=causal, score_mod=_tilted)
    ref = run(call(method, "reference", causal, None, False, **opts, score_mod=_tilted), q, k, v, dout)
    fast = run(call(method, "block", causal, None, False, **opts, score_mod=_tilted), q, k, v, dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, ref):
        torch.testing.assert_close(a, b, msg=name)
    _, w = az.attention(q, k, v, method=method, impl="reference", return_weights=True, **{**opts, "causal": causal})
    expected = az.attention(q, k, v, mask=w > 0, score_mod=_tilted)
    torch.testing.assert_close(az.attention(q, k, v, method=method, impl="reference", **kw), expected)


# ------------------------------------------------------------------- flex block-mask cache


@pytest.mark.skipif(not masks.flex_available(), reason="FlexAttention missing from this torch build")
@pytest.mark.parametrize("method,opts,other,cached", [
    ("sliding_window", {"window": 16, "sinks": 2}, {"window": 17, "sinks": 2}, True),
    ("block_sparse", {"layout": block_sparse.FixedLayout(1, 4), "block_size": 16},
     {"layout": block_sparse.random_layout(0.3, 1), "block_size": 16}, True),
    ("block_sparse", {"layout": torch.eye(6, dtype=torch.bool), "block_size": 16},
     {"layout": torch.ones(6, 6, dtype=torch.bool), "block_size": 16}, False),
])
def test_flex_block_masks_are_cached_by_the_pattern(monkeypatch, method, opts, other, cached):
    """The flex paths give FlexAttention their pattern with a ``cache_key``: a second call
    with the same options reuses the block mask, other options build a new one; a layout
    given as a tensor (content) is rebuilt per call. (The compiled kernel is stubbed out:
    only the block masks are under test.)"""
    from collections import OrderedDict

    from attnzoo.kernels import flex

    monkeypatch.setattr(flex, "_compiled", lambda: (lambda q, k, v, **kw: torch.zeros_like(q)))
    monkeypatch.setattr(flex, "_BLOCK_MASKS", OrderedDict())
    q = torch.randn(1, 2, 96, 16)
    with torch.no_grad():
        for causal in (True, False):
            az.attention(q, q, q, method=method, causal=causal, impl="flex", **opts)
            az.attention(q, q, q, method=method, causal=causal, impl="flex", **opts)
        assert len(flex._BLOCK_MASKS) == (2 if cached else 0)
        az.attention(q, q, q, method=method, causal=True, impl="flex", **other)
        assert len(flex._BLOCK_MASKS) == (3 if cached else 0)
    mod = masks.sliding_window_sink_mask(16, 2, True, 90, 96)
    assert mod.cache_key == masks.sliding_window_sink_mask(16, 2, True, 90, 96).cache_key == (
        "sliding_window", 16, 2, True, 6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_block_sparse_kernel_forward_without_graph_equals_dense_and_the_graph_path(causal, kv_heads):
    """The kernel's no-graph forward (per-head blocks gathered from the whole k, v) against
    dense masked softmax in float64 and against its recomputing autograd path: random
    per-sequence, per-head selections with unused slots, key padding, GQA, a ragged end."""
    from attnzoo.kernels.blocksparse import block_sparse_attention

    g = torch.Generator().manual_seed(3)
    B, Hq, N, D, bs, K = 2, 4, 70, 8, 16, 3
    nb = -(-N // bs)
    q = torch.randn(B, Hq, N, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, kv_heads, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, kv_heads, N, D, generator=g, dtype=torch.float64)
    # distinct blocks per row (as block_indices gives), the own block first
    own = torch.arange(nb).view(1, 1, nb, 1)
    others = torch.rand(B, Hq, nb, nb, generator=g).masked_fill(torch.eye(nb, dtype=torch.bool), -1.0)
    idx = torch.cat([own.expand(B, Hq, nb, 1), others.argsort(-1, descending=True)[..., :K - 1]], -1)
    valid = torch.rand(B, Hq, nb, K, generator=g) < 0.7
    valid[..., 0] = True
    garbage = torch.tensor([-1, nb + 7])[torch.randint(0, 2, idx.shape, generator=g)]
    idx = torch.where(valid, idx, garbage)  # unused slots hold garbage, out of range both ways
    key_mask = torch.ones(B, N, dtype=torch.bool)
    key_mask[1, -9:] = False
    with torch.no_grad():
        fast = block_sparse_attention(q, k, v, idx=idx, valid=valid, block=bs, scale=D ** -0.5, causal=causal,
                                      key_mask=key_mask)
    qg = q.clone().requires_grad_(True)
    graph = block_sparse_attention(qg, k, v, idx=idx, valid=valid, block=bs, scale=D ** -0.5, causal=causal,
                                   key_mask=key_mask)
    # dense truth: key j visible to query i iff its block is kept for i's block (and causal, real)
    kept = torch.zeros(B, Hq, nb, nb, dtype=torch.long).scatter_add_(-1, idx.clamp(0, nb - 1), valid.long()) > 0
    allowed = kept.repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :N, :N] & key_mask.view(B, 1, 1, N)
    if causal:
        allowed &= torch.ones(N, N, dtype=torch.bool).tril()
    s = (q @ k.repeat_interleave(Hq // kv_heads, 1).transpose(-1, -2)) * D ** -0.5
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    dense = p @ v.repeat_interleave(Hq // kv_heads, 1)
    assert torch.allclose(fast, dense, atol=1e-12)
    assert torch.allclose(graph.detach(), fast, atol=1e-12)
