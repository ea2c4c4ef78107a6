"""sliding_window and block_sparse: the patterns against brute force, the kernel's
memory, decoding with a bounded cache, layouts from mask_mods."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo import decoding, masks
from attnzoo.methods import block_sparse

from helpers import LargestTensor


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
    from attnzoo.methods.sliding_window import window_layout

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
    from attnzoo.methods._blocksparse import block_indices, block_sparse_attention

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
            expected = az.attention(q, k, v, method=method, causal=causal, key_padding_mask=kpm, impl="reference",
                                    **opts)
            got = az.attention(q, k, v, method=method, causal=causal, key_padding_mask=kpm, impl="flex", **opts)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5, msg=method)
