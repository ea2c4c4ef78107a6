"""Cross-modal fusion layers (CrossViT, Perceiver latents, FIT, FIBER, LXMERT): hand
computations with SDPA, the zero gate, which inputs reach which outputs, padding, and
the layers over several registered methods."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az
from attnzoo.layers import (CoAttentionLayer, CrossViTFusion, FIBERFusion, FITBlock, FusedBackboneLayer,
                            GatedCrossAttention, LatentCrossAttention)

torch.manual_seed(0)


def randomize(module, std=0.3):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def by_hand(attn, x, context, key_padding_mask=None):
    """An attnzoo.Attention layer computed from its own projections with SDPA."""
    B, N, _ = x.shape
    M, H, Dh = context.shape[1], attn.heads, attn.dim_head
    q = attn.to_q(x).view(B, N, H, Dh).transpose(1, 2)
    k = attn.to_k(context).view(B, M, H, Dh).transpose(1, 2)
    v = attn.to_v(context).view(B, M, H, Dh).transpose(1, 2)
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.to_out(o.transpose(1, 2).reshape(B, N, H * Dh))


#: methods the layers are run over: exact, linear, local, routed, learnable, HyperAttention
METHODS = ["softmax", "sigmoid", "linear", "sliding_window", "routing", "agent", "hyper"]


def opts(method, n=16):
    return az.get(method).sized_options(n, module=True)


# ----------------------------------------------------------------------- FIBER


@pytest.mark.parametrize("method", METHODS)
def test_a_zero_gate_returns_the_input_exactly(method):
    x, ctx = torch.randn(2, 9, 16), torch.randn(2, 13, 12)
    pad = torch.zeros(2, 13, dtype=torch.bool)
    pad[1, 10:] = True
    gated = randomize(GatedCrossAttention(16, 12, heads=2, method=method, **opts(method)))
    with torch.no_grad():
        gated.gate.zero_()
    assert torch.equal(gated(x, ctx, key_padding_mask=pad), x)
    two_way = randomize(FIBERFusion(16, 12, heads=2, method=method, **opts(method)))
    with torch.no_grad():
        two_way.a_from_b.gate.zero_()
        two_way.b_from_a.gate.zero_()
    a, b = two_way(x, ctx, b_padding_mask=pad)
    assert torch.equal(a, x) and torch.equal(b, ctx)
    # the gate still learns: its gradient is the cross-attention's contribution
    y = gated(x, ctx)
    (grad,) = torch.autograd.grad(y.sum(), gated.gate)
    assert float(grad.abs()) > 0


def test_a_new_gated_layer_starts_at_zero_and_a_wrapped_backbone_is_unchanged():
    backbone = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU())
    fused = FusedBackboneLayer(backbone, 16, 12, heads=2)
    assert float(fused.fusion.gate.detach()) == 0.0
    x, ctx = torch.randn(2, 9, 16), torch.randn(2, 13, 12)
    assert torch.equal(fused(x, context=ctx), backbone(x))
    assert torch.equal(fused(x), backbone(x))  # no context: the layer alone
    with torch.no_grad():
        fused.fusion.gate.fill_(0.7)
    assert not torch.allclose(fused(x, context=ctx), backbone(x))


def test_gated_cross_attention_by_hand():
    x, ctx = torch.randn(2, 9, 16), torch.randn(2, 13, 12)
    pad = torch.zeros(2, 13, dtype=torch.bool)
    pad[0, 7:] = True
    gated = randomize(GatedCrossAttention(16, 12, heads=4, gate_init=0.5))
    want = x + gated.gate * by_hand(gated.attn, gated.norm(x), ctx, pad)
    torch.testing.assert_close(gated(x, ctx, key_padding_mask=pad), want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- CrossViT


def test_crossvit_by_hand_and_only_the_cls_tokens_change():
    a, b = torch.randn(2, 1 + 6, 16), torch.randn(2, 1 + 10, 8)
    fusion = randomize(CrossViTFusion(16, 8, heads=2))
    a2, b2 = fusion(a, b)
    assert torch.equal(a2[:, 1:], a[:, 1:]) and torch.equal(b2[:, 1:], b[:, 1:])
    c = fusion.f_a(a[:, :1])
    x = fusion.norm_a(torch.cat([c, b[:, 1:]], 1))
    want = fusion.g_a(c + by_hand(fusion.cross_a, x[:, :1], x))
    torch.testing.assert_close(a2[:, :1], want, atol=1e-5, rtol=1e-5)


def test_crossvit_cls_reads_the_other_branchs_patches_not_its_cls():
    a, b = torch.randn(1, 5, 16), torch.randn(1, 9, 8)
    fusion = randomize(CrossViTFusion(16, 8, heads=2))
    a2, _ = fusion(a, b)
    b_cls = b.clone()
    b_cls[:, 0] += torch.randn(8)
    assert torch.equal(fusion(a, b_cls)[0], a2)  # a's CLS query sees b's patches only
    b_patch = b.clone()
    b_patch[:, 3] += torch.randn(8)
    assert not torch.allclose(fusion(a, b_patch)[0][:, 0], a2[:, 0])


# ------------------------------------------------------------------- Perceiver


def test_latents_are_permutation_invariant_in_the_inputs_and_ignore_padding():
    perceiver = randomize(LatentCrossAttention(16, 12, num_latents=4, heads=2, self_layers=2), std=0.2)
    x = torch.randn(2, 11, 12)
    z = perceiver(x)
    assert z.shape == (2, 4, 16)
    perm = torch.randperm(11)
    torch.testing.assert_close(perceiver(x[:, perm]), z, atol=1e-5, rtol=1e-5)  # no positions: a set
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[:, 8:] = True
    x2 = x.clone()
    x2[:, 8:] = torch.randn(2, 3, 12) * 10
    torch.testing.assert_close(perceiver(x2, key_padding_mask=pad), perceiver(x, key_padding_mask=pad))
    again = perceiver(x, latents=z)  # iterative attention with shared weights
    assert again.shape == z.shape and not torch.allclose(again, z)


def test_perceiver_cross_attention_by_hand():
    perceiver = randomize(LatentCrossAttention(16, 12, num_latents=3, cross_heads=1, self_layers=0, mlp_ratio=0))
    x = torch.randn(2, 7, 12)
    lat = perceiver.latents.expand(2, -1, -1)
    blk = perceiver.cross
    want = lat + by_hand(blk.attn, blk.norm(lat), blk.context_norm(x))
    torch.testing.assert_close(perceiver(x), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------- FIT


def test_fit_tokens_meet_other_groups_only_through_the_latents():
    fit = randomize(FITBlock(16, group_size=4, num_latents=2, heads=2), std=0.2)
    x = torch.randn(1, 12, 16)
    y, z = fit(x)
    assert y.shape == (1, 12, 16) and z.shape == (1, 3, 2, 16)
    x2 = x.clone()
    x2[:, 0] += torch.randn(16)  # a token of group 0 (not a constant shift: LayerNorm removes those)
    y2, _ = fit(x2)
    assert not torch.allclose(y2[:, 4:], y[:, 4:])  # the latents carry it to the other groups
    with torch.no_grad():  # cut the read: latents no longer depend on the tokens
        fit.read.attn.to_out.weight.zero_()
        fit.read.attn.to_out.bias.zero_()
    y, _ = fit(x)
    y2, _ = fit(x2)
    torch.testing.assert_close(y2[:, 4:], y[:, 4:])  # local attention stayed within group 0
    assert not torch.allclose(y2[:, :4], y[:, :4])


def test_fit_pads_a_ragged_last_group_and_masks_padding():
    fit = randomize(FITBlock(16, group_size=4, num_latents=2, heads=2, global_layers=2), std=0.2)
    x = torch.randn(2, 10, 16)
    y, z = fit(x)
    assert y.shape == (2, 10, 16) and z.shape == (2, 3, 2, 16) and torch.isfinite(y).all()
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[:, 7:] = True
    x2 = x.clone()
    x2[:, 7:] = 100.0
    torch.testing.assert_close(fit(x2, key_padding_mask=pad)[0][:, :7], fit(x, key_padding_mask=pad)[0][:, :7])
    y3, z3 = fit(x, latents=z)
    assert z3.shape == z.shape
    with pytest.raises(az.AttentionInputError, match="latents must have shape"):
        fit(x, latents=z[:, :2])


# ----------------------------------------------------------------------- LXMERT


def test_co_attention_by_hand():
    layer = randomize(CoAttentionLayer(16, heads=2), std=0.2)
    a, b = torch.randn(2, 5, 16), torch.randn(2, 8, 16)
    pad = torch.zeros(2, 8, dtype=torch.bool)
    pad[1, 6:] = True
    a3, b3 = layer(a, b, b_padding_mask=pad)
    ca = layer.cross_a
    a1 = ca.norm(a + by_hand(ca.attn, a, b, pad))
    b1 = ca.norm(b + by_hand(ca.attn, b, a))  # the same cross-attention, the other way
    a2 = layer.self_a.norm(a1 + by_hand(layer.self_a.attn, a1, a1))
    b2 = layer.self_b.norm(b1 + by_hand(layer.self_b.attn, b1, b1, pad))
    torch.testing.assert_close(a3, layer.ff_a.norm(a2 + layer.ff_a.ff(a2)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b3, layer.ff_b.norm(b2 + layer.ff_b.ff(b2)), atol=1e-5, rtol=1e-5)


def test_co_attention_is_bidirectional_shares_its_cross_attention_and_ignores_padding():
    layer = randomize(CoAttentionLayer(16, heads=2), std=0.2)
    assert layer.cross_a is layer.cross_b
    assert CoAttentionLayer(16, heads=2, share_cross=False).cross_b is not None
    separate = CoAttentionLayer(16, heads=2, share_cross=False)
    assert separate.cross_a is not separate.cross_b
    a, b = torch.randn(1, 5, 16), torch.randn(1, 8, 16)
    a3, b3 = layer(a, b)
    b2 = b.clone()
    b2[:, 2] += torch.randn(16)
    assert not torch.allclose(layer(a, b2)[0], a3)  # language reads vision
    a2 = a.clone()
    a2[:, 1] += torch.randn(16)
    assert not torch.allclose(layer(a2, b)[1], b3)  # vision reads language
    pad = torch.zeros(1, 8, dtype=torch.bool)
    pad[:, 6:] = True
    b4 = b.clone()
    b4[:, 6:] = 50.0
    torch.testing.assert_close(layer(a, b4, b_padding_mask=pad)[0], layer(a, b, b_padding_mask=pad)[0])


# ------------------------------------------------------------- any method


@pytest.mark.parametrize("method", METHODS)
def test_every_fusion_layer_runs_over_the_method_and_backpropagates(method):
    o = opts(method)
    a, b = torch.randn(2, 9, 16, requires_grad=True), torch.randn(2, 12, 16, requires_grad=True)
    layers = [CrossViTFusion(16, 16, heads=2, method=method, **o),
              LatentCrossAttention(16, num_latents=4, heads=2, method=method, **o),
              FITBlock(16, group_size=4, num_latents=2, heads=2, method=method, **o),
              FIBERFusion(16, 16, heads=2, gate_init=0.5, method=method, **o),
              CoAttentionLayer(16, heads=2, method=method, **o)]
    for layer in layers:
        out = layer(a, b) if not isinstance(layer, (LatentCrossAttention, FITBlock)) else layer(b)
        outs = out if isinstance(out, tuple) else (out,)
        assert all(torch.isfinite(t).all() for t in outs), (method, type(layer).__name__)
        grads = torch.autograd.grad(sum(t.sum() for t in outs), [p for p in layer.parameters()], allow_unused=True)
        assert any(g is not None and float(g.abs().sum()) > 0 for g in grads), (method, type(layer).__name__)


def test_bad_inputs_and_methods_without_cross_attention_raise():
    gated = GatedCrossAttention(16, 12, heads=2)
    with pytest.raises(az.AttentionInputError, match=r"context must have shape \(B, N, 12\)"):
        gated(torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    with pytest.raises(az.AttentionInputError, match="key_padding_mask"):
        gated(torch.randn(2, 3, 16), torch.randn(2, 4, 12), key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    no_cross = [s.name for s in az.list_methods() if "noncausal_cross" not in s.patterns]
    for name in no_cross[:1]:
        with pytest.raises(az.UnsupportedPattern, match="noncausal cross"):
            GatedCrossAttention(16, heads=2, method=name)
