"""The multimodal mask_mods (Uni-Encoder, Video-CCAM, Croc) against loops over positions,
their cache keys, and through methods that take masks (fast forms vs references, and
softmax vs SDPA with the same dense mask)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo import masks
from attnzoo.errors import UnsupportedImpl

from helpers import assert_three_way, run


def brute(fn, nq, nk):
    return torch.tensor([[bool(fn(i, j)) for j in range(nk)] for i in range(nq)])


def dense(mod, nq, nk, batch=1):
    return masks.dense_mask(mod, batch, 1, nq, nk, expand=True)[:, 0]


# ------------------------------------------------------------------ Uni-Encoder


def segments(context_len, lens):
    """The segment of every position, by a loop: 0 = context, c + 1 = candidate c."""
    seg = [0] * context_len
    for c, n in enumerate(lens):
        seg += [c + 1] * n
    return seg


@pytest.mark.parametrize("context_len,lens", [(5, [3, 2, 4]), (0, [2, 2]), (4, [1]), (3, [1, 1, 1, 1])])
@pytest.mark.parametrize("sees", [False, True])
def test_candidate_isolation_against_loops(context_len, lens, sees):
    seg = segments(context_len, lens)
    n = len(seg)
    got = dense(masks.candidate_isolation_mask(context_len, lens, context_sees_candidates=sees), n, n)[0]

    def allowed(i, j):
        if seg[i] == 0:  # the context: only the context, unless it may see everything
            return sees or seg[j] == 0
        return seg[j] == 0 or seg[j] == seg[i]  # a candidate: the context and itself

    assert torch.equal(got, brute(allowed, n, n))
    if len(lens) > 1 and not sees:  # the first candidate never sees the second
        first, second = context_len, context_len + lens[0]
        assert not bool(got[first, second]) and not bool(got[second, first])


def test_candidate_isolation_aligned_lower_right():
    """Decoding the last 3 tokens over the whole sequence: the rows of the full mask."""
    seg_mod = masks.candidate_isolation_mask(4, [3, 3], q_len=3, kv_len=10)
    full = dense(masks.candidate_isolation_mask(4, [3, 3]), 10, 10)[0]
    assert torch.equal(dense(seg_mod, 3, 10)[0], full[7:])


# ------------------------------------------------------------------- Video-CCAM


def last_frame(i, Q, T):
    """The last frame query i sees, by a loop: the first t with (t + 1) / T >= (i + 1) / Q."""
    t = 0
    while (t + 1) * Q < (i + 1) * T:
        t += 1
    return t


@pytest.mark.parametrize("T,P,Q", [(4, 3, 8), (4, 2, 4), (3, 2, 7), (6, 1, 4), (1, 5, 3), (5, 2, 16)])
def test_video_causal_cross_against_loops(T, P, Q):
    got = dense(masks.video_causal_cross_mask(T, P, Q), Q, T * P + 2)[0]  # two keys past the video
    want = brute(lambda i, j: j < T * P and j // P <= last_frame(i, Q, T), Q, T * P + 2)
    assert torch.equal(got, want)
    assert bool(got[:, :P].all()), "every query sees the first frame"
    assert bool(got[-1, :T * P].all()), "the last query sees every frame"
    rows = got.sum(-1)
    assert bool((rows[1:] >= rows[:-1]).all()), "later queries see at least the frames earlier ones see"


def test_video_causal_cross_by_hand():
    """8 queries over 4 frames of 2 tokens: query groups of two, group t sees frames 0..t."""
    got = dense(masks.video_causal_cross_mask(4, 2, 8), 8, 8)[0]
    want = torch.zeros(8, 8, dtype=torch.bool)
    for i in range(8):
        want[i, : 2 * (i // 2 + 1)] = True
    assert torch.equal(got, want)


# ------------------------------------------------------------------------- Croc


@pytest.mark.parametrize("spans,n", [([(1, 4)], 8), ([(0, 3), (5, 8)], 10), ([(2, 3), (4, 9)], 12)])
def test_bidirectional_image_against_loops(spans, n):
    got = dense(masks.bidirectional_image_mask(spans), n, n)[0]

    def image(p):
        return next((s for s in spans if s[0] <= p < s[1]), None)

    want = brute(lambda i, j: j <= i or (image(i) is not None and image(i) == image(j)), n, n)
    assert torch.equal(got, want)


def test_bidirectional_image_block_ids_per_sequence_and_aligned():
    ids = torch.tensor([[0, 1, 1, 1, 0, 0, 2, 2, 0],
                        [1, 1, 0, 0, 0, 0, 0, 3, 3]])
    got = dense(masks.bidirectional_image_mask(block_ids=ids), 9, 9, batch=2)
    for b in range(2):
        want = brute(lambda i, j: j <= i or (ids[b, i] > 0 and ids[b, i] == ids[b, j]), 9, 9)
        assert torch.equal(got[b], want)
    # the same as spans, and lower-right aligned rows equal the full mask's last rows
    spans = masks.bidirectional_image_mask([(1, 4), (6, 8)])
    assert torch.equal(dense(spans, 9, 9)[0], got[0])
    tail = masks.bidirectional_image_mask([(1, 4), (6, 8)], q_len=4, kv_len=9)
    assert torch.equal(dense(tail, 4, 9)[0], got[0, 5:])


def test_one_image_in_front_is_a_prefix_lm_mask():
    assert torch.equal(dense(masks.bidirectional_image_mask([(0, 5)]), 12, 12),
                       dense(masks.prefix_lm_mask(5), 12, 12))


def test_bad_arguments_raise():
    with pytest.raises(az.AttentionInputError, match="candidate_lens"):
        masks.candidate_isolation_mask(3, [])
    with pytest.raises(az.AttentionInputError, match="tokens_per_frame"):
        masks.video_causal_cross_mask(4, 0, 8)
    with pytest.raises(az.AttentionInputError, match="overlap"):
        masks.bidirectional_image_mask([(0, 4), (3, 6)])
    with pytest.raises(az.AttentionInputError, match="exactly one"):
        masks.bidirectional_image_mask([(0, 4)], block_ids=torch.zeros(4, dtype=torch.long))


def test_cache_keys_name_the_parameters():
    a = masks.candidate_isolation_mask(4, [2, 3])
    assert a.cache_key == masks.candidate_isolation_mask(4, [2, 3]).cache_key
    assert a.cache_key != masks.candidate_isolation_mask(4, [3, 2]).cache_key
    v = masks.video_causal_cross_mask(4, 2, 8)
    assert v.cache_key == ("video_causal_cross", 4, 2, 8) != masks.video_causal_cross_mask(4, 2, 16).cache_key
    c = masks.bidirectional_image_mask([(1, 3)])
    assert c.cache_key != masks.bidirectional_image_mask([(1, 4)]).cache_key
    ids = masks.bidirectional_image_mask(block_ids=torch.tensor([0, 1, 1]))
    assert ids.cache_key != masks.bidirectional_image_mask(block_ids=torch.tensor([1, 1, 0])).cache_key
    for name in ("candidate_isolation_mask", "video_causal_cross_mask", "bidirectional_image_mask"):
        assert name in masks.__all__ and name in dir(masks)


# --------------------------------------------------------- through the methods

#: (name, mask_mod, Nq, Nk): the three masks at lengths that span several tiles
CASES = [
    ("uni_encoder", masks.candidate_isolation_mask(30, [20, 17, 13]), 80, 80),
    ("video_ccam", masks.video_causal_cross_mask(6, 9, 24), 24, 54),
    ("croc", masks.bidirectional_image_mask([(5, 29), (40, 61)]), 72, 72),
]
METHODS = ("softmax", "sliding_window", "block_sparse")


def _method_cases():
    for name, mod, nq, nk in CASES:
        for method in METHODS:
            for impl in az.get(method).impl_names[1:]:
                if impl != "flex":  # compiled FlexAttention: the contract covers it
                    yield pytest.param(name, mod, nq, nk, method, impl, id=f"{name}-{method}-{impl}")


@pytest.mark.parametrize("name,mod,nq,nk,method,impl", list(_method_cases()))
def test_masks_through_methods_fast_equals_reference(name, mod, nq, nk, method, impl):
    """Each fast impl with the mask_mod equals the reference (outputs and gradients, the
    fp64 three-way rule); the reference with the mask_mod equals it with the dense mask."""
    spec = az.get(method)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, nq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, nk, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, nk, 16, generator=g, dtype=torch.float64)
    dout = torch.randn(2, 4, nq, 16, generator=g, dtype=torch.float64)
    opts = {**spec.sized_options(max(nq, nk)), "cross": nq != nk}

    def fn(which, mask):
        return lambda a, b, c: az.attention(a, b, c, method=method, impl=which, mask=mask, **opts)

    info = spec.check(q.float().requires_grad_(True), k.float(), v.float(), mask=mod, **opts)
    if spec.why_not(spec.get_impl(impl), info) is not None:
        with pytest.raises(UnsupportedImpl):
            az.attention(q.float(), k.float(), v.float(), method=method, impl=impl, mask=mod, **opts)
        return
    ref64 = run(fn("reference", mod), q, k, v, dout)
    ref32 = run(fn("reference", mod), q.float(), k.float(), v.float(), dout)
    fast = run(fn(impl, mod), q.float(), k.float(), v.float(), dout)
    assert_three_way(fast, ref32, ref64, spec.get_impl(impl).fudge or spec.fudge, torch.float32)
    tensor_mask = masks.dense_mask(mod, 1, 1, nq, nk)
    with torch.no_grad():
        torch.testing.assert_close(fn("reference", tensor_mask)(q, k, v), ref64[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,mod,nq,nk", [pytest.param(*c, id=c[0]) for c in CASES])
def test_softmax_with_the_mask_equals_sdpa_with_the_brute_force_mask(name, mod, nq, nk):
    """Independent truth: SDPA with the mask built by loops over positions."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (nq, nk, nk))
    want_mask = brute(lambda i, j: bool(mod(0, 0, torch.tensor(i), torch.tensor(j))), nq, nk)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=want_mask)
    for impl in ("reference", "sdpa", "tiled"):
        out = az.attention(q, k, v, method="softmax", impl=impl, mask=mod, cross=nq != nk)
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-6)


@pytest.mark.skipif(not masks.flex_available(), reason="FlexAttention is not in this PyTorch build")
def test_flex_block_masks_from_the_same_mask_mods():
    """FlexAttention evaluates the mask_mods under vmap: its block mask marks the same tiles."""
    for _, mod, nq, nk in CASES:
        bm = masks.block_mask(mod, None, None, nq, nk, block_size=16)
        layout = masks.block_layout(mod, 1, 1, nq, nk, block_size=16)[0, 0]
        assert torch.equal(bm.to_dense()[0, 0, : layout.shape[0], : layout.shape[1]].bool(), layout)
