"""seer (SeerAttention's learnable block gate) and recycled (Recycled Attention's decoding):
selection against brute force, fast vs reference, alignment, padding, memory, recall,
gate training, and the recycled decoder's schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo import stats
from attnzoo.methods.sparse import recycled, seer

from helpers import LargestTensor

# ============================================================================ seer


def brute_select(q, k, *, block, topk=None, threshold=None, gq=None, gk=None, causal=False, kpm=None, mask=None):
    """The gate's selection written with Python loops over blocks and elements."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nqb, nkb = math.ceil(Nq / block), math.ceil(Nk / block)
    off = Nk - Nq
    out = torch.zeros(B, Hq, nqb, nkb, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            for i in range(nqb):
                rows = list(range(i * block, min((i + 1) * block, Nq)))
                qp = q[b, h, rows].mean(0)
                pq = qp if gq is None else qp @ gq[h]
                last = rows[-1] + off
                scores, visible, forced = {}, [], set()
                for j in range(nkb):
                    keys = [t for t in range(j * block, min((j + 1) * block, Nk)) if kpm is None or kpm[b, t]]
                    if not keys:
                        continue
                    kb = k[b, h // G, keys]
                    pooled = torch.cat([kb.max(0).values, kb.min(0).values, kb.mean(0)])
                    pk = pooled[:D] + pooled[D:2 * D] + pooled[2 * D:] if gk is None else pooled @ gk[h]
                    scores[j] = float(pq @ pk) / math.sqrt(pk.shape[0])
                    seen = [t for t in keys if not causal or t <= last]
                    if mask is not None:
                        tile_ok = any(bool(mask[r, t]) for r in rows for t in range(j * block, min((j + 1) * block, Nk)))
                    else:
                        tile_ok = True
                    if seen and tile_ok:
                        visible.append(j)
                diag_blocks = set()
                if not (causal and last < 0):
                    for r in rows:
                        diag_blocks.add(min(max(r + off, 0), Nk - 1) // block)
                forced = {j for j in diag_blocks if j in visible}
                if threshold is not None:
                    z = torch.tensor([scores[j] for j in visible], dtype=torch.float64)
                    p = torch.softmax(z, 0) if len(visible) else z
                    keep = {j for j, pj in zip(visible, p.tolist()) if pj >= threshold}
                else:
                    order = sorted(visible, key=lambda j: (j not in forced, -scores[j], j))
                    keep = set(order[:topk])
                for j in keep | forced:
                    out[b, h, i, j] = True
    return out


SELECT_CASES = [
    # (B, Hq, Hkv, Nq, Nk, block, causal, padding)
    (1, 2, 2, 37, 37, 8, True, False),
    (2, 4, 2, 40, 70, 8, True, True),
    (2, 2, 1, 70, 33, 16, True, False),
    (1, 2, 2, 50, 50, 8, False, True),
    (2, 4, 4, 21, 64, 8, False, False),
]


@pytest.mark.parametrize("case", SELECT_CASES)
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("mode", ["topk", "threshold"])
def test_seer_selection_equals_brute_force(case, weights, mode):
    B, Hq, Hkv, Nq, Nk, block, causal, padding = case
    g = torch.Generator().manual_seed(3)
    D, Dg = 6, 5
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64)
    kpm = None
    if padding:
        kpm = torch.rand(B, Nk, generator=g) > 0.3
        kpm[-1, Nk // 2:] = False  # whole padded blocks too
    gq = torch.randn(Hq, D, Dg, generator=g, dtype=torch.float64) if weights else None
    gk = torch.randn(Hq, 3 * D, Dg, generator=g, dtype=torch.float64) if weights else None
    opts = {"topk": 3, "threshold": None} if mode == "topk" else {"topk": 3, "threshold": 0.15}
    got = seer.select_blocks(q, k, causal=causal, key_mask=kpm, block_size=block, gate_q=gq, gate_k=gk,
                             **opts)
    expected = brute_select(q, k, block=block, causal=causal, kpm=kpm, gq=gq, gk=gk, **opts)
    assert torch.equal(got, expected)
    if mode == "topk":  # at most topk blocks per row unless the diagonal needs more
        assert int(got.sum(-1).max()) <= 3


def test_seer_selection_with_a_dense_mask_equals_brute_force():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 40, 6, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 40, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(40, 40, generator=g) > 0.97
    mask[:, 32:] = False  # the last key block is never allowed
    got = seer.select_blocks(q, k, causal=True, mask=mask.view(1, 1, 40, 40), block_size=8, topk=2)
    assert torch.equal(got, brute_select(q, k, block=8, topk=2, causal=True, mask=mask))
    assert not got[..., 4].any()


def _inputs(B, Hq, Hkv, Nq, Nk, D, Dv, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=dtype))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 2, 90, 90), (1, 2, 1, 50, 130), (2, 2, 2, 130, 45)])
@pytest.mark.parametrize("extra", ["none", "padding", "mask", "weights", "threshold"])
def test_seer_fast_equals_reference_float64_with_grads(causal, shape, extra):
    B, Hq, Hkv, Nq, Nk = shape
    q, k, v = _inputs(B, Hq, Hkv, Nq, Nk, 12, 7)
    opts = {"block_size": 16, "topk": 2}
    if extra == "padding":
        kpm = torch.ones(B, Nk, dtype=torch.bool)
        kpm[-1, Nk // 3:] = False
        opts["key_mask"] = kpm
    if extra == "mask":
        opts["mask"] = torch.rand(1, Hq, Nq, Nk, generator=torch.Generator().manual_seed(9)) > 0.2
    if extra == "weights":
        opts["gate_q"] = torch.randn(Hq, 12, 4, dtype=torch.float64)
        opts["gate_k"] = torch.randn(Hq, 36, 4, dtype=torch.float64)
    if extra == "threshold":
        opts["threshold"] = 0.1
    dout = torch.randn(B, Hq, Nq, 7, dtype=torch.float64)
    res = []
    for impl in ("reference", "block"):
        a, b, c = (t.clone().requires_grad_(True) for t in (q, k, v))
        out = az.attention(a, b, c, method="seer", impl=impl, causal=causal, **opts)
        grads = torch.autograd.grad(out, (a, b, c), dout)
        res.append((out, *grads))
    for x, y in zip(*res):
        torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-10)
    assert res[0][0].abs().sum() > 0


def test_seer_with_all_blocks_is_exact_softmax_with_lower_right_causal_alignment():
    """topk >= number of key blocks: every visible block is kept, so seer is softmax
    with the lower-right causal mask, built here independently."""
    for nq, nk in ((30, 70), (70, 30), (64, 64)):
        q, k, v = _inputs(2, 4, 2, nq, nk, 8, 8, seed=1)
        allowed = torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=nk - nq)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        expected = expected.masked_fill(~allowed.any(-1).view(1, 1, nq, 1), 0.0)
        for impl in ("reference", "block"):
            got = az.attention(q, k, v, method="seer", impl=impl, causal=True, block_size=8, topk=100)
            torch.testing.assert_close(got, expected)


def test_seer_causal_rows_see_only_the_past_and_always_themselves():
    """Changing future keys/values changes no output; with topk=1 (only the diagonal
    block) every row still attends (its own key), so no row is zero."""
    q, k, v = _inputs(1, 2, 2, 64, 64, 8, 8, seed=2)
    out = az.attention(q, k, v, method="seer", impl="block", causal=True, block_size=8, topk=1)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 40:] += 5.0
    v2[:, :, 40:] -= 3.0
    out2 = az.attention(q, k2, v2, method="seer", impl="block", causal=True, block_size=8, topk=1)
    # rows in blocks 0..4 ([0, 40)) see no key >= 40 and their gate pools no future block
    torch.testing.assert_close(out[:, :, :40], out2[:, :, :40])
    assert (out.abs().sum(-1) > 0).all()
    # topk=1: exactly the diagonal block
    lay = seer.select_blocks(q, k, causal=True, block_size=8, topk=1)
    assert torch.equal(lay[0, 0], torch.eye(8, dtype=torch.bool))


def test_seer_padding_is_respected():
    """Padded keys change nothing (neither the gate's pooling nor the attention): garbage
    under the padding gives the same result, and the padded keys get zero weight."""
    q, k, v = _inputs(2, 2, 2, 33, 80, 8, 8, seed=3)
    kpm = torch.ones(2, 80, dtype=torch.bool)
    kpm[1, 52:] = False
    kpm[0, 3:20] = False
    k2, v2 = k.clone(), v.clone()
    k2[~kpm.view(2, 1, 80).expand(2, 2, 80)] = 100.0
    v2[~kpm.view(2, 1, 80).expand(2, 2, 80)] = 1e6
    for causal in (False, True):
        for impl in ("reference", "block"):
            got = az.attention(q, k2, v2, method="seer", impl=impl, key_mask=kpm, block_size=8, topk=2,
                               causal=causal)
            expected = az.attention(q, k, v, method="seer", impl=impl, key_mask=kpm, block_size=8, topk=2,
                                    causal=causal)
            torch.testing.assert_close(got, expected)
        lay = seer.select_blocks(q, k2, key_mask=kpm, block_size=8, topk=2, causal=causal)
        assert not lay[1, ..., 7:].any()  # blocks of padding only are never kept
        _, w = az.attention(q, k2, v2, method="seer", impl="reference", key_mask=kpm, block_size=8, topk=2,
                            causal=causal, return_weights=True)
        assert (w[~kpm.view(2, 1, 1, 80).expand_as(w)] == 0).all()


def test_seer_fully_masked_rows_give_zeros():
    q, k, v = _inputs(2, 2, 2, 20, 20, 8, 8, seed=4)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[1] = False  # a sequence with no real key
    mask = torch.ones(1, 1, 20, 20, dtype=torch.bool)
    mask[..., 5, :] = False  # a row with nothing allowed
    for impl in ("reference", "block"):
        out = az.attention(q, k, v, method="seer", impl=impl, causal=True, key_mask=kpm, mask=mask,
                           block_size=8, topk=1)
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all() and (out[0, :, 5] == 0).all() and (out[0, :, 6] != 0).any()


def test_seer_module_matches_the_functional_form_and_gate_gets_no_output_gradient():
    module = az.build("seer", heads=4, kv_heads=2, head_dim=8, block_size=8, gate_dim=6, topk=2)
    assert tuple(module.gate_q.shape) == (4, 8, 6) and tuple(module.gate_k.shape) == (4, 24, 6)
    q, k, v = _inputs(1, 4, 2, 40, 40, 8, 8, seed=5, dtype=torch.float32)
    q.requires_grad_(True)
    out = module(q, k, v, causal=True)
    ref = az.attention(q, k, v, method="seer", impl="reference", causal=True, block_size=8, topk=2,
                       gate_q=module.gate_q, gate_k=module.gate_k)
    torch.testing.assert_close(out, ref)
    out.sum().backward()  # [J] the discrete selection is not differentiated
    assert module.gate_q.grad is None and module.gate_k.grad is None
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_seer_bad_gate_weights_raise():
    q, k, v = _inputs(1, 2, 2, 16, 16, 8, 8)
    with pytest.raises(az.AttentionInputError, match="gate_k"):
        az.attention(q, k, v, method="seer", gate_q=torch.randn(2, 8, 4, dtype=torch.float64),
                     gate_k=torch.randn(2, 8, 4, dtype=torch.float64))
    with pytest.raises(az.AttentionInputError, match="together"):
        az.attention(q, k, v, method="seer", gate_q=torch.randn(2, 8, 4, dtype=torch.float64))
    with pytest.raises(az.AttentionInputError, match="threshold"):
        az.attention(q, k, v, method="seer", threshold=2.0)


def test_seer_never_allocates_n_by_n():
    N, D = 8192, 16
    q, k, v = (torch.randn(1, 1, N, D, requires_grad=True) for _ in range(3))
    probe = LargestTensor()
    with probe, stats.collect() as st:
        out = az.attention(q, k, v, method="seer", causal=True, impl="block", block_size=64, topk=4)
        out.sum().backward()
    assert probe.largest < N * N // 4, f"a tensor of {probe.largest} elements (N² = {N * N})"
    assert torch.isfinite(q.grad).all() and k.grad.abs().sum() > 0
    assert 0 < st["density"][0] < 0.2


def _needle(N, D, pos_q, pos_k, seed=0, Nq=None):
    g = torch.Generator().manual_seed(seed)
    Nq = Nq or N
    q = torch.randn(1, 1, Nq, D, generator=g)
    k = torch.randn(1, 1, N, D, generator=g)
    v = torch.randn(1, 1, N, D, generator=g)
    direction = torch.randn(D, generator=g)
    direction = direction / direction.norm()
    q[0, 0, pos_q] = 32.0 * direction  # 4x the norm of a random query / key (8 for D = 64)
    k[0, 0, pos_k] = 32.0 * direction
    v[0, 0, pos_k] = 10.0
    return q, k, v


@pytest.mark.parametrize("causal,Nq,pos_q,pos_k", [(False, 4096, 3000, 517), (True, 64, 60, 1234),
                                                   (False, 128, 5, 1500)])
@pytest.mark.parametrize("seed", [0, 1])
def test_seer_recall_of_a_needle_with_under_ten_percent_of_the_keys(causal, Nq, pos_q, pos_k, seed):
    """One key strongly matches one query among 4096 keys: the (untrained, identity-like)
    gate keeps the needle's block (not its diagonal block) and the output is the needle's value, with under 10% of
    the keys attended (measured through attnzoo.stats)."""
    N, D, block = 4096, 64, 64
    q, k, v = _needle(N, D, pos_q, pos_k, seed=seed, Nq=Nq)
    lay = seer.select_blocks(q, k, causal=causal, block_size=block, topk=4)
    assert lay[0, 0, pos_q // block, pos_k // block]
    diag = (pos_q + N - Nq) // block
    assert abs(diag - pos_k // block) > 1
    with stats.collect() as st:
        out = az.attention(q, k, v, method="seer", impl="block", causal=causal, block_size=block, topk=4)
    assert (out[0, 0, pos_q] - 10.0).abs().max() < 0.5
    assert st["density"][0] < 0.1
    full = az.attention(q, k, v, causal=causal)
    assert (full[0, 0, pos_q] - 10.0).abs().max() < 0.5  # the truth the sparse result matches


def _structured(B=1, H=2, N=512, D=16, block=32, seed=0):
    """Key blocks with a topic each; each query block looks for the topic of a random
    earlier block (plus noise): the block-level attention map is concentrated."""
    g = torch.Generator().manual_seed(seed)
    nb = N // block
    topics = torch.randn(B, H, nb, D, generator=g) * 1.5
    k = topics.repeat_interleave(block, dim=2) + 0.5 * torch.randn(B, H, N, D, generator=g)
    target = torch.stack([torch.randint(0, i + 1, (B, H), generator=g) for i in range(nb)], dim=-1)  # (B, H, nb)
    q_topics = torch.gather(topics, 2, target.unsqueeze(-1).expand(B, H, nb, D))
    q = 2.0 * q_topics.repeat_interleave(block, dim=2) + 0.5 * torch.randn(B, H, N, D, generator=g)
    return q, k


def test_train_gate_raises_recall_above_the_untrained_gate():
    torch.manual_seed(0)
    q, k = _structured()
    module = seer.SeerAttention(2, 16, block_size=32, gate_dim=16, topk=2)
    result = seer.train_gate(module, q, k, steps=150, lr=0.02, sparsity=0.8)
    assert result["losses"][-1] < 0.5 * result["losses"][0]
    assert result["recall"] > result["recall_before"] + 0.2, result
    assert result["recall"] > 0.8
    # held-out data of the same structure: the trained gate generalises
    q2, k2 = _structured(seed=1)
    fresh = seer.SeerAttention(2, 16, block_size=32, gate_dim=16, topk=2)
    before = seer.train_gate(fresh, q2, k2, steps=0, sparsity=0.8)["recall"]
    after = seer.train_gate(module, q2, k2, steps=0, sparsity=0.8)["recall"]
    assert after > before + 0.2


# ========================================================================= recycled


def _dec_inputs(B=2, Hq=4, Hkv=2, N=60, D=8, Dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, N, D, generator=g, dtype=torch.float64),
            torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64),
            torch.randn(B, Hkv, N, Dv, generator=g, dtype=torch.float64))


def test_recycled_forward_is_exact_softmax_and_spec_claims_no_generic_decoding():
    spec = az.get("recycled")
    assert not spec.decoding and spec.decoder is None  # its decoding is RecycledDecoder, tested below
    for causal in (True, False):
        q, k, v = _dec_inputs(N=50)
        q = q[:, :, :30]
        allowed = torch.ones(30, 50, dtype=torch.bool).tril(diagonal=20) if causal else None
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        for impl in ("reference", "sdpa"):
            got = az.attention(q, k, v, method="recycled", impl=impl, causal=causal)
            torch.testing.assert_close(got, expected)


def _decode(dec, q, k, v, prefill):
    state = dec.init_state(q.shape[0], k.shape[1], q.shape[3], v.shape[3], dtype=q.dtype)
    outs, full, attended = [dec.step(state, q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill])], [True], [None]
    for t in range(prefill, q.shape[2]):
        is_full = dec.is_full_step(state, 1)
        before = None if is_full else dec.attended(state)
        outs.append(dec.step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]))
        full.append(is_full)
        attended.append(before)
    return outs, full, attended


def test_recycled_with_topk_covering_the_cache_equals_full_decoding():
    q, k, v = _dec_inputs()
    full = az.attention(q, k, v, causal=True)
    outs, flags, _ = _decode(recycled.RecycledDecoder(stride=4, topk=1000), q, k, v, prefill=10)
    assert not all(flags)  # recycled steps happened
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-12, rtol=1e-12)


def test_recycled_schedule_and_full_steps_equal_full_decoding():
    q, k, v = _dec_inputs()
    full = az.attention(q, k, v, causal=True)
    outs, flags, _ = _decode(recycled.RecycledDecoder(stride=4, topk=5), q, k, v, prefill=10)
    assert flags == [True] + [False, False, False, True] * 12 + [False, False]
    torch.testing.assert_close(outs[0], full[:, :, :10])
    for i, (o, f) in enumerate(zip(outs[1:], flags[1:])):
        t = 10 + i
        if f:
            torch.testing.assert_close(o, full[:, :, t:t + 1], atol=1e-12, rtol=1e-12)
    differs = [not torch.allclose(o, full[:, :, 10 + i:11 + i]) for i, (o, f) in enumerate(zip(outs[1:], flags[1:]))
               if not f]
    assert any(differs)  # topk=5 of ~50 keys really is an approximation


def test_recycled_steps_attend_exactly_to_the_recycled_set_plus_recent_tokens():
    """Brute force: at each full step, the top-k keys per head of that step's weights
    (computed here from the dense scores); between full steps, masked softmax over
    those keys and every key appended after the full step."""
    stride, topk, prefill = 3, 6, 12
    q, k, v = _dec_inputs(N=40, seed=7)
    outs, flags, attended = _decode(recycled.RecycledDecoder(stride=stride, topk=topk), q, k, v, prefill)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scale = q.shape[-1] ** -0.5
    recycled_set, full_len = None, None
    for i, f in enumerate(flags):
        t = prefill - 1 if i == 0 else prefill + i - 1  # position of the step's (last) query
        s = (q[:, :, t] .unsqueeze(-2) @ kk[:, :, :t + 1].transpose(-1, -2)).squeeze(-2) * scale  # (B, Hq, t+1)
        if f:
            w = torch.softmax(s, -1)
            recycled_set = torch.zeros_like(w, dtype=torch.bool)
            for b in range(w.shape[0]):
                for h in range(w.shape[1]):
                    order = sorted(range(t + 1), key=lambda j: (-float(w[b, h, j]), j))[:topk]
                    recycled_set[b, h, order] = True
            full_len = t + 1
            continue
        allowed = torch.zeros_like(s, dtype=torch.bool)
        allowed[..., :full_len] = recycled_set
        allowed[..., full_len:] = True
        assert torch.equal(attended[i], allowed[..., :t])  # the decoder's own account, before the new key
        expected = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).unsqueeze(-2) @ vv[:, :, :t + 1]
        torch.testing.assert_close(outs[i], expected, atol=1e-12, rtol=1e-12)
        assert int(allowed[0, 0].sum()) == topk + (t + 1 - full_len)


def test_recycled_keeps_retrieving_a_needle_on_a_long_cache():
    N, D, pos = 4096, 64, 777
    g = torch.Generator().manual_seed(0)
    steps = 32
    q = torch.randn(1, 2, N + steps, D, generator=g)
    k = torch.randn(1, 1, N + steps, D, generator=g)
    v = torch.randn(1, 1, N + steps, D, generator=g)
    direction = torch.randn(D, generator=g)
    direction /= direction.norm()
    k[0, 0, pos] = 16.0 * direction  # logit 16 for the decode queries: it dominates 4096 random keys
    v[0, 0, pos] = 10.0
    # the question at the end of the prompt and the decode queries look for it
    q[0, :, N - 1:] = 8.0 * direction + 0.3 * torch.randn(2, steps + 1, D, generator=g)
    dec = recycled.RecycledDecoder(stride=16, topk=64)
    state = dec.init_state(1, 1, D, D)
    dec.step(state, q[:, :, :N], k[:, :, :N], v[:, :, :N])
    outs, flags = [], []
    with stats.collect() as st:
        for t in range(N, N + steps):
            flags.append(dec.is_full_step(state, 1))
            outs.append(dec.step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]))
    out = torch.cat(outs, 2)
    assert flags.count(False) == 30 and flags.count(True) == 2
    assert (out - 10.0).abs().max() < 0.5  # every step, full or recycled, finds the needle
    dens = st["density"]
    assert len(dens) == steps
    assert all(d == 1.0 for d, f in zip(dens, flags) if f)
    assert max(d for d, f in zip(dens, flags) if not f) < 0.05
    assert sum(dens) / len(dens) < 0.1  # fraction of the keys attended over the whole decode


@pytest.mark.parametrize("method,opts,impl", [("seer", {"block_size": 16, "topk": 3}, "block"),
                                              ("landmark", {"block_size": 16, "topk": 2}, "gather")])
def test_mask_mods_reach_the_fast_path_undensified_and_agree(method, opts, impl):
    """Review regression: a mask_mod is evaluated per tile / per gathered pair (never as a
    dense Nq×Nk mask) and gives the reference's answer."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 96, 8, generator=g, dtype=torch.float64) for _ in range(3))

    def mod(b, h, q_idx, kv_idx):
        return (q_idx // 24 == kv_idx // 24) | (kv_idx < 5)

    ref = az.attention(q, k, v, method=method, causal=True, mask=mod, impl="reference", **opts)
    fast = az.attention(q, k, v, method=method, causal=True, mask=mod, impl=impl, **opts)
    torch.testing.assert_close(fast, ref)
    N = 4096
    qq, kk, vv = (torch.randn(1, 1, N, 16) for _ in range(3))
    probe = LargestTensor()
    with probe, torch.no_grad():
        az.attention(qq, kk, vv, method=method, causal=True, mask=mod, impl=impl, block_size=64, topk=4)
    assert probe.largest < N * N // 4


# ================================================= the reference is an independent program


from helpers import CASES, contract_check  # noqa: E402, F401


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self"])
def test_seer_contract_catches_a_wrong_block_in_the_fast_form(monkeypatch, pattern):
    """Swap one kept block of one query block in the fast form's selection: the contract
    comparison (whose reference runs the gate per block, by another program) must fail."""
    options = az.get("seer").sized_options(100)
    contract_check("seer", "block", pattern, options)  # as shipped: passes
    real_select = seer.select_blocks

    def wrong_select(q, k, **kw):
        layout = real_select(q, k, **kw).clone()
        row = layout[0, 0, -1]  # the last query block: under causality every key block is visible
        kept, dropped = row.nonzero().flatten().tolist(), (~row).nonzero().flatten().tolist()
        row[kept[0]], row[dropped[0]] = False, True
        return layout

    monkeypatch.setattr(seer, "select_blocks", wrong_select)
    with pytest.raises(AssertionError, match=r"err\(fast\)"):
        contract_check("seer", "block", pattern, options)


@pytest.mark.parametrize("threshold", [None, 0.15])
def test_seer_contract_catches_a_wrong_block_in_the_reference(monkeypatch, threshold):
    """And the other way: the reference's own top-k (or threshold) is what it compares against."""
    options = {**az.get("seer").sized_options(100), "threshold": threshold}
    contract_check("seer", "block", "noncausal_self", options)
    if threshold is None:
        real = seer.rank_by_count
        monkeypatch.setattr(seer, "rank_by_count", lambda s, eligible=None: real(-s, eligible))
    else:
        real = seer._gate_probabilities
        monkeypatch.setattr(seer, "_gate_probabilities", lambda s, visible: real(-s, visible))
    with pytest.raises(AssertionError, match=r"err\(fast\)"):
        contract_check("seer", "block", "noncausal_self", options)


def test_seer_ties_agree_between_reference_and_fast():
    """Key blocks that repeat one pattern: every gate score of a row ties exactly, and both
    programs keep the diagonal and then the lowest-index blocks (float64, with grads)."""
    g = torch.Generator().manual_seed(13)
    q = torch.randn(2, 2, 48, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64).repeat(1, 1, 6, 1)  # 6 equal blocks of 8
    v = torch.randn(2, 1, 48, 5, generator=g, dtype=torch.float64)
    dout = torch.randn(2, 2, 48, 5, generator=g, dtype=torch.float64)
    for causal in (False, True):
        for threshold in (None, 0.1):
            res = []
            for impl in ("reference", "block"):
                a, b, c = (t.clone().requires_grad_(True) for t in (q, k, v))
                out = az.attention(a, b, c, method="seer", impl=impl, causal=causal, block_size=8, topk=3,
                                   threshold=threshold)
                res.append((out, *torch.autograd.grad(out, (a, b, c), dout)))
            for x, y in zip(*res):
                torch.testing.assert_close(x, y, atol=1e-12, rtol=1e-10)
    lay = seer.select_blocks(q, k, block_size=8, topk=3)
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for i in range(6):
        expected[i, [i] + [j for j in range(6) if j != i][:2]] = True
    assert torch.equal(lay[0, 0], expected)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("options", [{"block_size": 16, "topk": 3}, {"block_size": 16, "threshold": 0.05}],
                         ids=["topk", "threshold"])
def test_seer_other_sizes_agree(case, options):
    """Fast vs reference at the blocks the contract used before the sizing hook (16, topk 3)
    and in threshold mode, which the contract does not exercise."""
    for pattern in ("causal_self", "noncausal_cross"):
        contract_check("seer", "block", pattern, options, case=case, dtype=torch.bfloat16)


@pytest.mark.parametrize("threshold", [None, 0.08])
def test_seer_reference_and_fast_select_alike_over_many_draws(threshold):
    """float32 and bfloat16 inputs over many random draws (causal, cross, padding, gate
    weights): the two selection programs never disagree."""
    for seed in range(10):
        g = torch.Generator().manual_seed(200 + seed)
        nq, nk = (150, 150) if seed % 2 else (97, 203)
        q, k, v = (torch.randn(2, 4, n, 16, generator=g) for n in (nq, nk, nk))
        k, v = k[:, :2], v[:, :2]
        kpm = torch.rand(2, nk, generator=g) > 0.2
        gates = {}
        if seed % 4 == 0:
            gates = {"gate_q": torch.randn(4, 16, 8, generator=g), "gate_k": torch.randn(4, 48, 8, generator=g)}
        for dtype in (torch.float32, torch.bfloat16):
            opts = dict(method="seer", causal=bool(seed % 3), key_mask=kpm, threshold=threshold, **gates,
                        **az.get("seer").sized_options(nk))
            a, b, c = (t.to(dtype) for t in (q, k, v))
            fast = az.attention(a, b, c, impl="block", **opts).float()
            ref = az.attention(a, b, c, impl="reference", **opts).float()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(fast, ref, atol=tol, rtol=tol)
