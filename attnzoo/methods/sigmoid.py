"""Sigmoid attention.

    O_i = sum_j  sigmoid(scale * q_i·k_j + b_i) v_j        (masked pairs contribute 0)

"Theory, Analysis, and Best Practices for Sigmoid Self-Attention" (Ramapuram
et al., 2024). There is no row normalisation: each weight is an independent
sigmoid, so any mask simply zeroes terms and a query with nothing visible gets 0.
The paper's key practice is the bias ``b = -log(n)``, which keeps the total
attention mass of a row near 1 at initialisation (``n · sigmoid(-log n) ≈ 1``);
its other practices (LayerScale, QK-norm, ALiBi/RoPE) live in the layer
(``Attention(qk_norm=True, rotary=True)``).

[J] ``n`` is the number of keys the query can see under the causal structure:
``Nk`` for noncausal rows and ``i + Nk - Nq + 1`` for causal ones. For full
sequences this is the paper's ``-log(n)``; for causal rows it keeps every row's
mass near 1 and makes token-by-token decoding equal the causal forward pass
without knowing the final length. Pass ``bias=<float>`` for a fixed bias.

Time O(N² D); memory O(N²) for the reference, O(N · block) for ``chunked``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..decoding import KVCache
from ..errors import AttentionInputError
from ..registry import Impl, MethodSpec, register
from ._common import chunked_rows, compute_dtype, group_mask, make_masker, repeat_kv, visible_counts


def _bias(bias, causal, q_len, kv_len, device, qs=0, qe=None, dtype=torch.float32):
    if bias is not None:
        if isinstance(bias, torch.Tensor) and bias.requires_grad:
            raise AttentionInputError("bias must be a number (a tensor that requires grad would be silently detached)")
        return float(bias)
    return -torch.log(visible_counts(causal, q_len, kv_len, device, qs, qe, dtype))


def reference(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
              return_weights=False, bias: Optional[float] = None):
    """Sigmoid attention with explicit N×N weights.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    ``bias``: fixed logit bias; None (default) for ``-log(n)``, n = visible keys.
    """
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    ct = compute_dtype(q.dtype)
    k, v = repeat_kv(k, Hq).to(ct), repeat_kv(v, Hq).to(ct)
    s = (q.to(ct) @ k.transpose(-1, -2)) * scale + _bias(bias, causal, Nq, Nk, q.device, dtype=ct)
    w = torch.sigmoid(s)
    allowed = make_masker(q, k, causal, mask, key_padding_mask).full()
    if allowed is not None:
        w = w.masked_fill(~allowed, 0.0)
    out = (w @ v).to(q.dtype)
    return (out, w.to(q.dtype)) if return_weights else out


def chunked_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                      return_weights=False, bias: Optional[float] = None, block_q: Optional[int] = None):
    """Query rows in chunks, recomputed in the backward: O(N · block) memory, autograd works,
    keys past the causal frontier never touched. GQA without copying K/V."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    ct = compute_dtype(q.dtype)
    masker = make_masker(q, k, causal, mask, key_padding_mask)

    def rows(qb, kb, vb, qs, qe):
        n, m = qe - qs, kb.shape[2]
        s = (qb.to(ct).view(B, Hkv, G, n, D) @ kb.to(ct).unsqueeze(2).transpose(-1, -2)) * scale
        b = _bias(bias, causal, Nq, Nk, q.device, qs, qe, ct)
        w = torch.sigmoid(s + b)
        allowed = masker.block(qs, qe, 0, m)
        if allowed is not None:
            w = w.masked_fill(~group_mask(allowed, Hkv, G), 0.0)
        return (w @ vb.to(ct).unsqueeze(2)).reshape(B, Hq, n, -1).to(q.dtype)

    return chunked_rows(rows, q, k, v, masker, block_q)


def init_state(batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None, bias=None,
               block_q=None):
    return KVCache(batch_size, kv_heads, head_dim, v_dim, dtype=dtype, device=device, capacity=max_len)


def step(cache: KVCache, q, k, v, *, scale, impl="auto", bias=None, block_q=None):
    """Append to the KV cache; the new queries see the whole cache (causal, lower-right)."""
    cache.append(k, v)
    return chunked_attention(q, cache.keys, cache.values, causal=True, scale=scale, bias=bias)


register(
    MethodSpec(
        name="sigmoid",
        family="softmax-variant",
        summary="elementwise sigmoid instead of softmax, bias -log(n)",
        paper="Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
        reference=reference,
        impls=[Impl("chunked", chunked_attention, mask_mod=True,
                    description="query-row chunks recomputed in the backward, O(N·block) memory")],
        exact=False,
        time="O(N^2 D)",
        memory="O(N·block) chunked, O(N^2) reference",
        decoding=True,
        state_size="KV cache: 2·Hkv·N·D per sequence",
        init_state=init_state,
        step=step,
    )
)
