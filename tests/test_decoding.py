"""KV cache and split-K decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo import decoding
from attnzoo.decoding import KVCache, merge_partials, split_k_attention


@pytest.mark.parametrize("L,splits", [(1, 1), (7, 3), (1000, 7), (1024, 4), (4097, 16)])
@pytest.mark.parametrize("groups", [1, 4])
def test_split_k_equals_sdpa(L, splits, groups):
    q = torch.randn(2, 2 * groups, 1, 32, dtype=torch.float64)
    k, v = torch.randn(2, 2, L, 32, dtype=torch.float64), torch.randn(2, 2, L, 24, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=groups > 1)
    torch.testing.assert_close(split_k_attention(q, k, v, scale=32**-0.5, num_splits=splits), expected)


def test_merge_partials_is_exact_and_handles_empty_chunks():
    s = torch.randn(3, 10, dtype=torch.float64)
    v = torch.randn(10, 4, dtype=torch.float64)
    expected = torch.softmax(s, -1) @ v
    outs, lses = [], []
    for lo, hi in ((0, 4), (4, 4), (4, 10)):  # the middle chunk is empty
        if hi > lo:
            outs.append(torch.softmax(s[:, lo:hi], -1) @ v[lo:hi])
            lses.append(torch.logsumexp(s[:, lo:hi], -1))
        else:
            outs.append(torch.zeros(3, 4, dtype=torch.float64))
            lses.append(torch.full((3,), float("-inf"), dtype=torch.float64))
    merged = merge_partials(torch.stack(outs, 1), torch.stack(lses, 1), dim=1)
    torch.testing.assert_close(merged, expected)


@pytest.mark.parametrize("impl", ["kv", "split_k", "auto"])
@pytest.mark.parametrize("options", [{}, {"alibi": True}, {"softcap": 3.0}])
def test_softmax_step_impls_equal_causal_forward(impl, options):
    import attnzoo as az

    B, H, N, D = 1, 4, 70, 16
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    full = az.attention(q, k, v, causal=True, impl="reference", **options)
    state = decoding.init_state("softmax", B, H, D, D, dtype=torch.float64, **options)
    outs = [decoding.step("softmax", state, q[:, :, :10], k[:, :, :10], v[:, :, :10], impl=impl, num_splits=3,
                          **options)]
    outs += [decoding.step("softmax", state, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], impl=impl,
                           num_splits=3, **options) for t in range(10, N)]
    torch.testing.assert_close(torch.cat(outs, 2), full)


def test_kv_cache_grows_by_doubling_and_keeps_contents():
    cache = KVCache(1, 2, 4, 4, capacity=3)
    ks = [torch.randn(1, 2, 2, 4) for _ in range(5)]
    for k in ks:
        cache.append(k, k)
    assert cache.length == 10 and cache.capacity >= 10
    torch.testing.assert_close(cache.keys, torch.cat(ks, 2))
    assert cache.nbytes() == 2 * cache.capacity * 2 * 4 * 4
