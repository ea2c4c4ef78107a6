"""HyperAttention (sortLSH + sampled columns, the causal recursion) and tensor
(triple-wise) attention: their formulas by independent loops, their claims, their
options and errors. The contract (tests/test_contract.py) covers fast vs reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.methods.higher_order import tensor as tensor_mod
from attnzoo.methods.sparse import hyper as hyper_mod

from helpers import LargestTensor


def qkv(B, Hq, Hkv, nq, nk, D, Dv=None, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, nq, D, generator=g, dtype=dtype) * scale,
            torch.randn(B, Hkv, nk, D, generator=g, dtype=dtype) * scale,
            torch.randn(B, Hkv, nk, Dv or D, generator=g, dtype=dtype))


# =============================================================== HyperAttention


def test_gray_rank_table_orders_buckets_one_bit_apart():
    for r in range(1, 9):
        table = hyper_mod.gray_rank_table(r)
        order = torch.argsort(table)  # the codes in rank order
        diffs = order[1:] ^ order[:-1]
        assert all(bin(int(d)).count("1") == 1 for d in diffs), r  # neighbours differ in one hyperplane
        for c in range(1 << r):  # the rank is the inverse Gray code: c ^ (c>>1) ^ (c>>2) ^ ...
            inv, s = 0, c
            while s:
                inv ^= s
                s >>= 1
            assert int(table[c]) == inv


@pytest.mark.parametrize("nq,nk,L", [(40, 40, 5), (37, 37, 8), (20, 33, 4), (33, 20, 6), (9, 9, 9)])
def test_causal_plan_covers_every_visible_pair_once(nq, nk, L):
    cover = torch.zeros(nq, nk, dtype=torch.long)
    for kind, qs, qe, ks, ke in hyper_mod._plan(nq, nk, True, L):
        cover[qs:qe, ks:ke] += 1
        if kind == "leaf":
            assert qe - qs == ke - ks <= L
    causal = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    assert torch.equal(cover[causal], torch.ones(int(causal.sum()), dtype=torch.long))
    assert bool((cover[~causal] <= 1).all())  # leaves reach above the diagonal; the causal mask hides that


def hyper_by_loops(q, k, v, block_size, sample_size, num_projs, seed, scale):
    """HyperAttention of one noncausal node written with Python loops over positions:
    hashes, Gray ranks, stable sorts, blocks, the sampled columns, Â and its normalisation."""
    B, H, nq, D = q.shape
    nk = k.shape[2]
    planes = hyper_mod.hyperplanes(seed, D, num_projs)
    nb = math.ceil(nk / block_size)
    bk, bq = math.ceil(nk / nb), math.ceil(nq / nb)
    cols = hyper_mod.node_samples(seed, (0, 0, nq, nk), B, H, nk, sample_size)
    out = torch.zeros(B, H, nq, v.shape[3], dtype=torch.float64)

    def rank(x):
        bits = [int(float((x.float().double() * planes[:, t]).sum()) > 0) for t in range(num_projs)]
        code = sum(b << t for t, b in enumerate(bits))
        gray = [i ^ (i >> 1) for i in range(1 << num_projs)]
        return gray.index(code)

    for b in range(B):
        for h in range(H):
            rq = [rank(q[b, h, i]) for i in range(nq)]
            rk = [rank(k[b, h, j]) for j in range(nk)]
            q_place = {i: p for p, i in enumerate(sorted(range(nq), key=lambda i: (rq[i], i)))}
            k_place = {j: p for p, j in enumerate(sorted(range(nk), key=lambda j: (rk[j], j)))}
            for i in range(nq):
                w = [0.0] * nk
                for j in range(nk):
                    if q_place[i] // bq == k_place[j] // bk:
                        w[j] = 1.0
                for t in range(sample_size):
                    j = int(cols[b, h, t])
                    if q_place[i] // bq != k_place[j] // bk:
                        w[j] += nk / sample_size
                s = [float(q[b, h, i] @ k[b, h, j]) * scale for j in range(nk)]
                m = max(s[j] for j in range(nk) if w[j] > 0)
                a = [w[j] * math.exp(s[j] - m) for j in range(nk)]
                tot = sum(a)
                out[b, h, i] = sum(a[j] / tot * v[b, h, j] for j in range(nk))
    return out


def test_hyper_equals_the_algorithm_written_with_loops():
    q, k, v = qkv(1, 2, 2, 14, 11, 8)
    opts = dict(block_size=3, sample_size=5, lsh_num_projs=3, seed=4, min_seq_len=1)
    want = hyper_by_loops(q, k, v, 3, 5, 3, 4, 8 ** -0.5)
    for impl in ("reference", "lsh"):
        got = az.attention(q, k, v, method="hyper", impl=impl, cross=True, **opts)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(want, az.attention(q, k, v, cross=True), atol=1e-3)  # it is an approximation


def rel_error(out, exact):
    return float((out - exact).norm() / exact.norm())


def test_error_falls_as_the_sample_budget_grows():
    """Noncausal, N = 1024, blocks of 32: the relative error against exact attention,
    averaged over three seeds, falls with every 4x more sampled columns (~ 1/sqrt(m))."""
    q, k, v = qkv(1, 2, 2, 1024, 1024, 32, dtype=torch.float32, seed=1)
    exact = az.attention(q, k, v)
    errors = []
    for m in (16, 64, 256, 1024):
        errs = [rel_error(az.attention(q, k, v, method="hyper", impl="lsh", block_size=32, sample_size=m,
                                       min_seq_len=64, seed=s), exact) for s in range(3)]
        errors.append(sum(errs) / 3)
    assert all(b < 0.8 * a for a, b in zip(errors, errors[1:])), errors
    assert errors[0] / errors[-1] > 3.0, errors
    no_samples = rel_error(az.attention(q, k, v, method="hyper", block_size=32, sample_size=0, min_seq_len=64), exact)
    assert errors[-1] < no_samples, (errors, no_samples)  # the sampled residual helps at all


def test_error_falls_as_the_sample_budget_grows_causal():
    q, k, v = qkv(1, 1, 1, 768, 768, 32, dtype=torch.float32, seed=2)
    exact = az.attention(q, k, v, causal=True)
    errors = [sum(rel_error(az.attention(q, k, v, method="hyper", causal=True, block_size=24, sample_size=m,
                                         min_seq_len=96, seed=s), exact) for s in range(3)) / 3
              for m in (12, 96, 768)]
    assert errors[0] > 1.5 * errors[1] > 2.25 * errors[2], errors


def test_sortlsh_finds_the_heavy_entries():
    """Clustered queries and keys (large entries inside clusters): with no samples at all,
    the sorted blocks alone are close to exact attention, and far closer than blocks by
    position (r = 0: one bucket)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, 32, generator=g) * 3
    which = torch.randint(8, (512,), generator=g)
    x = centres[which] + 0.3 * torch.randn(512, 32, generator=g)
    q = k = x.view(1, 1, 512, 32)
    v = torch.randn(1, 1, 512, 32, generator=g)
    exact = az.attention(q, k, v)
    opts = dict(block_size=64, sample_size=0, min_seq_len=1)
    lsh = rel_error(az.attention(q, k, v, method="hyper", lsh_num_projs=7, **opts), exact)
    by_position = rel_error(az.attention(q, k, v, method="hyper", lsh_num_projs=0, **opts), exact)
    assert lsh < 0.5 * by_position, (lsh, by_position)


@pytest.mark.parametrize("causal", [False, True])
def test_hyper_is_exact_when_one_block_or_one_leaf_covers_everything(causal):
    q, k, v = qkv(2, 4, 2, 50, 50, 16, dtype=torch.float32)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    opts = dict(block_size=64, min_seq_len=1) if not causal else dict(min_seq_len=64)
    for impl in ("reference", "lsh"):
        out = az.attention(q, k, v, method="hyper", impl=impl, causal=causal, **opts)
        torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-5)


def test_hyper_seeds_are_deterministic_and_matter():
    q, k, v = qkv(1, 2, 2, 200, 200, 16)
    opts = dict(block_size=16, sample_size=16, min_seq_len=20)
    a = az.attention(q, k, v, method="hyper", causal=True, seed=3, **opts)
    assert torch.equal(a, az.attention(q, k, v, method="hyper", causal=True, seed=3, **opts))
    assert not torch.allclose(a, az.attention(q, k, v, method="hyper", causal=True, seed=4, **opts))


def test_hyper_gqa_equals_repeated_kv_heads():
    q, k, v = qkv(2, 4, 1, 120, 90, 16)
    opts = dict(block_size=16, sample_size=12, min_seq_len=20, cross=True)
    a = az.attention(q, k, v, method="hyper", impl="lsh", **opts)
    b = az.attention(q, k.expand(-1, 4, -1, -1), v.expand(-1, 4, -1, -1), method="hyper", impl="lsh", **opts)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_hyper_fast_form_is_never_n_by_n(causal):
    n = 2048
    q, k, v = (t.requires_grad_(True) for t in qkv(1, 1, 1, n, n, 8, dtype=torch.float32))
    probe = LargestTensor()
    with probe:
        out = az.attention(q, k, v, method="hyper", impl="lsh", causal=causal, block_size=32, sample_size=32,
                           min_seq_len=128)
        out.sum().backward()
    assert probe.largest <= 8 * n * 32, probe.largest  # O(N (b + m)): an eighth of N² = 4.2M
    assert torch.isfinite(q.grad).all()


def test_hyper_spec_declares_its_causal_leak_and_no_decoding():
    spec = az.get("hyper")
    assert spec.causal_leak and not spec.rows_independent and not spec.decoding
    assert spec.family == "sparse" and not spec.exact
    with pytest.raises(az.UnsupportedPattern, match="decoding"):
        az.get("hyper").init_state(1, 1, 8, 8)


def test_hyper_options_are_checked():
    q, k, v = qkv(1, 1, 1, 8, 8, 4)
    for bad in (dict(block_size=0), dict(sample_size=-1), dict(lsh_num_projs=31), dict(min_seq_len=0),
                dict(seed=-1), dict(block_size=2.5)):
        with pytest.raises(az.AttentionInputError, match=list(bad)[0]):
            az.attention(q, k, v, method="hyper", **bad)
    assert az.get("hyper").sized_options(100000) == {}
    small = az.get("hyper").sized_options(512)
    assert small["block_size"] < 512 and small["min_seq_len"] < 512


# ====================================================================== tensor


def tensor_by_loops(q, k, v, k2, v2, scale, visible):
    """Att_i = Σ_{j1,j2} softmax(scale Σ_d q_id k1_{j1 d} k2_{j2 d}) (v1_{j1} ∘ v2_{j2}),
    over the pairs whose two keys are visible to query i, by loops (one head)."""
    nq, nk = q.shape[0], k.shape[0]
    out = torch.zeros(nq, v.shape[1], dtype=torch.float64)
    for i in range(nq):
        keys = [j for j in range(nk) if visible[i][j]]
        if not keys:
            continue
        s = torch.stack([(q[i] * k[j1] * k2[j2]).sum() * scale for j1 in keys for j2 in keys])
        vals = torch.stack([v[j1] * v2[j2] for j1 in keys for j2 in keys])
        out[i] = (torch.softmax(s, 0)[:, None] * vals).sum(0)
    return out


@pytest.mark.parametrize("causal,nq,nk", [(False, 9, 9), (True, 9, 9), (True, 6, 10), (True, 10, 6), (False, 7, 12)])
def test_tensor_equals_the_triple_sum_with_loops(causal, nq, nk):
    q, k, v = qkv(2, 4, 2, nq, nk, 6, Dv=5)
    kpm = torch.ones(2, nk, dtype=torch.bool)
    kpm[1, -2:] = False
    off = nk - nq
    for impl in ("reference", "chunk"):
        extra = {"chunk": 4} if impl == "chunk" else {}
        out = az.attention(q, k, v, method="tensor", impl=impl, causal=causal, key_mask=kpm, cross=nq != nk,
                           **extra)
        for b in range(2):
            vis = [[(not causal or j <= i + off) and bool(kpm[b, j]) for j in range(nk)] for i in range(nq)]
            for h in range(4):
                kh, vh = k[b, h // 2], v[b, h // 2]
                want = tensor_by_loops(q[b, h], kh, vh, kh, vh, 6 ** -0.5, vis)
                torch.testing.assert_close(out[b, h], want, rtol=1e-10, atol=1e-10)


def test_tensor_with_second_keys_and_values():
    """The paper's five sequences: distinct K1, K2, V1, V2; gradients reach all of them."""
    q, k, v = qkv(1, 2, 2, 8, 8, 4)
    _, k2, v2 = qkv(1, 2, 2, 8, 8, 4, seed=5)
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) < 0.6
    want = torch.stack([tensor_by_loops(q[0, h], k[0, h], v[0, h], k2[0, h], v2[0, h], 0.5, mask.tolist())
                        for h in range(2)])
    grads = []
    for impl in ("reference", "chunk"):
        tensors = [t.clone().requires_grad_(True) for t in (q, k, v, k2, v2)]
        a, b, c, d, e = tensors
        extra = {"chunk": 3} if impl == "chunk" else {}
        out = az.attention(a, b, c, method="tensor", impl=impl, mask=mask, k2=d, v2=e, **extra)
        torch.testing.assert_close(out[0], want, rtol=1e-10, atol=1e-10)
        grads.append(torch.autograd.grad(out.pow(2).sum(), tensors))
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10)
        assert float(ga.abs().max()) > 0
    with pytest.raises(az.AttentionInputError, match="option k2 must match k"):
        az.attention(q, k, v, method="tensor", k2=k2[:, :, :5])


def test_tensor_with_zero_second_keys_is_a_product_of_means():
    """K2 = 0: every triple scores 0, the softmax is uniform over the n² pairs, and
    Att_i = mean_j1 V1_j1 ∘ mean_j2 V2_j2 (by hand)."""
    q, k, v = qkv(1, 1, 1, 5, 7, 4)
    out = az.attention(q, k, v, method="tensor", k2=torch.zeros_like(k))
    torch.testing.assert_close(out[0, 0], (v[0, 0].mean(0) * v[0, 0].mean(0)).expand(5, 4))


def test_tensor_refuses_long_inputs_with_a_clear_error():
    q, k, v = qkv(1, 1, 1, 300, 300, 4, dtype=torch.float32)
    with pytest.raises(az.AttentionInputError, match=r"naive cubic algorithm.*max_triples=16777216"):
        az.attention(q, k, v, method="tensor")
    with pytest.raises(az.UnsupportedImpl, match="chunk.*max_triples"):
        az.attention(q, k, v, method="tensor", impl="chunk")
    small = az.attention(q[:, :, :20], k[:, :, :20], v[:, :, :20], method="tensor", max_triples=8000)
    assert small.shape == (1, 1, 20, 4)
    with pytest.raises(az.AttentionInputError, match="max_triples"):
        az.attention(q[:, :, :21], k[:, :, :21], v[:, :, :21], method="tensor", max_triples=8000)


def test_tensor_chunk_never_builds_the_n_by_n_squared_tensor():
    n = 64
    q, k, v = (t.requires_grad_(True) for t in qkv(1, 1, 1, n, n, 8, dtype=torch.float32))
    probe = LargestTensor()
    with probe:
        out = az.attention(q, k, v, method="tensor", impl="chunk", causal=True, chunk=4)
        out.sum().backward()
    assert probe.largest <= 4 * n * n, probe.largest  # O(Nq·Nk·c) with c = 4, against n³ = 262144
    ref = LargestTensor()
    with ref:
        az.attention(q, k, v, method="tensor", impl="reference", causal=True)
    assert ref.largest >= n ** 3


def test_tensor_decodes_with_a_kv_cache_and_refuses_second_sequences():
    q, k, v = qkv(1, 2, 1, 12, 12, 4)
    full = az.attention(q, k, v, method="tensor", causal=True)
    state = az.get("tensor").init_state(1, 1, 4, 4, dtype=torch.float64)
    steps = [az.get("tensor").step(state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]) for t in range(12)]
    torch.testing.assert_close(torch.cat(steps, 2), full)
    with pytest.raises(az.AttentionInputError, match="k2/v2"):
        az.get("tensor").step(state, q[:, :, :1], k[:, :, :1], v[:, :, :1], k2=k[:, :, :1])
    assert tensor_mod.tensor.family == "higher_order"


def test_tensor_beyond_its_size_limit_is_not_timed_by_the_benchmark():
    """The naive cubic form refuses long inputs with InputTooLarge (naming max_triples);
    the benchmark records that case as not timed, with the reason, never as a failure."""
    from attnzoo.bench import efficiency as eff
    from attnzoo.errors import InputTooLarge

    q = torch.randn(1, 1, 300, 8)
    with pytest.raises(InputTooLarge, match="max_triples"):
        az.attention(q, q, q, method="tensor")
    case = eff.BenchCase("tensor", "auto", 300, "fwd", pattern="noncausal_self", dtype="float32", batch=1, heads=1,
                         kv_heads=1, head_dim=8, repeats=1)
    res = eff.run_case(case, 60, isolate=False)
    assert res.status == "skipped" and "max_triples" in res.error and not res.times_s
