"""Clipped softmax.

    P = clip((ζ - γ) · softmax(S) + γ, 0, 1),      S = scale · Q Kᵀ (masked: P = 0)

"Quantizable Transformers: Removing Outliers by Helping Attention Heads Do
Nothing" (Bondarenko et al., NeurIPS 2023). With ``γ < 0`` small probabilities
are clipped to exactly 0 (and with ``ζ > 1`` large ones to exactly 1), so a head
can "do nothing" without pushing its logits to extreme values — the source of
activation outliers that break INT8 quantisation. The paper parametrises
``γ = -α / T`` with ``T`` the sequence length and uses ``ζ = 1``.

[J] ``T`` is the number of keys the query can see under the causal structure
(``Nk`` noncausal, ``i + Nk - Nq + 1`` causal), so decoding equals the causal
forward pass. Pass ``gamma=<float>`` for a fixed value. The paper's second
remedy, gated attention, is the layer option ``Attention(gate=True)``.

Time O(N² D); memory O(N²) for the reference, O(N · block) for ``chunked``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..decoding import KVCache
from ..errors import AttentionInputError
from ..registry import Impl, MethodSpec, register
from ._common import chunked_rows, compute_dtype, group_mask, make_masker, masked_softmax, repeat_kv, visible_counts


def _gamma(gamma, alpha, causal, q_len, kv_len, device, qs=0, qe=None, dtype=torch.float32):
    if gamma is not None:
        return float(gamma)
    return -float(alpha) / visible_counts(causal, q_len, kv_len, device, qs, qe, dtype)


def _check(zeta, gamma):
    for name, value in (("zeta", zeta), ("gamma", gamma)):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise AttentionInputError(f"{name} must be a number (a tensor that requires grad would be silently detached)")
    if zeta < 1.0 or (gamma is not None and gamma > 0.0):
        raise AttentionInputError(f"clipped softmax needs zeta >= 1 and gamma <= 0, got zeta={zeta}, gamma={gamma}")


def _clip(p, zeta, gamma, allowed):
    w = ((zeta - gamma) * p + gamma).clamp(0.0, 1.0)
    if allowed is not None:
        w = w.masked_fill(~allowed, 0.0)
    return w


def reference(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
              return_weights=False, zeta: float = 1.0, gamma: Optional[float] = None, alpha: float = 4.0):
    """Clipped softmax attention with explicit N×N weights.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    ``zeta`` (>= 1) stretches, ``gamma`` (<= 0) shifts before clipping to [0, 1];
    ``gamma=None`` uses ``-alpha / T``.
    """
    _check(zeta, gamma)
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    ct = compute_dtype(q.dtype)
    k, v = repeat_kv(k, Hq).to(ct), repeat_kv(v, Hq).to(ct)
    s = (q.to(ct) @ k.transpose(-1, -2)) * scale
    allowed = make_masker(q, k, causal, mask, key_padding_mask).full()
    p = masked_softmax(s, allowed)
    w = _clip(p, zeta, _gamma(gamma, alpha, causal, Nq, Nk, q.device, dtype=ct), allowed)
    out = (w @ v).to(q.dtype)
    return (out, w.to(q.dtype)) if return_weights else out


def chunked_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                      return_weights=False, zeta: float = 1.0, gamma: Optional[float] = None, alpha: float = 4.0,
                      block_q: Optional[int] = None):
    """Query rows in chunks recomputed in the backward (each chunk holds whole rows, so the softmax
    and the clip stay exact): O(N · block) memory, autograd works."""
    _check(zeta, gamma)
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    ct = compute_dtype(q.dtype)
    masker = make_masker(q, k, causal, mask, key_padding_mask)

    def rows(qb, kb, vb, qs, qe):
        n, m = qe - qs, kb.shape[2]
        s = (qb.to(ct).view(B, Hkv, G, n, D) @ kb.to(ct).unsqueeze(2).transpose(-1, -2)) * scale
        allowed = masker.block(qs, qe, 0, m)
        a = None if allowed is None else group_mask(allowed, Hkv, G)
        p = masked_softmax(s, a)
        w = _clip(p, zeta, _gamma(gamma, alpha, causal, Nq, Nk, q.device, qs, qe, ct), a)
        return (w @ vb.to(ct).unsqueeze(2)).reshape(B, Hq, n, -1).to(q.dtype)

    return chunked_rows(rows, q, k, v, masker, block_q)


def init_state(batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None, zeta=1.0,
               gamma=None, alpha=4.0, block_q=None):
    return KVCache(batch_size, kv_heads, head_dim, v_dim, dtype=dtype, device=device, capacity=max_len)


def step(cache: KVCache, q, k, v, *, scale, impl="auto", zeta=1.0, gamma=None, alpha=4.0, block_q=None):
    cache.append(k, v)
    return chunked_attention(q, cache.keys, cache.values, causal=True, scale=scale, zeta=zeta, gamma=gamma,
                             alpha=alpha)


register(
    MethodSpec(
        name="clipped_softmax",
        family="softmax-variant",
        summary="softmax stretched by (zeta, gamma) and clipped to [0, 1]: exact zeros for no-op heads",
        paper="Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing",
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
        test_options={"alpha": 8.0},
    )
)
