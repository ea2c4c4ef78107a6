"""The Attention layer: self/cross, GQA/MQA, rotary, qk-norm, gate, decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo as az

METHODS = [s.name for s in az.list_methods()]


def layer_options(method: str, n: int = 21) -> dict:
    """The options the method's sizing hook gives at length ``n`` (for learnable methods,
    those their module's constructor takes)."""
    return az.get(method).sized_options(n, module=True)


def randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module


@pytest.mark.parametrize("method", [s.name for s in az.list_methods() if s.decoding])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_step_equals_forward(method, kv_heads):
    attn = randomize(az.Attention(dim=32, heads=4, kv_heads=kv_heads, method=method, causal=True, rotary=True,
                                  qk_norm=True, gate=True, **layer_options(method))).double()
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    full = attn(x)
    cache = attn.init_cache(batch_size=2)
    steps = [attn.step(x[:, :5], cache)] + [attn.step(x[:, t:t + 1], cache) for t in range(5, 21)]
    torch.testing.assert_close(torch.cat(steps, 1), full)


@pytest.mark.parametrize("method", [s.name for s in az.list_methods() if "noncausal_cross" in s.patterns])
def test_cross_attention_and_cross_decoding(method):
    attn = randomize(az.Attention(dim=32, heads=4, kv_heads=2, method=method, context_dim=24,
                                  **layer_options(method))).double()
    x, memory = torch.randn(2, 9, 32, dtype=torch.float64), torch.randn(2, 13, 24, dtype=torch.float64)
    kpm = torch.ones(2, 13, dtype=torch.bool)
    kpm[1, 10:] = False
    y = attn(x, context=memory, key_mask=kpm)
    assert y.shape == (2, 9, 32)
    if not az.get(method).rows_independent:  # its rows depend on all the queries together
        with pytest.raises(az.UnsupportedPattern, match="one query at a time"):
            attn.init_cache(2, context=memory, context_key_mask=kpm)
        return
    cache = attn.init_cache(2, context=memory, context_key_mask=kpm)
    torch.testing.assert_close(torch.cat([attn.step(x[:, t:t + 1], cache) for t in range(9)], 1), y)


def test_softmax_layer_equals_manual_multihead_attention():
    """Independent truth: projections + F.scaled_dot_product_attention written out by hand."""
    attn = randomize(az.Attention(dim=24, heads=3, method="softmax", causal=True))
    x = torch.randn(2, 10, 24)
    q = attn.to_q(x).view(2, 10, 3, 8).transpose(1, 2)
    k = attn.to_k(x).view(2, 10, 3, 8).transpose(1, 2)
    v = attn.to_v(x).view(2, 10, 3, 8).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 10, 24)
    torch.testing.assert_close(attn(x), attn.to_out(o), atol=1e-5, rtol=1e-5)


def test_rotary_makes_scores_relative():
    """RoPE: q_m · k_n depends on m - n only."""
    rope = az.RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    def score(m, n):
        return float((rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum())
    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_gate_can_switch_a_head_off():
    attn = az.Attention(dim=16, heads=2, gate=True)
    with torch.no_grad():
        attn.gate.weight.zero_()
        attn.gate.bias.copy_(torch.tensor([-1e4, 1e4]))  # head 0 off, head 1 fully on
        attn.to_out.weight.copy_(torch.eye(16))
    x = torch.randn(1, 6, 16)
    y = attn(x)
    assert torch.equal(y[..., :8], torch.zeros_like(y[..., :8]))
    assert y[..., 8:].abs().sum() > 0


def test_return_weights_and_training_dropout():
    attn = az.Attention(dim=16, heads=2, dropout=0.5)
    x = torch.randn(1, 6, 16)
    attn.eval()
    y, w = attn(x, return_weights=True)
    assert w.shape == (1, 2, 6, 6)
    torch.testing.assert_close(attn(x), y)
    attn.train()
    assert not torch.allclose(attn(x), y)


def test_learnable_method_parameters_are_in_the_layer():
    attn = az.Attention(dim=16, heads=2, method="selective", causal=True)
    names = [n for n, _ in attn.named_parameters()]
    assert any(n.startswith("attn.") for n in names)
    x = torch.randn(2, 7, 16)
    attn(x).sum().backward()
    assert attn.attn.query_weight.grad is not None and attn.attn.query_weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_layer_runs_and_trains(method):
    causal = "causal_self" in az.get(method).patterns
    attn = az.Attention(dim=32, heads=4, kv_heads=2, method=method, causal=causal,
                        **layer_options(method, 40)).bfloat16()
    x = torch.randn(2, 40, 32, dtype=torch.bfloat16, requires_grad=True)
    y = attn(x)
    assert y.dtype == torch.bfloat16
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad.float()).all()
