"""Bad input raises AttentionInputError (a ValueError) naming the argument, the expected
and the actual — never a bare IndexError from deep inside."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az
from attnzoo import decoding

METHODS = [s.name for s in az.list_methods()]


def supported(method: str) -> dict:
    """Keyword arguments for a pattern the method supports (self-attention), with the
    options the method needs to run (e.g. block_sparse's layout)."""
    spec = az.get(method)
    return {"causal": "noncausal_self" not in spec.patterns, **spec.sized_options(5)}


def qkv(B=2, Hq=4, Hkv=2, Nq=5, Nk=5, D=8, Dv=8, dtype=torch.float32):
    return torch.randn(B, Hq, Nq, D, dtype=dtype), torch.randn(B, Hkv, Nk, D, dtype=dtype), torch.randn(B, Hkv, Nk, Dv, dtype=dtype)


@pytest.mark.parametrize("method", METHODS)
def test_wrong_rank(method):
    q, k, v = qkv()
    with pytest.raises(az.AttentionInputError, match=r"q must be 4-D \(B, Hq, Nq, D\), got 3-D tensor of shape \(4, 5, 8\)"):
        az.attention(q[0], k, v, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_heads_not_multiple(method):
    q, k, v = qkv(Hq=3, Hkv=2)
    with pytest.raises(az.AttentionInputError, match=r"multiple of k/v heads.*Hq=3.*Hkv=2"):
        az.attention(q, k, v, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_head_dim_mismatch(method):
    q, _, v = qkv()
    k = torch.randn(2, 2, 5, 7)
    with pytest.raises(az.AttentionInputError, match=r"same head dim D.*q \(2, 4, 5, 8\), k \(2, 2, 5, 7\)"):
        az.attention(q, k, v, method=method)


def test_kv_length_and_batch_mismatch():
    q, k, v = qkv()
    with pytest.raises(az.AttentionInputError, match=r"same length Nk"):
        az.attention(q, k, v[:, :, :3])
    with pytest.raises(az.AttentionInputError, match=r"batch sizes differ"):
        az.attention(q[:1], k, v)


@pytest.mark.parametrize("method", METHODS)
def test_dtype_mix(method):
    q, k, v = qkv()
    with pytest.raises(az.AttentionInputError, match=r"one dtype.*q: torch.float32, k: torch.bfloat16"):
        az.attention(q, k.bfloat16(), v, method=method)
    with pytest.raises(az.AttentionInputError, match="floating-point"):
        az.attention(q.long(), k.long(), v.long(), method=method)


@pytest.mark.parametrize("method", METHODS)
def test_mask_of_wrong_shape_or_dtype(method):
    q, k, v = qkv(Nq=6, Nk=6)
    kw = supported(method)
    nq = 6
    if az.get(method).query == "learned":  # one learned query, one output per key
        q, nq = q[:, :, :1], 1
    with pytest.raises(az.AttentionInputError, match=rf"mask of shape \(5, 5\) does not broadcast to \(B, Hq, Nq, Nk\) = \(2, 4, {nq}, 6\)"):
        az.attention(q, k, v, method=method, mask=torch.ones(5, 5, dtype=torch.bool), **kw)
    with pytest.raises(az.AttentionInputError, match="bool tensor.*int64"):
        az.attention(q, k, v, method=method, mask=torch.ones(nq, 6, dtype=torch.long), **kw)
    if not az.get(method).score_mods:  # a float mask is an additive bias, for the methods that take one
        with pytest.raises(az.AttentionInputError, match="cannot take a float attn_mask"):
            az.attention(q, k, v, method=method, attn_mask=torch.zeros(nq, 6), **kw)
    if not az.get(method).masks:
        with pytest.raises(az.AttentionInputError, match="does not take a mask.*key_padding_mask"):
            az.attention(q, k, v, method=method, mask=torch.ones(nq, 6, dtype=torch.bool), **kw)
    with pytest.raises(az.AttentionInputError, match=r"key_mask must have shape \(B, Nk\) = \(2, 6\), got \(2, 5\)"):
        az.attention(q, k, v, method=method, key_mask=torch.ones(2, 5, dtype=torch.bool), **kw)
    with pytest.raises(az.AttentionInputError, match=r"key_padding_mask must have shape \(B, Nk\) = \(2, 6\), got \(2, 5\)"):
        az.attention(q, k, v, method=method, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool), **kw)


@pytest.mark.parametrize("method", METHODS)
def test_empty_sequence(method):
    q, k, v = qkv(Nq=0)
    with pytest.raises(az.AttentionInputError, match=r"q is empty: shape \(2, 4, 0, 8\)"):
        az.attention(q, k, v, method=method)
    q, k, v = qkv(Nk=0)
    with pytest.raises(az.AttentionInputError, match=r"k is empty"):
        az.attention(q, k, v, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_nan_policy(method):
    q, k, v = qkv()
    if az.get(method).query == "learned":
        q = q[:, :, :1]
    k[0, 0, 1, 2] = float("nan")
    kw = supported(method)
    with pytest.raises(az.AttentionInputError, match=r"k contains NaN or Inf \(1 of 160 values\).*nan_policy"):
        az.attention(q, k, v, method=method, nan_policy="raise", **kw)
    with pytest.raises(az.AttentionInputError, match=r"k contains NaN or Inf"), az.detect_nan():
        az.attention(q, k, v, method=method, **kw)
    out = az.attention(q, k, v, method=method, **kw)  # the scan is opt-in: by default NaN propagates
    assert torch.isnan(out).any()
    with pytest.raises(az.AttentionInputError, match="nan_policy must be"):
        az.attention(q, k, v, method=method, nan_policy="ignore", **kw)


def test_misspelled_method_suggests_closest():
    q, k, v = qkv()
    with pytest.raises(az.UnknownMethod, match=r"method='sofmax' is not registered\. Did you mean 'softmax'"):
        az.attention(q, k, v, method="sofmax")
    with pytest.raises(ValueError):  # UnknownMethod is a ValueError (and a KeyError) too
        az.get("sigmoyd")


def test_misspelled_impl_and_option_suggest_closest():
    q, k, v = qkv()
    with pytest.raises(az.UnsupportedImpl, match=r"impl='tiles'.*Did you mean 'tiled'"):
        az.attention(q, k, v, impl="tiles")
    with pytest.raises(az.AttentionInputError, match=r"no option 'soft_cap'.*Did you mean 'softcap'"):
        az.attention(q, k, v, soft_cap=3.0)


def test_named_impl_never_falls_back():
    q, k, v = qkv()
    with pytest.raises(az.UnsupportedImpl, match=r"impl='flex'.*cannot serve.*inference only.*Implementations that can"):
        az.attention(q.requires_grad_(), k, v, impl="flex")


def test_dropout_and_option_values():
    q, k, v = qkv()
    with pytest.raises(az.AttentionInputError, match=r"dropout_p must be in \[0, 1\), got 1.5"):
        az.attention(q, k, v, dropout_p=1.5)
    with pytest.raises(az.AttentionInputError, match="does not support attention dropout"):
        az.attention(q, k, v, method="sigmoid", dropout_p=0.1)
    with pytest.raises(az.AttentionInputError, match="zeta >= 1 and gamma <= 0"):
        az.attention(q, k, v, method="clipped_softmax", gamma=0.5)
    with pytest.raises(az.AttentionInputError, match=r"query_temperature of shape \(3\) does not broadcast to \(2, 4, 5, 1\)"):
        az.attention(q, k, v, method="selective", query_temperature=torch.ones(3))


def test_learned_query_method_needs_one_query():
    q, k, v = qkv()
    with pytest.raises(az.AttentionInputError, match=r"one learned query per head: q must have shape \(B, Hq, 1, D\), got \(2, 4, 5, 8\)"):
        az.attention(q, k, v, method="aaren", causal=True)


def test_decoding_inputs():
    state = decoding.init_state("softmax", 1, 2, 8, 8)
    with pytest.raises(az.AttentionInputError, match="as many new queries as new keys"):
        decoding.step("softmax", state, torch.randn(1, 2, 2, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    with pytest.raises(az.AttentionInputError, match="do not match the cache"):
        decoding.step("softmax", state, torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8), torch.randn(1, 3, 1, 8))
    with pytest.raises(az.AttentionInputError, match="no option 'num_split'"):
        decoding.step("softmax", state, *qkv(B=1, Hq=2, Nq=1, Nk=1), num_split=2)


def test_layer_inputs():
    attn = az.Attention(dim=16, heads=2)
    with pytest.raises(az.AttentionInputError, match=r"x must have shape \(B, N, 16\), got \(2, 5, 8\)"):
        attn(torch.randn(2, 5, 8))
    with pytest.raises(az.AttentionInputError, match="multiple of kv_heads"):
        az.Attention(dim=16, heads=4, kv_heads=3)
    with pytest.raises(az.AttentionInputError, match="even head dim"):
        az.Attention(dim=15, heads=3, rotary=True)
    with pytest.raises(az.UnsupportedPattern, match="causal"):
        attn.init_cache(1)
