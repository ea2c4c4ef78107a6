"""Head mixtures (MoH, BAM's soft mixture of attention, EchoAtt's sharing) and the
mixtures methods (gaussian, rcmha), against truth computed by hand: loops over
positions, the routing written out token by token, the shared weights applied by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo import stats
from attnzoo.layers import EchoStack, MoHAttention, SharedWeightsAttention, SoftMixtureOfAttention, attention_similarity


def randomize(module, std=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def layer(method="softmax", dim=32, heads=4, kv_heads=None, causal=False, n=12, **kw):
    options = az.get(method).sized_options(n, module=True)
    return randomize(az.Attention(dim, heads, kv_heads, method=method, causal=causal, **options, **kw)).double()


def manual_heads(attn, x):
    """Each head's output ``(B, H, N, dh)`` by hand: projections, then per head the method
    on that head alone (rotary applied as the layer does)."""
    B, N, _ = x.shape
    H, Hkv, dh = attn.heads, attn.kv_heads, attn.dim_head
    pos = torch.arange(N)
    q = attn.to_q(x).view(B, N, H, dh).transpose(1, 2)
    k = attn.to_k(x).view(B, N, Hkv, dh).transpose(1, 2)
    v = attn.to_v(x).view(B, N, Hkv, dh).transpose(1, 2)
    if attn.rotary is not None:
        q, k = attn.rotary(q, pos), attn.rotary(k, pos)
    outs = []
    for h in range(H):
        g = h // (H // Hkv)
        outs.append(F.scaled_dot_product_attention(q[:, h:h + 1], k[:, g:g + 1], v[:, g:g + 1], is_causal=attn.causal))
    return torch.cat(outs, dim=1)


# ------------------------------------------------------------------------------ MoH


ROUTED = [pytest.param(m, c, id=f"{m}-{'causal' if c else 'noncausal'}")
          for m in ("softmax", "sigmoid", "sliding_window", "linear", "gaussian", "rcmha", "lightning")
          for c in (False, True) if az.get(m).supports_pattern(c, False)]


@pytest.mark.parametrize("method,causal", ROUTED)
def test_moh_with_every_head_routed_equals_multihead_attention(method, causal):
    """k = every routed head, each with weight one: MoH is the layer it routes, exactly."""
    attn = layer(method, kv_heads=2, causal=causal, rotary=True)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    expected = attn(x)
    for shared in (0, 1, 3):
        moh = MoHAttention.from_attention(attn, shared_heads=shared, top_k=4 - shared, weighting="ones").double()
        torch.testing.assert_close(moh(x), expected, atol=1e-12, rtol=1e-12)
        assert moh.heads_used == 1.0 and moh.heads_computed == 1.0


def test_moh_cross_attention_routes_the_query_tokens():
    """Cross-attention: k = all with weight one is the layer; one query token computes its
    shared head and its top-1 only, and equals computing every head."""
    attn = layer("softmax", heads=4, kv_heads=2, context_dim=24)
    x, memory = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 9, 24, dtype=torch.float64)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, 6:] = False
    moh = MoHAttention.from_attention(attn, top_k=4, weighting="ones").double()
    torch.testing.assert_close(moh(x, memory, key_mask=kpm), attn(x, memory, key_mask=kpm))
    moh = randomize(MoHAttention.from_attention(attn, shared_heads=1, top_k=1)).double()
    one = moh(x[:1, :1], memory[:1])
    assert moh.heads_computed == 0.5
    moh.skip = "none"
    torch.testing.assert_close(moh(x[:1, :1], memory[:1]), one)


def test_moh_router_weights_with_every_head_are_a_per_token_weighted_sum():
    """k = all with the router's weights: Σ_i g_i(x_t) H^i W_O^i, the heads and the
    weights computed by hand."""
    attn = layer("softmax", heads=4, causal=True)
    moh = randomize(MoHAttention.from_attention(attn, shared_heads=1, top_k=3)).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    gates = moh.route(x)[0]  # checked against the formula in the next test
    heads = manual_heads(attn, x) * gates.transpose(1, 2).unsqueeze(-1)
    expected = attn.to_out(heads.transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(moh(x), expected)


def test_router_top_k_and_two_stage_weights_by_hand():
    """g_i = α1 softmax(W_s x)_i for shared heads, α2 softmax(W_r x)_i for the top-k routed
    heads (softmax over all routed heads, not renormalised), 0 else; [α1, α2] = softmax(W_h x)."""
    torch.manual_seed(1)
    attn = layer("softmax", dim=24, heads=6)
    moh = randomize(MoHAttention.from_attention(attn, shared_heads=2, top_k=2), std=1.0).double()
    x = torch.randn(1, 5, 24, dtype=torch.float64)
    gates, active, chosen, probs = moh.route(x)
    Ws, Wr, Wh = moh.router_shared.weight, moh.router_routed.weight, moh.router_mix.weight
    for t in range(5):
        xt = x[0, t]
        s = [float(Ws[i].detach() @ xt) for i in range(2)]
        r = [float(Wr[i].detach() @ xt) for i in range(4)]
        m = [float(Wh[i].detach() @ xt) for i in range(2)]
        a1, a2 = math.exp(m[0]) / (math.exp(m[0]) + math.exp(m[1])), math.exp(m[1]) / (math.exp(m[0]) + math.exp(m[1]))
        top = sorted(range(4), key=lambda i: -r[i])[:2]
        expected = [a1 * math.exp(s[i]) / sum(math.exp(z) for z in s) for i in range(2)]
        expected += [a2 * math.exp(r[i]) / sum(math.exp(z) for z in r) if i in top else 0.0 for i in range(4)]
        assert gates[0, t].tolist() == pytest.approx(expected, abs=1e-6)
        assert active[0, t].tolist() == [True, True] + [i in top for i in range(4)]
        assert sum(active[0, t].tolist()) == 4


def test_top_k_ties_go_to_the_lower_head():
    from attnzoo.kernels.heads import two_stage_gates

    g, chosen, _ = two_stage_gates(None, torch.zeros(1, 5), None, 2)
    assert chosen.tolist() == [[True, True, False, False, False]]
    assert g[0].tolist() == pytest.approx([0.2, 0.2, 0.0, 0.0, 0.0])


def test_fraction_of_heads_used_and_computed():
    attn = layer("softmax", heads=8)
    moh = MoHAttention.from_attention(attn, shared_heads=2, top_k=2).double()
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    with stats.collect() as record:
        moh(x)
        moh(x[:1, :1])  # one token: exactly the shared heads and its top 2 are computed
    assert moh.heads_used == 0.5 and record["heads_used"] == [0.5, 0.5]
    assert record["heads_computed"][1] == 0.5 and moh.heads_computed == 0.5
    assert record["heads_computed"][0] >= 0.5


def test_skipping_heads_equals_computing_all_of_them():
    """skip='heads' (only the heads some token chose, GQA groups partly computed, per-head
    masks re-indexed) equals skip='none' in outputs, weights and gradients."""
    attn = layer("softmax", heads=4, kv_heads=2, causal=True, rotary=True, gate=True)
    moh = randomize(MoHAttention.from_attention(attn, shared_heads=1, top_k=1, skip="heads")).double()
    x = torch.randn(1, 1, 32, dtype=torch.float64)
    dense_mask = torch.rand(1, 4, 1, 1) < 2  # all True: a per-head tensor to re-index

    def by_head(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (h != 3)  # head 3 sees nothing: its rows are zeros

    results = {}
    for mode in ("heads", "none"):
        moh.skip = mode
        xx = x.clone().requires_grad_(True)
        y, w = moh(xx, mask=by_head, return_weights=True)
        y2 = moh(xx, attn_mask=dense_mask)
        (y.sum() + y2.square().sum()).backward()
        grads = [p.grad.clone() for p in moh.parameters() if p.grad is not None]
        moh.zero_grad()
        results[mode] = (y, w, y2, xx.grad, grads, moh.heads_computed)
    a, b = results["heads"], results["none"]
    assert a[5] == 0.5 and b[5] == 1.0
    on = moh.route(x)[1][0, 0]
    torch.testing.assert_close(a[1][:, on], b[1][:, on])
    assert bool((a[1][:, ~on] == 0).all()) and bool((b[1][:, ~on] != 0).any())  # skipped: not computed
    for u, v in zip((a[0], a[2], a[3]), (b[0], b[2], b[3])):
        torch.testing.assert_close(u, v)
    for u, v in zip(a[4], b[4]):
        torch.testing.assert_close(u, v)


def test_skipping_refuses_methods_whose_heads_differ():
    """moa (per-head spans) and lightning (per-head decays) cannot run on a subset of the
    heads: 'auto' computes them all, 'heads' raises."""
    x = torch.randn(1, 1, 32, dtype=torch.float64)
    for method in ("moa", "lightning", "gaussian"):  # gaussian: per-head parameters
        attn = layer(method, heads=4, causal=True)
        moh = MoHAttention.from_attention(attn, shared_heads=0, top_k=1).double()
        moh(x)
        assert moh.heads_computed == 1.0
        moh.skip, moh._uniform = "heads", {}
        with pytest.raises(az.AttentionInputError, match="subset of the heads"):
            moh(x)


def test_balance_loss_by_hand_and_attached_to_the_output():
    attn = layer("softmax", heads=4)
    moh = randomize(MoHAttention.from_attention(attn, shared_heads=0, top_k=1, balance_weight=0.5)).double()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    moh.eval()
    y = moh(x)
    _, _, chosen, probs = moh.route(x)
    f = chosen.double().reshape(-1, 4).mean(0)
    P = probs.reshape(-1, 4).mean(0)
    torch.testing.assert_close(moh.balance_loss, (f * P).sum())
    # training: the loss of the output alone back-propagates β·L_b too
    (y.sum() + 0.5 * moh.balance_loss).backward()
    expected = moh.router_routed.weight.grad.clone()
    moh.zero_grad()
    moh.train()
    moh(x).sum().backward()
    torch.testing.assert_close(moh.router_routed.weight.grad, expected)


def test_moh_decoding_equals_forward():
    attn = layer("softmax", heads=4, kv_heads=2, causal=True, rotary=True)
    moh = randomize(MoHAttention.from_attention(attn, shared_heads=1, top_k=1)).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    full = moh(x)
    cache = moh.init_cache(2)
    steps = [moh.step(x[:, :3], cache)] + [moh.step(x[:, t:t + 1], cache) for t in range(3, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full)


def test_moh_arguments_are_checked():
    with pytest.raises(az.AttentionInputError, match="shared_heads"):
        MoHAttention(32, 4, shared_heads=5)
    with pytest.raises(az.AttentionInputError, match="top_k"):
        MoHAttention(32, 4, shared_heads=1, top_k=4)
    with pytest.raises(az.AttentionInputError, match="not both"):
        MoHAttention(32, attention=az.Attention(32, 4))
    assert MoHAttention(32, 8, shared_heads=2).top_k == 3


# ----------------------------------------------------------------------------- BAM


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_soft_mixture_with_one_expert_is_that_expert(kv_heads):
    attn = layer("softmax", heads=4, kv_heads=kv_heads, causal=True, rotary=True, bias=True, gate=True,
                 qk_norm=True)
    moa = SoftMixtureOfAttention.from_attentions([attn]).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(moa(x), attn(x), atol=1e-12, rtol=1e-12)
    y, w = moa(x, return_weights=True)
    torch.testing.assert_close(w[:, 0], attn(x, return_weights=True)[1])


def test_soft_mixture_of_identical_experts_is_the_expert_whatever_the_router():
    attn = layer("sliding_window", heads=4, kv_heads=2)
    moa = SoftMixtureOfAttention.from_attentions([attn, attn, attn], router=torch.randn(3, 32)).double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(moa(x), attn(x))


def test_soft_mixture_of_two_experts_by_hand():
    """y = Σ_e softmax(W_r x)_e · expert_e(x), each expert with its own Q/O and the shared
    (averaged) K/V; experts' GQA groups laid out in one call."""
    a, b = layer("softmax", heads=4, kv_heads=2, causal=True), layer("softmax", heads=4, kv_heads=2, causal=True)
    moa = SoftMixtureOfAttention.from_attentions([a, b], router=torch.randn(2, 32)).double()
    assert moa.attention.to_k.weight.shape == (2 * 8, 32)  # one set of K/V for both experts
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    shared = []
    for e in (a, b):
        e = copy.deepcopy(e)
        with torch.no_grad():
            e.to_k.weight.copy_((a.to_k.weight + b.to_k.weight) / 2)
            e.to_v.weight.copy_((a.to_v.weight + b.to_v.weight) / 2)
        shared.append(e(x))
    p = torch.softmax(x @ moa.router.weight.T, dim=-1)
    torch.testing.assert_close(moa(x), p[..., :1] * shared[0] + p[..., 1:] * shared[1])
    torch.testing.assert_close(moa.router_probs.double(), p)


def test_soft_mixture_trains_and_takes_per_head_masks():
    moa = SoftMixtureOfAttention(32, 4, experts=2, method="softmax", causal=True)
    x = torch.randn(2, 6, 32)
    mask = torch.ones(1, 4, 6, 6, dtype=torch.bool).tril()
    mask[:, 1] = False
    y = moa(x, mask=mask)
    y.sum().backward()
    assert moa.router.weight.grad is not None and moa.router.weight.grad.abs().sum() > 0
    _, w = moa(x, mask=mask, return_weights=True)
    assert bool((w[:, :, 1] == 0).all()) and bool((w[:, :, 0].sum(-1) - 1).abs().max() < 1e-5)


# ------------------------------------------------------------------------- EchoAtt


def test_echo_sharing_equals_the_shared_weights_applied_by_hand():
    torch.manual_seed(2)
    stack = randomize(EchoStack(32, 3, heads=4, kv_heads=2, share={2: 0}, method="softmax", causal=True,
                                mlp_mult=2), std=0.2).double()
    assert not hasattr(stack.blocks[2].attn, "to_q") and isinstance(stack.blocks[2].attn, SharedWeightsAttention)
    x = torch.randn(2, 8, 32, dtype=torch.float64)
    # by hand: layer 0's softmax weights, kept, and applied to layer 2's own values
    h, A0 = x, None
    for layer_idx, blk in enumerate(stack.blocks):
        n = blk.norm1(h)
        if layer_idx == 2:
            v = blk.attn.to_v(n).view(2, 8, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
            a = blk.attn.to_out((A0 @ v).transpose(1, 2).reshape(2, 8, 32))
        else:
            at = blk.attn
            q = at.to_q(n).view(2, 8, 4, 8).transpose(1, 2)
            k = at.to_k(n).view(2, 8, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
            v = at.to_v(n).view(2, 8, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
            A = torch.softmax(s.masked_fill(torch.ones(8, 8, dtype=torch.bool).triu(1), float("-inf")), dim=-1)
            if layer_idx == 0:
                A0 = A
            a = at.to_out((A @ v).transpose(1, 2).reshape(2, 8, 32))
        h = h + a
        h = h + blk.mlp(blk.norm2(h))
    torch.testing.assert_close(stack(x), h)
    torch.testing.assert_close(stack.weights[0], A0)


def test_echo_share_chains_and_checks():
    stack = EchoStack(16, 4, heads=2, share={1: 0, 2: 1, 3: 1})
    assert stack.source == {1: 0, 2: 0, 3: 0} and stack.anchors == [0]
    with pytest.raises(az.AttentionInputError, match="earlier layer"):
        EchoStack(16, 3, heads=2, share={1: 2})
    plain = EchoStack(16, 4, heads=2)
    saved = sum(p.numel() for p in plain.parameters()) - sum(p.numel() for p in stack.parameters())
    assert saved == 3 * 2 * 16 * 16  # three layers without their query and key projections
    with pytest.raises(az.AttentionInputError, match="weights must have shape"):
        stack.blocks[1].attn(torch.randn(1, 5, 16), torch.rand(1, 2, 5, 4))


def test_attention_similarity():
    a = torch.softmax(torch.randn(2, 3, 5, 7), -1)
    b = torch.softmax(torch.randn(2, 3, 5, 7), -1)
    S = attention_similarity([a, b, a])
    assert S.shape == (3, 3)
    torch.testing.assert_close(S.diagonal(), torch.ones(3))
    torch.testing.assert_close(S[0, 2], torch.tensor(1.0))
    manual = sum(float(F.cosine_similarity(a[i, h, n], b[i, h, n], dim=0))
                 for i in range(2) for h in range(3) for n in range(5)) / 30
    assert float(S[0, 1]) == pytest.approx(manual, abs=1e-6) and float(S[1, 0]) == pytest.approx(manual, abs=1e-6)


# ---------------------------------------------------------------------------- GAAM


def gaam_by_loops(q, k, v, delta, xi, eps, causal, allowed=None):
    """GAAM written position by position: each row's mean and variance of its visible
    scores, the Gaussian density of each score, normalised over the visible keys."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    out = torch.zeros(B, H, Nq, v.shape[3], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // k.shape[1])
            for i in range(Nq):
                vis = [j for j in range(Nk) if (not causal or j <= i + Nk - Nq)
                       and (allowed is None or bool(allowed[b, h, i, j]))]
                if not vis:
                    continue
                s = {j: float(q[b, h, i] @ k[b, g, j]) / math.sqrt(D) for j in vis}
                mu = sum(s.values()) / len(s)
                var = sum((x - mu) ** 2 for x in s.values()) / len(s)
                e = {j: -(s[j] - mu - delta[h]) ** 2 / (2 * xi[h] * var + eps) for j in vis}  # log-densities
                top = max(e.values())
                w = {j: math.exp(e[j] - top) for j in vis}  # the densities up to one factor per row
                z = sum(w.values())
                for j in vis:
                    out[b, h, i] += w[j] / z * v[b, g, j]
    return out


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self", "causal_cross"])
def test_gaussian_matches_the_formula_by_loops(impl, pattern):
    g = torch.Generator().manual_seed(4)
    nq, nk = (4, 7) if pattern.endswith("cross") else (6, 6)
    q = torch.randn(2, 4, nq, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, nk, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, nk, 5, generator=g, dtype=torch.float64)
    delta, xi = [0.0, 0.7, -1.2, 2.0], [1.0, 0.3, 2.5, 6.0]
    causal = pattern.startswith("causal")
    mask = torch.rand(2, 4, nq, nk, generator=g) < 0.8
    mask[0, 1, 2] = False  # a row that sees nothing: zeros
    out = az.attention(q, k, v, method="gaussian", impl=impl, causal=causal, mask=mask, mean_offset=tuple(delta),
                       variance_scale=torch.tensor(xi, dtype=torch.float64), eps=1e-4,
                       **({"block_q": 2} if impl == "chunked" else {}))
    torch.testing.assert_close(out, gaam_by_loops(q, k, v, delta, xi, 1e-4, causal, mask))


def test_gaussian_with_large_offset_and_variance_is_softmax_of_standardised_scores():
    """δ, ξ → ∞ with δ/ξ = τ: w ∝ exp(τ (s − μ)/σ²) (the Gaussian's log-density is
    −(s − μ − δ)²/(2ξσ²): its part linear in s dominates)."""
    q, k, v = (torch.randn(1, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    mu, var = s.mean(-1, keepdim=True), s.var(-1, unbiased=False, keepdim=True)
    tau = 2.0
    expected = torch.softmax(tau * (s - mu) / var, dim=-1) @ v
    out = az.attention(q, k, v, method="gaussian", mean_offset=tau * 1e6, variance_scale=1e6, eps=1e-12)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["gaussian", "rcmha"])
def test_chunked_forms_never_hold_an_n_by_n_tensor(method):
    from helpers import LargestTensor

    N = 256  # O(N·block) and O(N·K) with K = 4 relative distances, both well under N²
    q, k, v = (torch.randn(1, 2, N, 16, requires_grad=True) for _ in range(3))
    options = {**az.get(method).sized_options(N), "block_q": 16}
    if method == "rcmha":
        options["max_distance"] = 4
    with LargestTensor() as probe:
        out = az.attention(q, k, v, method=method, impl="chunked", causal=True, **options)
        out.sum().backward()
    assert probe.largest < 2 * N * N / 4, probe.largest


def test_gaussian_module_learns_its_offset_and_scale_through_the_chunked_path():
    mod = az.build("gaussian", heads=2, head_dim=8)
    q, k, v = (torch.randn(1, 2, 10, 8) for _ in range(3))
    mod(q, k, v, causal=True, impl="chunked").square().sum().backward()
    assert mod.mean_offset.grad.abs().min() > 0 and mod.log_variance_scale.grad.abs().min() > 0


# --------------------------------------------------------------------------- RCMHA


def rcmha_by_loops(q, k, v, wq, wk, wv, R, u, w, causal, key_mask=None):
    """RCMHA written position by position: each q, k, v channel convolved tap by tap
    (centred kernel, past taps only when causal), then the Transformer-XL scores."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    K = (R.shape[-2] - 1) // 2

    def conv(x, wt):
        Bx, Hx, N, C = x.shape
        kk = wt.shape[-1]
        c = (kk - 1) // 2
        kern = wt[:, 0].expand(Hx * C, kk).reshape(Hx, C, kk)  # channel (h, ch): its own taps
        y = torch.zeros_like(x)
        for t in range(N):
            for tap in range(kk if not causal else c + 1):  # causal: the past and current taps only
                src = t + tap - c
                if 0 <= src < N:
                    y[:, :, t] += kern[:, :, tap] * x[:, :, src]
        return y

    if key_mask is not None:
        k = k * key_mask[:, None, :, None]
        v = v * key_mask[:, None, :, None]
    qc, kc, vc = conv(q, wq), conv(k, wk), conv(v, wv)
    out = torch.zeros(B, H, Nq, v.shape[3], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            Rh = R[h] if R.dim() == 3 else R
            for i in range(Nq):
                pos = i + Nk - Nq
                vis = [j for j in range(Nk) if (not causal or j <= pos) and (key_mask is None or key_mask[b, j])]
                s = []
                for j in vis:
                    d = max(-K, min(K, pos - j))
                    content = (qc[b, h, i] + u[h]) @ kc[b, g, j]
                    position = (qc[b, h, i] + w[h]) @ Rh[d + K]
                    s.append(float(content + position) / math.sqrt(D))
                if not s:
                    continue
                p = torch.softmax(torch.tensor(s, dtype=torch.float64), 0)
                for pj, j in zip(p, vis):
                    out[b, h, i] += pj * vc[b, g, j]
    return out


@pytest.mark.parametrize("impl", ["reference", "sdpa", "chunked"])
@pytest.mark.parametrize("pattern", ["noncausal_self", "causal_self", "noncausal_cross", "causal_cross"])
def test_rcmha_matches_the_formula_by_loops(impl, pattern):
    g = torch.Generator().manual_seed(5)
    nq, nk = (5, 8) if pattern.endswith("cross") else (7, 7)
    B, H, Hkv, D, Dv = 2, 4, 2, 6, 4
    q = torch.randn(B, H, nq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, nk, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, nk, Dv, generator=g, dtype=torch.float64)
    wq = torch.randn(H * D, 1, 3, generator=g, dtype=torch.float64)
    wk = torch.randn(Hkv * D, 1, 5, generator=g, dtype=torch.float64)
    wv = torch.randn(1, 1, 3, generator=g, dtype=torch.float64)  # one kernel shared by every channel
    R = torch.randn(H, 2 * 2 + 1, D, generator=g, dtype=torch.float64)  # distances clipped to [-2, 2]
    u, w = torch.randn(H, D, generator=g, dtype=torch.float64), torch.randn(H, D, generator=g, dtype=torch.float64)
    kpm = torch.ones(B, nk, dtype=torch.bool)
    kpm[1, -2:] = False
    causal = pattern.startswith("causal")
    out = az.attention(q, k, v, method="rcmha", impl=impl, causal=causal, key_mask=kpm, q_conv=wq, k_conv=wk,
                       v_conv=wv, rel_embed=R, content_bias=u, position_bias=w, cross=pattern.endswith("cross"),
                       **({"block_q": 2} if impl == "chunked" else {}))
    torch.testing.assert_close(out, rcmha_by_loops(q, k, v, wq, wk, wv, R, u, w, causal, kpm))


def test_rcmha_without_convolutions_or_positions_is_softmax():
    q, k, v = (torch.randn(2, 2, 11, 8) for _ in range(3))
    ident = torch.tensor([[[0.0, 1.0, 0.0]]])
    for impl in ("reference", "sdpa", "chunked"):
        out = az.attention(q, k, v, method="rcmha", impl=impl, causal=True, q_conv=ident, k_conv=ident)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6, rtol=1e-5)


def test_sinusoid_table_by_hand():
    from attnzoo.methods.mixtures.rcmha import sinusoid_table

    T = sinusoid_table(2, 5, dtype=torch.float64)
    assert T.shape == (5, 5)
    for d in range(-2, 3):
        f = [10000 ** (-2 * i / 5) for i in range(3)]
        expected = [math.sin(d * x) for x in f] + [math.cos(d * x) for x in f][:2]
        assert T[d + 2].tolist() == pytest.approx(expected)


def test_rcmha_rejects_bad_kernels_and_tables():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(az.AttentionInputError, match="q_conv"):
        az.attention(q, q, q, method="rcmha", q_conv=torch.randn(8, 1, 2))
    with pytest.raises(az.AttentionInputError, match="rel_embed"):
        az.attention(q, q, q, method="rcmha", rel_embed=torch.randn(4, 4))
    with pytest.raises(az.AttentionInputError, match="content_bias"):
        az.attention(q, q, q, method="rcmha", content_bias=torch.randn(3, 4))


def test_rcmha_layer_decodes_with_learned_kernels():
    attn = randomize(az.Attention(24, 2, method="rcmha", causal=True, kernel_size=5, max_distance=3)).double()
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    full = attn(x)
    cache = attn.init_cache(2)
    steps = [attn.step(x[:, :4], cache)] + [attn.step(x[:, t:t + 1], cache) for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), full)


# ------------------------------------------------------------------- the bench hook


def test_use_moh_swaps_every_attention_of_a_task_model():
    from attnzoo.bench.tasks.heads import use_moh
    from attnzoo.bench.tasks.model import SelfAttentionLM

    torch.manual_seed(0)
    model = SelfAttentionLM(16, 12, 16, method="softmax", causal=True, dim=32, heads=4, layers=2, rotary=True)
    tokens = torch.randint(0, 16, (2, 12))
    before = model(tokens)
    use_moh(model, shared_heads=0, top_k=4, weighting="ones")
    assert all(isinstance(b.attn, MoHAttention) for b in model.blocks)
    torch.testing.assert_close(model(tokens), before)


@pytest.mark.slow
def test_moh_task_run_reports_the_heads_it_used():
    from attnzoo.bench.tasks.heads import quick_case, run_moh_task
    from attnzoo.bench.tasks import suite

    case = quick_case("copy", heads=4, steps=3, eval_examples=16, seq_len=16)
    result = run_moh_task(case, shared_heads=1, top_k=1)
    assert result["heads_used"] == 0.5 and 0 <= result["accuracy"] <= 1
    assert suite.build_model.__name__ == "build_model"  # the hook is undone
