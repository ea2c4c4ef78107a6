"""combiner: the reference against an independently written per-query formula, the fast
block form against the reference (with gradients), a wrong layout in the fast form caught
by the contract's comparison, causal alignment, padding, decoding, full support (every
key reachable), density, and no N×N on the fast path."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo as az
from attnzoo import decoding, stats
from attnzoo.methods.sparse import combiner

from helpers import CASES, LargestTensor, assert_three_way, call, make_inputs, run


def loop_formula(q, k, v, causal, s, kpm=None, scale=None):
    """Combiner-Fixed written per query with Python loops: its own block's keys (causal: up
    to its aligned position) and, for every other block (causal: every earlier block),
    one item with key mean(k), value mean(v) over the block's real keys and logit bias
    log(#real keys); one softmax over all items."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    nb = math.ceil(Nk / s)
    out = torch.zeros(B, Hq, Nq, v.shape[3], dtype=torch.float64)
    for b in range(B):
        real = [True] * Nk if kpm is None else [bool(x) for x in kpm[b]]
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            for i in range(Nq):
                pos = i + Nk - Nq
                own = min(max(pos // s, 0), nb - 1)
                logits, values = [], []
                for j in range(own * s, min(Nk, own * s + s)):
                    if real[j] and (not causal or j <= pos):
                        logits.append(float(q[b, h, i] @ k[b, kh, j]) * scale)
                        values.append(v[b, kh, j])
                for blk in range(nb):
                    if blk == own or (causal and blk > own):
                        continue
                    members = [j for j in range(blk * s, min(Nk, blk * s + s)) if real[j]]
                    if not members:
                        continue
                    kbar = sum(k[b, kh, j] for j in members) / len(members)
                    vbar = sum(v[b, kh, j] for j in members) / len(members)
                    logits.append(float(q[b, h, i] @ kbar) * scale + math.log(len(members)))
                    values.append(vbar)
                if logits:
                    p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                    out[b, h, i] = sum(pj * vj for pj, vj in zip(p, values))
    return out


def qkv(B=2, Hq=4, Hkv=2, Nq=30, Nk=30, D=8, Dv=6, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=dtype))


SHAPES = [(30, 30, 5), (23, 23, 4), (13, 29, 6), (29, 13, 5), (1, 17, 4), (17, 17, 17), (17, 17, 1)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk,s", SHAPES)
@pytest.mark.parametrize("padded", [False, True])
def test_reference_equals_loop_formula(causal, nq, nk, s, padded):
    q, k, v = qkv(Nq=nq, Nk=nk)
    kpm = None
    if padded:
        kpm = torch.ones(2, nk, dtype=torch.bool)
        kpm[1, nk - nk // 3:] = False
        kpm[0, : min(nk, s)] = False  # a whole block without real keys: no summary
    got = az.attention(q, k, v, method="combiner", impl="reference", causal=causal, key_mask=kpm,
                       block_size=s)
    torch.testing.assert_close(got, loop_formula(q, k, v, causal, s, kpm), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_weights_are_a_full_support_distribution(causal):
    """The dense effective weights reproduce the output, sum to 1 on rows that see keys,
    and are positive on every visible real key (full attention support)."""
    q, k, v = qkv(Nq=40, Nk=40)
    kpm = torch.ones(2, 40, dtype=torch.bool)
    kpm[1, 27:] = False
    out, w = az.attention(q, k, v, method="combiner", causal=causal, key_mask=kpm, block_size=6,
                          return_weights=True, impl="reference")
    torch.testing.assert_close(w @ v.repeat_interleave(2, dim=1), out, atol=1e-12, rtol=1e-12)
    visible = kpm.view(2, 1, 1, 40).expand(2, 4, 40, 40)
    if causal:
        visible = visible & torch.ones(40, 40, dtype=torch.bool).tril()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 40, dtype=torch.float64))
    assert bool((w[visible] > 0).all()) and bool((w[~visible] == 0).all())


@pytest.mark.parametrize("causal", [False, True])
def test_exact_softmax_when_blocks_are_constant(causal):
    """With every block's keys and values equal, a summary with logit q·k̄ + log n_b is exactly
    its members' softmax mass: the method equals full softmax attention."""
    s, n = 5, 32
    q, k, v = qkv(Nq=n, Nk=n)
    k = k[:, :, ::s].repeat_interleave(s, dim=2)[:, :, :n]
    v = v[:, :, ::s].repeat_interleave(s, dim=2)[:, :, :n]
    for impl in ("reference", "block"):
        got = az.attention(q, k, v, method="combiner", causal=causal, block_size=s, impl=impl)
        torch.testing.assert_close(got, az.attention(q, k, v, causal=causal), atol=1e-12, rtol=1e-12)


def _grads(impl, q, k, v, dout, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = az.attention(q, k, v, method="combiner", impl=impl, **kw)
    return [out, *torch.autograd.grad(out, (q, k, v), dout)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk,s", [(70, 70, 8), (45, 100, 7), (100, 45, 9), (1, 50, 8), (64, 64, None),
                                     (300, 300, None), (33, 33, 40)])
def test_fast_matches_reference_float64_with_grads(causal, nq, nk, s):
    q, k, v = qkv(Nq=nq, Nk=nk, D=12, Dv=10, seed=3)
    kpm = torch.ones(2, nk, dtype=torch.bool)
    kpm[0, nk // 2:] = False
    dout = torch.randn(2, 4, nq, 10, dtype=torch.float64)
    kw = {"causal": causal, "key_mask": kpm, "block_size": s, "scale": 0.4}
    ref, fast = _grads("reference", q, k, v, dout, **kw), _grads("block", q, k, v, dout, **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, ref):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11, msg=name)


@pytest.mark.parametrize("impl", ["reference", "block"])
def test_causal_cross_is_aligned_lower_right(impl):
    """Causal with Nq < Nk equals the last Nq rows of causal self-attention (blocks are key
    positions, a query's block is that of i + Nk - Nq); with Nq > Nk the first Nq - Nk rows
    see nothing and are zeros, the rest equal self-attention."""
    q, k, v = qkv(Nq=50, Nk=50)
    full = az.attention(q, k, v, method="combiner", causal=True, block_size=6, impl=impl)
    part = az.attention(q[:, :, 37:], k, v, method="combiner", causal=True, block_size=6, impl=impl)
    torch.testing.assert_close(part, full[:, :, 37:], atol=1e-12, rtol=1e-12)
    q2 = torch.cat([torch.randn(2, 4, 9, 8, dtype=torch.float64), q], dim=2)
    more = az.attention(q2, k, v, method="combiner", causal=True, block_size=6, impl=impl)
    assert bool((more[:, :, :9] == 0).all())
    torch.testing.assert_close(more[:, :, 9:], full, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("impl", ["reference", "block"])
@pytest.mark.parametrize("causal", [False, True])
def test_padding_is_invisible(impl, causal):
    """Padded keys (directly or inside summaries) change nothing, get no gradient, and a
    fully padded sequence gives zeros, never NaN."""
    q, k, v = qkv(Nq=41, Nk=41)
    kpm = torch.ones(2, 41, dtype=torch.bool)
    kpm[0, 30:] = False
    kpm[0, 3:5] = False  # holes inside a block shrink its count
    kpm[1] = False
    k2, v2 = k.clone(), v.clone()
    k2[:, :, ~kpm[0]] = 1e3 * torch.randn_like(k2[:, :, ~kpm[0]])
    v2[:, :, ~kpm[0]] = 1e3
    kw = {"method": "combiner", "causal": causal, "key_mask": kpm, "block_size": 7, "impl": impl}
    a = az.attention(q, k, v, **kw)
    kk, vv = k2.clone().requires_grad_(True), v2.clone().requires_grad_(True)
    b = az.attention(q, kk, vv, **kw)
    torch.testing.assert_close(a[0], b[0], atol=1e-12, rtol=1e-12)
    assert bool((b[1] == 0).all()) and torch.isfinite(b).all()
    b.sum().backward()
    assert bool((kk.grad[0][:, ~kpm[0]] == 0).all()) and bool((vv.grad[0][:, ~kpm[0]] == 0).all())
    assert bool((vv.grad[0][:, kpm[0]] != 0).all())


@pytest.mark.parametrize("impl", ["reference", "block"])
@pytest.mark.parametrize("causal", [False, True])
def test_every_key_is_reachable(impl, causal):
    """Full attention support: the last query's output depends on every key and value."""
    n = 300  # block_size None -> 17, so most keys are only seen through summaries
    q, k, v = qkv(B=1, Hq=2, Hkv=1, Nq=n, Nk=n, D=16, Dv=16, seed=5)
    k.requires_grad_(True)
    v.requires_grad_(True)
    out = az.attention(q, k, v, method="combiner", causal=causal, impl=impl)
    gk, gv = torch.autograd.grad(out[:, :, -1].sum(), (k, v))
    assert bool((gk.abs().sum(-1) > 0).all()) and bool((gv.abs().sum(-1) > 0).all())
    # while a purely local (sliding-window) pattern of the same width does not reach them
    out = az.attention(q, k, v, method="sliding_window", causal=True, window=17)
    gk = torch.autograd.grad(out[:, :, -1].sum(), k)[0]
    assert int((gk.abs().sum(-1) > 0).sum()) == 17


@pytest.mark.parametrize("block_size,prefill", [(8, 7), (8, 19), (5, 1), (16, 40)])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_decoding_equals_causal_forward_with_a_small_state(block_size, prefill, kv_heads):
    B, Hq, N, D = 2, 4, 61, 8
    q, k, v = qkv(B=B, Hq=Hq, Hkv=kv_heads, Nq=N, Nk=N, D=D, Dv=D, seed=7)
    full = az.attention(q, k, v, method="combiner", causal=True, block_size=block_size)
    state = decoding.init_state("combiner", B, kv_heads, D, D, dtype=torch.float64, block_size=block_size)
    outs = [decoding.step("combiner", state, q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill],
                          block_size=block_size)]
    for t in range(prefill, N):
        outs.append(decoding.step("combiner", state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                  block_size=block_size))
        assert state.k.shape[2] == (t + 1) % block_size and state.kbar.shape[2] == (t + 1) // block_size
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-12, rtol=1e-12)


def test_decoding_block_size_from_max_len_and_errors():
    state = decoding.init_state("combiner", 1, 1, 4, 4, max_len=100)
    assert state.block == 10
    with pytest.raises(az.AttentionInputError, match="block_size"):
        decoding.init_state("combiner", 1, 1, 4, 4)
    with pytest.raises(az.AttentionInputError, match="block_size"):
        az.attention(*qkv(), method="combiner", block_size=0)
    with pytest.raises(az.AttentionInputError, match="does not take a mask"):
        az.attention(*qkv(Nq=6, Nk=6), method="combiner", mask=torch.ones(6, 6, dtype=torch.bool))


def brute_density(causal, nq, nk, s, kpm):
    """(direct keys + summaries) / visible keys per query, from the reference's own masks
    written out with loops."""
    B, nb, vals = kpm.shape[0], math.ceil(nk / s), []
    for b in range(B):
        for i in range(nq):
            pos = i + nk - nq
            own = min(max(pos // s, 0), nb - 1)
            visible = sum(1 for j in range(nk) if kpm[b, j] and (not causal or j <= pos))
            if visible == 0:
                continue
            direct = sum(1 for j in range(own * s, min(nk, own * s + s)) if kpm[b, j] and (not causal or j <= pos))
            summ = sum(1 for blk in range(nb) if blk != own and not (causal and blk > own)
                       and any(kpm[b, j] for j in range(blk * s, min(nk, blk * s + s))))
            vals.append((direct + summ) / visible)
    return sum(vals) / len(vals)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk,s", [(40, 40, 6), (20, 45, 7), (45, 20, 4)])
def test_density_report_equals_brute_force(causal, nq, nk, s):
    q, k, v = qkv(Nq=nq, Nk=nk)
    kpm = torch.ones(2, nk, dtype=torch.bool)
    kpm[1, nk // 2:] = False
    kpm[0, :s] = False
    with stats.collect() as rec:
        az.attention(q, k, v, method="combiner", causal=causal, key_mask=kpm, block_size=s, impl="block")
    assert rec["density"] == pytest.approx([brute_density(causal, nq, nk, s, kpm)], rel=1e-9)


@pytest.mark.parametrize("causal", [True, False])
def test_fast_path_never_allocates_n_by_n_and_is_sparse(causal):
    N, D = 8192, 16
    q, k, v = (torch.randn(1, 1, N, D, requires_grad=True) for _ in range(3))
    probe = LargestTensor()
    with stats.collect() as rec, probe:
        out = az.attention(q, k, v, method="combiner", causal=causal, impl="block")
        out.sum().backward()
    assert probe.largest < N * N // 4, f"a tensor of {probe.largest} elements (N² = {N * N})"
    assert torch.isfinite(q.grad).all() and bool((k.grad.abs().sum(-1) > 0).all())
    s = round(math.sqrt(N))
    # each query uses its block (<= s keys) and <= N/s summaries: O(1/sqrt(N)) of the visible keys
    assert rec["density"][0] < 0.1
    assert rec["density"][0] > 1 / s


def _drop_one(layout: torch.Tensor) -> torch.Tensor:
    """The layout with one kept block dropped: the first kept block of the fullest row."""
    out = layout.clone()
    flat = out.view(-1, out.shape[-1])
    row = int(flat.sum(-1).argmax())
    flat[row, int(torch.nonzero(flat[row])[0])] = False
    return out


@pytest.mark.parametrize("pattern", ["causal_self", "noncausal_cross"])
def test_contract_catches_a_wrong_layout_in_the_fast_form(monkeypatch, pattern):
    """The reference is a second program: a fast form that loses one chosen block fails
    the contract's three-way comparison (and passes it without the fault)."""
    spec = az.get("combiner")
    causal, cross = pattern.startswith("causal"), pattern.endswith("cross")
    q, k, v, kpm, dout = make_inputs(CASES[2], pattern)
    options = spec.sized_options(max(q.shape[2], k.shape[2]))
    low = [t.float() for t in (q, k, v)]

    def compare():
        ref64 = run(call("combiner", "reference", causal, kpm, cross, **options), q, k, v, dout)
        ref32 = run(call("combiner", "reference", causal, kpm, cross, **options), *low, dout)
        fast = run(call("combiner", "block", causal, kpm, cross, **options), *low, dout)
        assert_three_way(fast, ref32, ref64, spec.fudge, torch.float32)

    compare()
    right = combiner.block_layout
    monkeypatch.setattr(combiner, "block_layout", lambda *a, **kw: _drop_one(right(*a, **kw)))
    with pytest.raises(AssertionError, match="err\\(fast\\)"):
        compare()


def test_sized_options_are_the_default_block_made_explicit():
    """for_length gives round(sqrt(N)), the default block, explicitly (decoding, which
    cannot see the final length, needs it given): the same outputs as the default."""
    spec = az.get("combiner")
    for n in (1, 37, 100, 1000):
        assert spec.sized_options(n) == {"block_size": max(1, round(math.sqrt(n)))}
    q, k, v = qkv(Nq=100, Nk=100)
    for causal in (False, True):
        torch.testing.assert_close(az.attention(q, k, v, method="combiner", causal=causal, **spec.sized_options(100)),
                                   az.attention(q, k, v, method="combiner", causal=causal), atol=0, rtol=0)
