"""mask_mods against brute-force loops over positions, composition, block forms."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo import masks


def brute(fn, nq, nk):
    return torch.tensor([[bool(fn(i, j)) for j in range(nk)] for i in range(nq)])


@pytest.mark.parametrize("nq,nk", [(1, 1), (5, 5), (7, 11), (11, 7), (33, 33)])
def test_causal_lower_right(nq, nk):
    got = masks.dense_mask(masks.causal_mask(nq, nk), 1, 1, nq, nk)[0, 0]
    assert torch.equal(got, brute(lambda i, j: j <= i + nk - nq, nq, nk))


@pytest.mark.parametrize("window", [1, 2, 5, 8])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nk", [(13, 13), (6, 13)])
def test_sliding_window(window, causal, nq, nk):
    got = masks.dense_mask(masks.sliding_window_mask(window, causal, nq, nk), 1, 1, nq, nk)[0, 0]
    off = nk - nq
    if causal:
        want = brute(lambda i, j: i + off - window < j <= i + off, nq, nk)
    else:
        want = brute(lambda i, j: abs(j - (i + off)) <= window // 2, nq, nk)
    assert torch.equal(got, want)
    if causal:
        assert int(got.sum(-1).max()) == window or nk < window


def test_prefix_lm():
    got = masks.dense_mask(masks.prefix_lm_mask(4), 1, 1, 10, 10)[0, 0]
    assert torch.equal(got, brute(lambda i, j: j < 4 or j <= i, 10, 10))


def test_document_mask_batched_segments():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2]])
    mod = masks.and_masks(masks.document_mask(ids), masks.causal_mask())
    got = masks.dense_mask(mod, 2, 1, 6, 6)
    for b in range(2):
        want = brute(lambda i, j: ids[b, i] == ids[b, j] and j <= i, 6, 6)
        assert torch.equal(got[b, 0], want)


def test_modality_mutual():
    """AKI: tokens [2, 5) (the image) see the whole sequence; the rest is causal."""
    got = masks.dense_mask(masks.modality_mutual_mask(3, start=2), 1, 1, 9, 9)[0, 0]
    assert torch.equal(got, brute(lambda i, j: 2 <= i < 5 or j <= i, 9, 9))


def test_and_or_padding_and_heads():
    padded = torch.tensor([[False, False, True, False]])  # nn.MultiheadAttention's meaning: True = padding
    per_head = lambda b, h, q, kv: (kv % 2) == (h % 2)  # noqa: E731
    mod = masks.or_masks(masks.and_masks(masks.causal_mask(), masks.padding_mask(padded)), per_head)
    got = masks.dense_mask(mod, 1, 2, 4, 4)
    for h in range(2):
        want = brute(lambda i, j: (j <= i and not bool(padded[0, j])) or j % 2 == h % 2, 4, 4)
        assert torch.equal(got[0, h], want)
    with pytest.raises(az.AttentionInputError):
        masks.and_masks()


def test_dense_mask_keeps_ignored_axes_broadcast():
    m = masks.dense_mask(masks.causal_mask(), 4, 8, 16, 16)
    assert m.shape == (1, 1, 16, 16)
    assert masks.dense_mask(masks.causal_mask(), 4, 8, 16, 16, expand=True).shape == (4, 8, 16, 16)


def test_block_layout_matches_dense_blocks():
    mod = masks.sliding_window_mask(10, causal=True)
    n, bs = 70, 16
    layout = masks.block_layout(mod, 1, 1, n, n, block_size=bs)
    dense = masks.dense_mask(mod, 1, 1, n, n)[0, 0]
    nb = -(-n // bs)
    want = torch.tensor([[bool(dense[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].any()) for j in range(nb)]
                         for i in range(nb)])
    assert torch.equal(layout[0, 0], want)


def test_mask_mod_as_attention_mask():
    q = torch.randn(1, 2, 12, 8)
    mod = masks.prefix_lm_mask(5)
    torch.testing.assert_close(az.attention(q, q, q, mask=mod),
                               az.attention(q, q, q, mask=masks.dense_mask(mod, 1, 2, 12, 12)))


@pytest.mark.slow
@pytest.mark.skipif(not masks.flex_available(), reason="FlexAttention missing from this torch build")
def test_flex_block_mask_from_same_function_and_flex_impl():
    """The FlexAttention BlockMask comes from the same mask_mod; the flex impl (compiled,
    inference-only on CPU) equals the reference with it."""
    n = 256
    mod = masks.and_masks(masks.causal_mask(), masks.sliding_window_mask(64))
    bm = masks.block_mask(mod, None, None, n, n, block_size=128)
    dense_blocks = masks.block_layout(mod, 1, 1, n, n, block_size=128)[0, 0]
    assert torch.equal(bm.to_dense()[0, 0].bool(), dense_blocks)
    q, k, v = (torch.randn(1, 2, n, 64) for _ in range(3))
    expected = az.attention(q, k, v, mask=mod, impl="reference")
    with torch.no_grad():
        torch.testing.assert_close(az.attention(q, k, v, mask=mod, impl="flex"), expected, atol=2e-5, rtol=2e-5)
