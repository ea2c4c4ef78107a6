"""Drop-in use: SDPA's call with SDPA's meaning, MultiheadAttention's key padding, the
``attnzoo.use`` mode that routes SDPA calls inside any model, and the layer's checks at
construction."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import attnzoo as az

# --------------------------------------------------------------------- SDPA's call


def _sdpa_zero_rows(q, k, v, **kw):
    """SDPA, with the rows that can see nothing set to zeros (attnzoo's contract; SDPA
    gives NaN there)."""
    out = F.scaled_dot_product_attention(q, k, v, **kw)
    return torch.nan_to_num(out, nan=0.0)


@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    groups=st.integers(1, 3),
    q_len=st.integers(1, 40),
    kv_len=st.integers(1, 40),
    head_dim=st.sampled_from([8, 16]),
    is_causal=st.booleans(),
    mask_kind=st.sampled_from(["none", "bool", "float", "float_broadcast"]),
    scale=st.sampled_from([None, 0.2, 1.0]),
    impl=st.sampled_from(["auto", "reference", "sdpa", "tiled"]),
    seed=st.integers(0, 2**16),
)
def test_a_call_written_for_sdpa_runs_unchanged(batch, kv_heads, groups, q_len, kv_len, head_dim, is_causal, mask_kind,
                                                scale, impl, seed):
    """Property: ``attention(*args, **kwargs)`` with SDPA's own arguments (positional
    attn_mask, dropout_p, is_causal, scale, enable_gqa) equals SDPA on them — float masks,
    boolean masks, upper-left causal alignment for Nq != Nk and GQA included."""
    g = torch.Generator().manual_seed(seed)
    Hq = kv_heads * groups
    q = torch.randn(batch, Hq, q_len, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=g)
    attn_mask = None
    if mask_kind == "bool":
        attn_mask = torch.rand(batch, Hq, q_len, kv_len, generator=g) < 0.8
    elif mask_kind == "float":
        attn_mask = torch.randn(batch, Hq, q_len, kv_len, generator=g)
    elif mask_kind == "float_broadcast":
        attn_mask = torch.randn(q_len, kv_len, generator=g)
    if is_causal and attn_mask is not None:  # SDPA refuses both; spell the causal mask out for it
        upper_left = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
        mask_for_sdpa = (attn_mask & upper_left if attn_mask.dtype == torch.bool
                         else attn_mask.masked_fill(~upper_left, float("-inf")))
        expected = _sdpa_zero_rows(q, k, v, attn_mask=mask_for_sdpa, scale=scale, enable_gqa=groups > 1)
    else:
        expected = _sdpa_zero_rows(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                   enable_gqa=groups > 1)
    out = az.attention(q, k, v, attn_mask, 0.0, is_causal, scale, groups > 1, impl=impl)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_is_causal_is_upper_left_and_causal_lower_right():
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # upper-left: query i sees keys <= i
    torch.testing.assert_close(az.attention(q, k, v, is_causal=True), sdpa)
    lower_right = torch.ones(3, 7, dtype=torch.bool).tril(diagonal=4)
    torch.testing.assert_close(az.attention(q, k, v, causal=True),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=lower_right))
    with pytest.raises(az.AttentionInputError, match="disagree"):
        az.attention(q, k, v, is_causal=True, causal=True)
    with pytest.raises(az.AttentionInputError, match="upper-left.*takes no masks.*causal=True"):
        az.attention(q, k, v, is_causal=True, method="linear")
    # equal lengths: the two are the same, for every method with a causal form
    qs = torch.randn(1, 2, 7, 8)
    torch.testing.assert_close(az.attention(qs, k, v, is_causal=True, method="lightning"),
                               az.attention(qs, k, v, causal=True, method="lightning"))


def test_enable_gqa_false_refuses_grouped_heads_like_sdpa():
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=False)
    with pytest.raises(az.AttentionInputError, match="enable_gqa=False"):
        az.attention(q, k, v, enable_gqa=False)
    torch.testing.assert_close(az.attention(q, k, v, enable_gqa=True), az.attention(q, k, v))


def test_float_masks_reach_every_method_that_takes_a_score_mod():
    q, k, v = (torch.randn(2, 2, 9, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(9, 9, dtype=torch.float64)
    for spec in az.list_methods():
        if "noncausal_self" not in spec.patterns:
            continue
        opts = spec.sized_options(9)
        if spec.score_mods:
            a = az.attention(q, k, v, attn_mask=bias, method=spec.name, impl="reference", **opts)
            b = az.attention(q, k, v, score_mod=lambda s, b_, h, i, j: s + bias[i, j], method=spec.name,
                             impl="reference", **opts)
            torch.testing.assert_close(a, b)
            assert not torch.allclose(a, az.attention(q, k, v, method=spec.name, impl="reference", **opts))
        else:
            with pytest.raises(az.AttentionInputError, match="cannot take a float attn_mask"):
                az.attention(q, k, v, attn_mask=bias, method=spec.name, **opts)


# ----------------------------------------------------------------- key padding


def test_key_padding_mask_has_multihead_attentions_meaning():
    """True = padding, as in nn.MultiheadAttention: an all-False mask changes nothing, and
    a padded key gets no weight."""
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    none_padded = torch.zeros(2, 6, dtype=torch.bool)
    torch.testing.assert_close(az.attention(q, k, v, key_padding_mask=none_padded), az.attention(q, k, v))
    padded = none_padded.clone()
    padded[1, 4:] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=~padded[:, None, None, :])
    for method in ("softmax", "linear", "sliding_window"):
        a = az.attention(q, k, v, key_padding_mask=padded, method=method)
        b = az.attention(q, k, v, key_mask=~padded, method=method)  # the same, in the other convention
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(az.attention(q, k, v, key_padding_mask=padded), expected)
    with pytest.raises(az.AttentionInputError, match="not both"):
        az.attention(q, k, v, key_padding_mask=padded, key_mask=~padded)


def test_layer_equals_multihead_attention_with_its_key_padding_mask():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    layer = az.Attention(dim=32, heads=4, bias=True).eval()
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    with torch.no_grad():
        for lin, w, b in ((layer.to_q, wq, bq), (layer.to_k, wk, bk), (layer.to_v, wv, bv)):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        layer.to_out.weight.copy_(mha.out_proj.weight)
        layer.to_out.bias.copy_(mha.out_proj.bias)
    x = torch.randn(2, 7, 32)
    padded = torch.zeros(2, 7, dtype=torch.bool)
    padded[0, 5:] = True
    with torch.no_grad():
        expected, _ = mha(x, x, x, key_padding_mask=padded, need_weights=False)
        torch.testing.assert_close(layer(x, key_padding_mask=padded), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x, key_mask=~padded), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------- attnzoo.use


class NanoBlock(nn.Module):
    """nanoGPT's CausalSelfAttention, as written there: F.scaled_dot_product_attention(is_causal=True)."""

    def __init__(self, dim=32, heads=4, attn_mask=None):
        super().__init__()
        self.heads, self.attn_mask = heads, attn_mask
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        if self.attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def test_use_softmax_leaves_a_nanogpt_model_unchanged_and_routes_every_call():
    torch.manual_seed(0)
    model = nn.Sequential(NanoBlock(), NanoBlock()).eval()
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        plain = model(x)
        with az.use("softmax", impl="tiled") as mode:
            routed = model(x)
    assert mode.calls == 2
    torch.testing.assert_close(routed, plain, atol=1e-5, rtol=1e-5)


def test_use_sliding_window_equals_the_model_with_an_explicit_window_mask():
    torch.manual_seed(0)
    model = nn.Sequential(NanoBlock(), NanoBlock()).eval()
    T, w = 20, 8
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    band = (j <= i) & (j > i - w)
    explicit = nn.Sequential(NanoBlock(attn_mask=band), NanoBlock(attn_mask=band)).eval()
    explicit.load_state_dict(model.state_dict())
    x = torch.randn(2, T, 32)
    with torch.no_grad():
        with az.use("sliding_window", window=w):
            routed = model(x)
        expected = explicit(x)
        assert not torch.allclose(routed, model(x), atol=1e-3)  # the window really changed something
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=1e-5)


def test_use_routes_multihead_attention_and_refuses_need_weights():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad():
        expected, _ = mha(x, x, x, need_weights=False)
        with az.use("softmax", impl="reference") as mode:
            got, _ = mha(x, x, x, need_weights=False)
        assert mode.calls == 1
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        with az.use("linear"):
            other, _ = mha(x, x, x, need_weights=False)
        assert not torch.allclose(other, expected, atol=1e-3)
        with pytest.raises(az.AttentionInputError, match="need_weights=False"), az.use("linear"):
            mha(x, x, x)


def test_use_checks_its_options_at_once():
    with pytest.raises(az.AttentionInputError, match="Did you mean 'window'"):
        az.use("sliding_window", windw=8)
    with pytest.raises(az.UnknownMethod):
        az.use("slidng_window")


# ------------------------------------------------------------- layer construction


def test_layer_arguments_and_options_are_checked_at_construction():
    with pytest.raises(az.AttentionInputError, match="dim=130 is not divisible by heads=4.*dim_head"):
        az.Attention(dim=130, heads=4)
    assert az.Attention(dim=130, heads=4, dim_head=32).to_q.out_features == 128
    with pytest.raises(az.AttentionInputError, match="no option 'windw'.*Did you mean 'window'"):
        az.Attention(dim=32, heads=4, method="sliding_window", windw=8)
    with pytest.raises(az.AttentionInputError, match="option window=2.5 must be an int"):
        az.Attention(dim=32, heads=4, method="sliding_window", window=2.5)
    with pytest.raises(az.AttentionInputError, match="no constructor option 'num_clusterz'.*num_clusters"):
        az.Attention(dim=32, heads=4, method="routing", num_clusterz=3)
    with pytest.raises(az.AttentionInputError, match="dropout"):
        az.Attention(dim=32, heads=4, method="linear", dropout=0.1)
    with pytest.raises(az.UnsupportedPattern, match="no causal form"):
        az.Attention(dim=32, heads=4, method="agent", causal=True)


def test_a_causal_layer_warns_once_for_a_method_whose_key_choice_sees_later_tokens():
    from attnzoo.layers import attention as layers

    layers._WARNED.discard("routing")
    with pytest.warns(layers.CausalLeakWarning, match="routing.*allow_causal_leak=True"):
        az.Attention(dim=32, heads=4, method="routing", causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        az.Attention(dim=32, heads=4, method="routing", causal=True)  # once
        layers._WARNED.discard("routing")
        az.Attention(dim=32, heads=4, method="routing", causal=True, allow_causal_leak=True)
        az.Attention(dim=32, heads=4, method="softmax", causal=True)


def test_a_float_mask_row_of_minus_inf_gives_zeros_and_finite_gradients_in_every_path():
    q, k, v = (torch.randn(1, 2, 12, 8, requires_grad=True) for _ in range(3))
    bias = torch.zeros(12, 12)
    bias[3] = float("-inf")
    for spec in az.list_methods():
        if not spec.score_mods or "noncausal_self" not in spec.patterns:
            continue
        opts = spec.sized_options(12)
        for impl in spec.impl_names:
            info = spec.check(q, k, v, attn_mask=bias, **opts)
            if spec.why_not(spec.get_impl(impl), info) is not None:
                continue
            out = az.attention(q, k, v, attn_mask=bias, method=spec.name, impl=impl, **opts)
            assert torch.isfinite(out).all() and bool((out[:, :, 3] == 0).all()), (spec.name, impl)
            grads = torch.autograd.grad(out.sum(), (q, k, v))
            assert all(torch.isfinite(g).all() for g in grads), (spec.name, impl)
