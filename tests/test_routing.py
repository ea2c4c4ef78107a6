"""Content-routed sparse attention: routing (Routing Transformer) and bilevel_routing (BiFormer)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo import stats
from attnzoo.methods.sparse import bilevel_routing, routing

from helpers import LargestTensor


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dense_softmax(q, k, v, allowed, scale=None):
    """Independent dense masked softmax in float64 (GQA by repeat, empty rows -> zeros)."""
    Hq = q.shape[1]
    k = k.repeat_interleave(Hq // k.shape[1], dim=1).double()
    v = v.repeat_interleave(Hq // v.shape[1], dim=1).double()
    s = (q.double() @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def causal_lower_right(nq, nk):
    return torch.tensor([[j <= i + nk - nq for j in range(nk)] for i in range(nq)])


def grads(fn, q, k, v, seed=5):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    dout = rand(*out.shape, seed=seed, dtype=out.dtype)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]


# =============================================================================== routing


def brute_members(x, mu, size, real=None):
    """Per (b, h, c): the ``size`` tokens of largest cosine affinity (float64, Python sort,
    ties to the earlier token; padded tokens last)."""
    B, H, N, _ = x.shape
    C = mu.shape[1]
    out = torch.zeros(B, H, C, size, dtype=torch.long)
    for b in range(B):
        for h in range(H):
            for c in range(C):
                m = mu[h, c].double() / mu[h, c].double().norm()
                keys = []
                for n in range(N):
                    a = float(x[b, h, n].double() @ m / x[b, h, n].double().norm())
                    pad = real is not None and not bool(real[b, n])
                    keys.append((pad, -a, n))
                out[b, h, c] = torch.tensor(sorted(n for _, _, n in sorted(keys)[:size]))
    return out


def brute_allowed(q_idx, k_idx, nq, nk):
    B, H, C, _ = q_idx.shape
    allowed = torch.zeros(B, H, nq, nk, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for c in range(C):
                for i in q_idx[b, h, c].tolist():
                    for j in k_idx[b, h, c].tolist():
                        allowed[b, h, i, j] = True
    return allowed


@pytest.mark.parametrize("nq,nk,C", [(23, 23, 4), (9, 30, 3), (30, 7, 5), (5, 5, 8)])
def test_routing_selection_equals_brute_force(nq, nk, C):
    q, k = rand(2, 4, nq, 8, seed=1), rand(2, 2, nk, 8, seed=2)
    mu = routing.init_centroids(4, C, 8)
    kpm = torch.ones(2, nk, dtype=torch.bool)
    kpm[1, nk // 2:] = False
    q_idx, k_idx = routing.route(q, k, centroids=mu, key_mask=kpm)
    wq, wk = min(nq, math.ceil(nq / C)), min(nk, math.ceil(nk / C))
    assert q_idx.shape == (2, 4, C, wq) and k_idx.shape == (2, 4, C, wk)
    assert torch.equal(q_idx, brute_members(q, mu, wq))
    assert torch.equal(k_idx, brute_members(k.repeat_interleave(2, dim=1), mu, wk, kpm))
    assert torch.equal(routing.selected_mask(q_idx, k_idx, nq, nk), brute_allowed(q_idx, k_idx, nq, nk))


def test_routing_ties_go_to_the_earlier_token():
    base = rand(1, 1, 1, 8, seed=3)
    q = base.expand(1, 1, 10, 8).clone()  # ten identical queries: all affinities tie
    q_idx, k_idx = routing.route(q, q, centroids=routing.init_centroids(1, 4, 8))
    assert torch.equal(q_idx, torch.arange(3).expand(1, 1, 4, 3))
    assert torch.equal(k_idx, torch.arange(3).expand(1, 1, 4, 3))


def test_routing_default_centroids_are_deterministic():
    a, b = routing.init_centroids(3, 5, 16), routing.init_centroids(3, 5, 16)
    assert torch.equal(a, b) and torch.allclose(a.norm(dim=-1), torch.ones(3, 5))
    q, k, v = rand(1, 3, 40, 16, seed=1), rand(1, 3, 40, 16, seed=2), rand(1, 3, 40, 16, seed=3)
    torch.testing.assert_close(az.attention(q, k, v, method="routing", num_clusters=5),
                               az.attention(q, k, v, method="routing", centroids=a))
    with pytest.raises(az.AttentionInputError, match="num_clusters"):
        az.attention(q, k, v, method="routing", centroids=a, num_clusters=4)
    with pytest.raises(az.AttentionInputError, match="centroids"):
        az.attention(q, k, v, method="routing", centroids=a[:2])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk", [(64, 64), (40, 90), (90, 40)])
def test_routing_fast_equals_reference_and_brute_float64(causal, nq, nk):
    """Fast vs reference (outputs and q/k/v gradients) and both vs an independent dense
    computation from the brute-force selection, with GQA, padding and a dense mask."""
    q, k, v = rand(2, 4, nq, 12, seed=1), rand(2, 2, nk, 12, seed=2), rand(2, 2, nk, 10, seed=3)
    mu = routing.init_centroids(4, 5, 12, seed=7)
    kpm = torch.ones(2, nk, dtype=torch.bool)
    kpm[0, -nk // 4:] = False
    mask = rand(1, 4, nq, nk, seed=9) > -1.0
    opts = dict(method="routing", causal=causal, key_mask=kpm, mask=mask, centroids=mu)
    fast = grads(lambda a, b, c: az.attention(a, b, c, impl="cluster", **opts), q, k, v)
    ref = grads(lambda a, b, c: az.attention(a, b, c, impl="reference", **opts), q, k, v)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=1e-10, rtol=1e-10)
    wq, wk = math.ceil(nq / 5), math.ceil(nk / 5)
    allowed = brute_allowed(brute_members(q, mu, wq), brute_members(k.repeat_interleave(2, 1), mu, wk, kpm), nq, nk)
    allowed &= mask & kpm.view(2, 1, 1, nk)
    if causal:
        allowed &= causal_lower_right(nq, nk)
    torch.testing.assert_close(fast[0], dense_softmax(q, k, v, allowed), atol=1e-10, rtol=1e-10)


def test_routing_union_counts_each_key_once():
    """A query in several clusters whose key sets overlap: each shared key counted once."""
    x = rand(1, 1, 6, 4, seed=4)
    x = torch.cat([x, x[:, :, :1].expand(1, 1, 6, 4)], dim=2)  # copies of token 0: it lands in many clusters
    mu = F.normalize(rand(1, 3, 4, seed=5), dim=-1)
    q_idx, k_idx = routing.route(x, x, centroids=mu)
    multi = torch.zeros(12, dtype=torch.long).scatter_add(0, q_idx.flatten(), torch.ones(q_idx.numel(), dtype=torch.long))
    shared = [set(k_idx[0, 0, a].tolist()) & set(k_idx[0, 0, b].tolist()) for a in range(3) for b in range(a)]
    assert int(multi.max()) > 1 and any(shared)  # the case is really exercised
    v = rand(1, 1, 12, 5, seed=6)
    out = az.attention(x, x, v, method="routing", centroids=mu, impl="cluster")
    allowed = brute_allowed(q_idx, k_idx, 12, 12)
    torch.testing.assert_close(out, dense_softmax(x, x, v, allowed), atol=1e-12, rtol=1e-12)


def test_routing_padding_never_matters_and_empty_rows_are_zero():
    q, k, v = rand(2, 2, 30, 8, seed=1), rand(2, 2, 50, 8, seed=2), rand(2, 2, 50, 8, seed=3)
    kpm = torch.ones(2, 50, dtype=torch.bool)
    kpm[1, 20:] = False
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 20:], v2[1, :, 20:] = rand(2, 30, 8, seed=8) * 5, rand(2, 30, 8, seed=9) * 5
    for impl in ("cluster", "reference"):
        for causal in (False, True):
            a = az.attention(q, k, v, method="routing", impl=impl, causal=causal, key_mask=kpm)
            b = az.attention(q, k2, v2, method="routing", impl=impl, causal=causal, key_mask=kpm)
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # causal with Nq > Nk: the first queries see no key at all -> zeros, finite gradients
    q, k, v = rand(1, 2, 40, 8, seed=1), rand(1, 2, 10, 8, seed=2), rand(1, 2, 10, 8, seed=3)
    res = grads(lambda a, b, c: az.attention(a, b, c, method="routing", causal=True, impl="cluster"), q, k, v)
    assert torch.equal(res[0][:, :, :30], torch.zeros(1, 2, 30, 8))
    assert all(torch.isfinite(t).all() for t in res)


def test_routing_module_updates_centroids_by_ema_in_training_only():
    torch.manual_seed(0)
    mod = routing.RoutingAttention(heads=2, head_dim=8, kv_heads=1, num_clusters=3, decay=0.9)
    assert not list(mod.parameters()) and mod.centroids.shape == (2, 3, 8)
    q, k, v = rand(2, 2, 20, 8, seed=1), rand(2, 1, 20, 8, seed=2), rand(2, 1, 20, 8, seed=3)
    mu0 = mod.centroids.clone()
    mod.eval()
    out_eval = mod(q, k, v)
    assert torch.equal(mod.centroids, mu0)
    torch.testing.assert_close(out_eval, az.attention(q, k, v, method="routing", centroids=mu0))
    mod.train()
    out_train = mod(q, k, v)
    torch.testing.assert_close(out_train, out_eval)  # the update comes after the forward
    # expected: nearest-centroid assignment of the normalised queries and keys, EMA, renormalise
    xs = [F.normalize(q.float(), dim=-1), F.normalize(k.float().expand(2, 2, 20, 8), dim=-1)]
    expected = mu0.clone()
    for h in range(2):
        for c in range(3):
            members = [x[b, h, n] for x in xs for b in range(2) for n in range(20)
                       if int((mu0[h] @ x[b, h, n]).argmax()) == c]
            if members:
                mean = torch.stack(members).mean(0)
                expected[h, c] = F.normalize(0.9 * mu0[h, c] + 0.1 * mean, dim=0)
    torch.testing.assert_close(mod.centroids, expected, atol=1e-6, rtol=1e-6)
    assert not torch.equal(mod.centroids, mu0)


def test_routing_module_update_leaves_padded_keys_out():
    """The EMA update counts the real keys only, whichever way the padding is given:
    ``key_mask`` (True = real key) or ``key_padding_mask`` (True = padding, as in
    ``nn.MultiheadAttention``)."""
    q, k, v = rand(2, 2, 20, 8, seed=1), rand(2, 1, 20, 8, seed=2), rand(2, 1, 20, 8, seed=3)
    real = torch.ones(2, 20, dtype=torch.bool)
    real[1, 12:] = False

    def module():
        return routing.RoutingAttention(heads=2, head_dim=8, kv_heads=1, num_clusters=3, decay=0.5)

    expected = module()
    expected.update_centroids(q, k, key_mask=real)
    for kw in ({"key_mask": real}, {"key_padding_mask": ~real}):
        mod = module().train()
        mod(q, k, v, **kw)
        torch.testing.assert_close(mod.centroids, expected.centroids)
    unmasked = module()
    unmasked.update_centroids(q, k)  # the padded keys would move the centroids elsewhere
    assert not torch.allclose(unmasked.centroids, expected.centroids)


def test_routing_reports_density_and_never_allocates_n_by_n():
    N, D = 8192, 16
    q, k, v = (rand(1, 1, N, D, seed=s, dtype=torch.float32).requires_grad_(True) for s in range(3))
    probe = LargestTensor()
    with stats.collect() as st, probe:
        out = az.attention(q, k, v, method="routing", causal=True, num_clusters=16, impl="cluster")
        out.sum().backward()
    assert probe.largest < N * N // 4, probe.largest
    assert len(st["density"]) == 1 and 0.0 < st["density"][0] < 0.2


def test_routing_recall_of_a_planted_needle():
    """Clustered content (16 directions + noise). The module's online k-means learns the
    centroids on needle-free data (training mode); then, in eval mode, one key planted
    as the exact, amplified match of one query among 4096 keys is retrieved while each
    query uses < 10% of the keys."""
    N, D, C = 4096, 64, 16
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(C, D, generator=g), dim=-1)

    def sample():
        lab_q, lab_k = torch.randint(0, C, (N,), generator=g), torch.randint(0, C, (N,), generator=g)
        q = centers[lab_q] + 0.3 * torch.randn(N, D, generator=g) / math.sqrt(D)
        k = centers[lab_k] + 0.3 * torch.randn(N, D, generator=g) / math.sqrt(D)
        return q, k

    mod = routing.RoutingAttention(heads=1, head_dim=D, num_clusters=C, decay=0.5)
    mu0 = mod.centroids.clone()
    for _ in range(12):
        q, k = sample()
        mod(q.view(1, 1, N, D), k.view(1, 1, N, D), k.view(1, 1, N, D))
    assert float((mod.centroids[0] @ centers.T).max(1).values.median()) > 0.99  # k-means found the directions
    assert float((mu0[0] @ centers.T).max(1).values.median()) < 0.6
    mod.eval()
    i, j = 1234, 3001
    for c in (0, 5, 11):
        q, k = sample()
        v = torch.randn(N, D, generator=g)
        q[i], k[j] = 12 * centers[c], 12 * centers[c]  # the needle pair
        q, k, v = q.view(1, 1, N, D), k.view(1, 1, N, D), v.view(1, 1, N, D)
        with stats.collect() as st:
            out = mod(q, k, v, impl="cluster")
        assert st["density"][0] < 0.1
        q_idx, k_idx = routing.route(q, k, centroids=mod.centroids)
        assert any(i in q_idx[0, 0, cl].tolist() and j in k_idx[0, 0, cl].tolist() for cl in range(C))
        assert F.cosine_similarity(out[0, 0, i], v[0, 0, j], dim=0) > 0.99
    torch.testing.assert_close(out, mod(q, k, v, impl="reference"), atol=1e-5, rtol=1e-5)


# ======================================================================= bilevel_routing


def brute_regions_1d(q, k, R, topk, causal=False, kpm=None):
    """Per (b, h, query region): the selected key regions (float64 means by loops)."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], 1)
    nqr, nkr = math.ceil(Nq / R), math.ceil(Nk / R)
    sel = torch.zeros(B, H, nqr, nkr, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            kr, real = [], []
            for r in range(nkr):
                toks = [t for t in range(r * R, min(Nk, r * R + R)) if kpm is None or bool(kpm[b, t])]
                real.append(bool(toks))
                kr.append(torch.stack([k[b, h, t] for t in toks]).mean(0) if toks else None)
            for i in range(nqr):
                qr = q[b, h, i * R:min(Nq, i * R + R)].mean(0)
                last = min(Nq, i * R + R) - 1 + Nk - Nq
                cand = [(-float(qr @ kr[j]), j) for j in range(nkr) if real[j] and (not causal or j * R <= last)]
                for _, j in sorted(cand)[:topk]:
                    sel[b, h, i, j] = True
    return sel


def expand_1d(sel, Nq, Nk, R):
    return sel.repeat_interleave(R, 2)[:, :, :Nq].repeat_interleave(R, 3)[:, :, :, :Nk]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("nq,nk,R,topk", [(50, 50, 8, 2), (30, 61, 7, 3), (61, 30, 10, 2), (12, 12, 4, 9)])
def test_bilevel_selection_fast_reference_and_brute_1d(causal, nq, nk, R, topk):
    q, k, v = rand(2, 4, nq, 8, seed=1), rand(2, 2, nk, 8, seed=2), rand(2, 2, nk, 6, seed=3)
    kpm = torch.ones(2, nk, dtype=torch.bool)
    kpm[1, nk // 3:] = False
    idx, valid = bilevel_routing.route(q, k, causal=causal, key_mask=kpm, R=R, perm=None, topk=topk)
    got = torch.zeros(2, 4, math.ceil(nq / R), math.ceil(nk / R), dtype=torch.bool).scatter_(-1, idx, valid)
    sel = brute_regions_1d(q, k, R, topk, causal, kpm)
    assert torch.equal(got, sel)
    opts = dict(method="bilevel_routing", causal=causal, key_mask=kpm, region_size=R, topk=topk)
    fast = grads(lambda a, b, c: az.attention(a, b, c, impl="block", **opts), q, k, v)
    ref = grads(lambda a, b, c: az.attention(a, b, c, impl="reference", **opts), q, k, v)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=1e-10, rtol=1e-10)
    allowed = expand_1d(sel, nq, nk, R) & kpm.view(2, 1, 1, nk)
    if causal:
        allowed &= causal_lower_right(nq, nk)
    torch.testing.assert_close(fast[0], dense_softmax(q, k, v, allowed), atol=1e-10, rtol=1e-10)


def test_bilevel_ties_go_to_the_lower_region():
    q = torch.ones(1, 1, 16, 4, dtype=torch.float64)
    idx, valid = bilevel_routing.route(q, q, causal=False, key_mask=None, R=4, perm=None, topk=2)
    assert torch.equal(idx, torch.tensor([0, 1]).expand(1, 1, 4, 2)) and bool(valid.all())


@pytest.mark.parametrize("grid,regions,topk", [((8, 12), (2, 3), 2), ((6, 6), (3, 3), 4), ((4, 8), (1, 2), 1)])
def test_bilevel_2d_equals_brute_force(grid, regions, topk):
    H, W = grid
    rh, rw = regions
    N = H * W
    q, k, v = rand(1, 2, N, 8, seed=1), rand(1, 2, N, 8, seed=2), rand(1, 2, N, 5, seed=3)
    mask = rand(1, 1, N, N, seed=4) > -1.5
    region = torch.tensor([(y // (H // rh)) * rw + x // (W // rw) for y in range(H) for x in range(W)])
    n = rh * rw
    allowed = torch.zeros(1, 2, N, N, dtype=torch.bool)
    for h in range(2):
        qr = torch.stack([q[0, h, region == r].mean(0) for r in range(n)])
        kr = torch.stack([k[0, h, region == r].mean(0) for r in range(n)])
        A = qr @ kr.T
        for i in range(n):
            for _, j in sorted((-float(A[i, j]), j) for j in range(n))[:topk]:
                allowed[0, h] |= (region == i).view(-1, 1) & (region == j).view(1, -1)
    opts = dict(method="bilevel_routing", grid=grid, regions=regions, topk=topk, mask=mask)
    fast = grads(lambda a, b, c: az.attention(a, b, c, impl="block", **opts), q, k, v)
    ref = grads(lambda a, b, c: az.attention(a, b, c, impl="reference", **opts), q, k, v)
    for f, r in zip(fast, ref):
        torch.testing.assert_close(f, r, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fast[0], dense_softmax(q, k, v, allowed & mask), atol=1e-10, rtol=1e-10)
    with pytest.raises(az.UnsupportedPattern, match="noncausal self"):
        az.attention(q, k, v, method="bilevel_routing", grid=grid, regions=regions, causal=True)
    with pytest.raises(az.AttentionInputError, match="divisible"):
        az.attention(q, k, v, method="bilevel_routing", grid=grid, regions=(5, 7))


def test_bilevel_padding_never_matters():
    q, k, v = rand(2, 2, 40, 8, seed=1), rand(2, 2, 40, 8, seed=2), rand(2, 2, 40, 8, seed=3)
    kpm = torch.ones(2, 40, dtype=torch.bool)
    kpm[0, 25:] = False
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 25:], v2[0, :, 25:] = rand(2, 15, 8, seed=7) * 9, rand(2, 15, 8, seed=8) * 9
    for impl in ("block", "reference"):
        for causal in (False, True):
            o = dict(method="bilevel_routing", impl=impl, causal=causal, key_mask=kpm, region_size=8, topk=2)
            torch.testing.assert_close(az.attention(q, k, v, **o), az.attention(q, k2, v2, **o), atol=1e-12, rtol=1e-12)


def test_bilevel_density_and_never_allocates_n_by_n():
    N, D, R, topk = 8192, 16, 64, 4
    q, k, v = (rand(1, 1, N, D, seed=s, dtype=torch.float32).requires_grad_(True) for s in range(3))
    probe = LargestTensor()
    with stats.collect() as st, probe:
        out = az.attention(q, k, v, method="bilevel_routing", causal=True, region_size=R, topk=topk, impl="block")
        out.sum().backward()
    assert probe.largest < N * N // 4, probe.largest
    # brute density: keys of the selected regions visible to each query over its visible keys
    idx, valid = bilevel_routing.route(q, k, causal=True, key_mask=None, R=R, perm=None, topk=topk)
    pos = torch.arange(N)
    reg_start = (idx[0, 0] * R).repeat_interleave(R, 0)  # (N, K)
    cnt = ((torch.minimum(reg_start + R, pos.view(-1, 1) + 1) - reg_start).clamp(min=0)
           * valid[0, 0].repeat_interleave(R, 0)).sum(-1)
    expected = float((cnt / (pos + 1)).mean())
    assert st["density"] == [pytest.approx(expected, rel=1e-6)]
    with torch.no_grad(), stats.collect() as st:  # noncausal: every query attends exactly topk full regions
        az.attention(q, k, v, method="bilevel_routing", region_size=R, topk=topk, impl="block")
    assert st["density"] == [pytest.approx(topk * R / N, rel=1e-6)]


def test_density_counts_real_visible_keys_and_reports_unrouted_queries():
    """Review regression: density is attended keys over *real* keys the row may see
    (padding and empty rows excluded); routing also reports the unrouted fraction."""
    import attnzoo as az
    from attnzoo import stats

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g, dtype=torch.float64) for _ in range(3))
    kpm = torch.ones(1, 16, dtype=torch.bool)
    kpm[0, 8:] = False
    with stats.collect() as rec:  # one cluster holds every token: every real key is attended
        az.attention(q, k, v, method="routing", key_mask=kpm, num_clusters=1, impl="cluster")
    assert rec["density"] == [pytest.approx(1.0)] and rec["unrouted"] == [pytest.approx(0.0)]
    with stats.collect() as rec:  # causal cross with Nq > Nk: rows that see nothing are skipped
        az.attention(q, k[:, :, :8], v[:, :, :8], method="routing", causal=True, num_clusters=1, impl="cluster")
    assert rec["density"] == [pytest.approx(1.0)]
    with stats.collect() as rec:  # bilevel with every region selected
        az.attention(q, k[:, :, :8], v[:, :, :8], method="bilevel_routing", causal=True, region_size=4, topk=4,
                     impl="block")
    assert rec["density"] == [pytest.approx(1.0)]
    with stats.collect() as rec:
        az.attention(q, k, v, method="bilevel_routing", key_mask=kpm, region_size=4, topk=4, impl="block")
    assert rec["density"] == [pytest.approx(1.0)]


@pytest.mark.parametrize("grid,n", [(None, 96), ((8, 12), 96)])
def test_bilevel_routing_takes_a_mask_mod_per_tile(grid, n):
    """Review regression: a mask_mod reaches the kernel (no dense Nq×Nk mask), evaluated at
    the original positions in 2-D (where the fast path permutes tokens into regions)."""
    import attnzoo as az

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for _ in range(3))

    def mod(b, h, q_idx, kv_idx):
        return (q_idx + kv_idx) % 3 != 0

    opts = {"grid": grid, "regions": (2, 3), "topk": 3} if grid else {"region_size": 16, "topk": 3}
    ref = az.attention(q, k, v, method="bilevel_routing", mask=mod, impl="reference", **opts)
    fast = az.attention(q, k, v, method="bilevel_routing", mask=mod, impl="block", **opts)
    torch.testing.assert_close(fast, ref)


def test_bilevel_routing_mask_mod_is_never_densified():
    import attnzoo as az
    from helpers import LargestTensor

    N = 8192
    q, k, v = (torch.randn(1, 1, N, 16) for _ in range(3))
    probe = LargestTensor()
    with probe, torch.no_grad():
        az.attention(q, k, v, method="bilevel_routing", causal=True, mask=lambda b, h, qi, ki: ki % 5 != 1,
                     region_size=128, topk=4, impl="block")
    assert probe.largest < N * N // 4


def test_routing_takes_a_mask_mod_at_the_gathered_pairs():
    import attnzoo as az

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 64, 8, generator=g, dtype=torch.float64) for _ in range(3))

    def mod(b, h, q_idx, kv_idx):
        return ((q_idx // 8) != (kv_idx // 8)) | (b == h)

    ref = az.attention(q, k, v, method="routing", mask=mod, causal=True, num_clusters=4, impl="reference")
    fast = az.attention(q, k, v, method="routing", mask=mod, causal=True, num_clusters=4, impl="cluster")
    torch.testing.assert_close(fast, ref)


# ================================================= the references are independent programs


from helpers import CASES, contract_check  # noqa: E402, F401


def _sized(method, case, pattern):
    return az.get(method).sized_options(max(case.lengths(pattern)))


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_cross"])
def test_routing_contract_catches_a_wrong_cluster_in_the_fast_form(monkeypatch, pattern):
    """Swap one key of one cluster in the fast form's selection: the contract comparison
    (whose reference forms its clusters by another program) must fail."""
    options = _sized("routing", CASES[2], pattern)
    contract_check("routing", "cluster", pattern, options)  # as shipped: passes
    real_route = routing.route

    def wrong_route(q, k, **kw):
        q_idx, k_idx = real_route(q, k, **kw)
        k_idx = k_idx.clone()
        outsider = min(set(range(k.shape[2])) - set(k_idx[0, 0, 0].tolist()))
        k_idx[0, 0, 0, -1] = outsider  # the cluster's last key (its latest position) replaced
        return q_idx, k_idx

    monkeypatch.setattr(routing, "route", wrong_route)
    with pytest.raises(AssertionError, match=r"err\(fast\)"):
        contract_check("routing", "cluster", pattern, options)


def test_routing_contract_catches_a_wrong_cluster_in_the_reference(monkeypatch):
    """And the other way: the reference's own search (by value) is what it compares against."""
    options = _sized("routing", CASES[2], "noncausal_self")
    real = routing.top_by_threshold
    monkeypatch.setattr(routing, "top_by_threshold", lambda s, k, eligible=None: real(-s, k, eligible))
    with pytest.raises(AssertionError, match=r"err\(fast\)"):
        contract_check("routing", "cluster", "noncausal_self", options)


@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self"])
def test_bilevel_contract_catches_a_wrong_region_in_the_fast_form(monkeypatch, pattern):
    options = _sized("bilevel_routing", CASES[2], pattern)
    contract_check("bilevel_routing", "block", pattern, options)  # as shipped: passes
    real_route = bilevel_routing.route

    def wrong_route(q, k, **kw):
        idx, valid = real_route(q, k, **kw)
        idx = idx.clone()
        i = idx.shape[2] - 1  # the last query region: under causality every key region is eligible
        others = sorted(set(range(-(-k.shape[2] // kw["R"]))) - set(idx[0, 0, i].tolist()))
        idx[0, 0, i, 0] = others[0]  # its best region replaced by one it did not choose
        return idx, valid

    monkeypatch.setattr(bilevel_routing, "route", wrong_route)
    with pytest.raises(AssertionError, match=r"err\(fast\)"):
        contract_check("bilevel_routing", "block", pattern, options)


def test_bilevel_contract_catches_a_wrong_region_in_the_reference(monkeypatch):
    options = _sized("bilevel_routing", CASES[2], "noncausal_self")
    real = bilevel_routing.rank_by_count
    monkeypatch.setattr(bilevel_routing, "rank_by_count", lambda s, eligible=None: real(-s, eligible))
    with pytest.raises(AssertionError, match=r"err\(fast\)"):
        contract_check("bilevel_routing", "block", "noncausal_self", options)


def test_routing_ties_agree_between_reference_and_fast():
    """Tokens drawn from five vectors: every cluster's affinities are full of exact ties,
    which both programs give to the earlier token (outputs and gradients, float64)."""
    g = torch.Generator().manual_seed(11)
    atoms = torch.randn(5, 8, generator=g, dtype=torch.float64)
    pick = lambda n: atoms[torch.randint(0, 5, (2, 2, n), generator=g)]  # noqa: E731
    q, k, v = pick(40), pick(33), torch.randn(2, 2, 33, 6, generator=g, dtype=torch.float64)
    for causal in (False, True):
        opts = dict(method="routing", num_clusters=4, causal=causal)
        fast = grads(lambda a, b, c: az.attention(a, b, c, impl="cluster", **opts), q, k, v)
        ref = grads(lambda a, b, c: az.attention(a, b, c, impl="reference", **opts), q, k, v)
        for f, r in zip(fast, ref):
            torch.testing.assert_close(f, r, atol=1e-10, rtol=1e-10)
    mu = routing.init_centroids(2, 4, 8)
    q_idx, k_idx = routing.route(q, k, centroids=mu)
    assert torch.equal(q_idx, brute_members(q, mu, 10)) and torch.equal(k_idx, brute_members(k, mu, 9))


def test_bilevel_ties_agree_between_reference_and_fast():
    """Key regions that repeat one pattern: all region affinities of a row tie exactly,
    and both programs keep the lowest-index regions."""
    g = torch.Generator().manual_seed(12)
    q = torch.randn(1, 2, 48, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 8, 8, generator=g, dtype=torch.float64).repeat(1, 1, 6, 1)  # 6 equal regions of 8
    v = torch.randn(1, 2, 48, 5, generator=g, dtype=torch.float64)
    for causal in (False, True):
        opts = dict(method="bilevel_routing", region_size=8, topk=2, causal=causal)
        fast = grads(lambda a, b, c: az.attention(a, b, c, impl="block", **opts), q, k, v)
        ref = grads(lambda a, b, c: az.attention(a, b, c, impl="reference", **opts), q, k, v)
        for f, r in zip(fast, ref):
            torch.testing.assert_close(f, r, atol=1e-10, rtol=1e-10)
        idx, valid = bilevel_routing.route(q, k, causal=causal, key_mask=None, R=8, perm=None, topk=2)
        if not causal:
            assert torch.equal(idx, torch.tensor([0, 1]).expand(1, 2, 6, 2))


@pytest.mark.parametrize("method,options", [("routing", {"num_clusters": None}),
                                            ("bilevel_routing", {"region_size": 16, "topk": 2})])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_other_sizes_agree(method, options, case):
    """Fast vs reference at sizes the sizing hook does not give at these lengths: routing's
    default √N clusters, and the regions the contract used before the hook (16, topk 2)."""
    impl = az.get(method).impls[0].name
    for pattern in ("causal_self", "noncausal_cross"):
        contract_check(method, impl, pattern, options, case=case, dtype=torch.bfloat16)


def test_the_top_k_programs_agree_on_ties():
    """The fast forms' stable sort and the references' counted rank and threshold pick the
    same entries, ties to the lower index, eligibility respected (tie-heavy integer scores)."""
    from attnzoo.kernels.routing_select import rank_by_count, top_by_sort, top_by_threshold

    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 30, (), generator=g))
        s = torch.randint(0, 4, (3, n), generator=g).float()
        eligible = torch.rand(3, n, generator=g) > 0.3
        k = int(torch.randint(1, n + 2, (), generator=g))
        by_threshold = top_by_threshold(s, k, eligible)
        by_count = eligible & (rank_by_count(s, eligible) < k)
        by_sort = torch.zeros_like(eligible).scatter_(
            -1, top_by_sort(s.masked_fill(~eligible, float("-inf")), min(k, n)), True) & eligible
        assert torch.equal(by_threshold, by_count) and torch.equal(by_threshold, by_sort), (s, eligible, k)
        assert torch.equal(top_by_threshold(s, k), rank_by_count(s) < k)


@pytest.mark.parametrize("method,impl", [("routing", "cluster"), ("bilevel_routing", "block")])
def test_reference_and_fast_select_alike_over_many_draws(method, impl):
    """float32 and bfloat16 inputs over many random draws (causal, cross, padding): the two
    selection programs never disagree (a disagreement moves outputs by ~0.1, rounding by ~1e-6)."""
    for seed in range(10):
        g = torch.Generator().manual_seed(100 + seed)
        nq, nk = (150, 150) if seed % 2 else (97, 203)
        q, k, v = (torch.randn(2, 4, n, 16, generator=g) for n in (nq, nk, nk))
        k, v = k[:, :2], v[:, :2]
        kpm = torch.rand(2, nk, generator=g) > 0.2
        for dtype in (torch.float32, torch.bfloat16):
            opts = dict(method=method, causal=bool(seed % 3), key_mask=kpm, **az.get(method).sized_options(nk))
            a, b, c = (t.to(dtype) for t in (q, k, v))
            fast = az.attention(a, b, c, impl=impl, **opts).float()
            ref = az.attention(a, b, c, impl="reference", **opts).float()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(fast, ref, atol=tol, rtol=tol)
