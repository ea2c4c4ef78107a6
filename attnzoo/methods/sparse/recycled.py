"""Recycled Attention: decoding that alternates full attention with attention over the
keys the last full step attended to most.

    full step (every ``stride``-th):  o_t = softmax(q_t Kᵀ) V over the whole cache;
                                      R   = top-``topk`` keys of that step, per head
    other steps:                      o_t = softmax over R ∪ {keys appended since the full step}

"Recycled Attention: Efficient Inference for Long-Context Language Models" (Xu et al.,
2024). The full forward (prefill, any pattern) is exact softmax attention — the
reference is dense softmax (:func:`attnzoo.kernels.dense.softmax_attention`) and the
fast form is SDPA. Decoding is where the method differs, and by design it does not
equal the causal forward except at full steps, so the spec does not claim the generic
decoding contract (no ``decoder``); the decoder is :class:`RecycledDecoder`
(``init_state`` / ``step``), tested on its own. A recycled step costs
O((topk + stride)·D) instead of O(L·D) for a cache of L keys.

Judgement calls:

* [J] ``exact=False`` in the spec although the forward is exactly softmax: the method
  (its decoding) is an approximation; the forward's exactness is still tested by the
  contract (fast vs reference) and in tests/test_seer_recycled.py against SDPA.
* [J] The recycled set is chosen per *query* head (GQA: gathered from the head's k/v
  head), by the attention weights of the full step's last query (for a chunked
  prefill of T > 1 tokens, the last token's row, as in the paper's prefill).
* [J] Step schedule: a chunk of T > 1 tokens (prefill) is always a full step; a step
  with no recycled set yet is full; otherwise step ``n`` after the last full step is
  full when ``n == stride`` (so with stride 4: full, r, r, r, full, ...).
* [J] The local window is the keys appended *after* the last full step; the full
  step's own key is a candidate of its top-k (it was visible to it). The two sets are
  disjoint, so nothing is counted twice. ``topk >= L`` keeps every key: exact.
  Ties in the top-k go to the lower position.
* [J] ``stats.report("density", attended / cache length)`` on every decoding step
  (1.0 on full steps).
"""

from __future__ import annotations

import torch

from ... import stats
from ...errors import AttentionInputError
from ...kernels.caches import KVCache
from ...kernels.common import compute_dtype, repeat_kv
from ...kernels.dense import masked_softmax, softmax_attention
from ...kernels.sdpa import SDPA_FUDGE, sdpa_attention
from ...registry import method



@method("recycled",
        summary="prefill is exact softmax; decoding alternates full steps with the top-k keys they attended to",
        paper="Recycled Attention: Efficient Inference for Long-Context Language Models",
        time="O(N^2 D) prefill; O((topk + stride) D) per recycled decoding step",
        memory="O(N^2) reference, SDPA's for sdpa; KV cache + topk indices when decoding")
def recycled(q, k, v, call):
    """The full forward: exact softmax attention with explicit N×N matrices.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    return softmax_attention(q, k, v, scale=call.scale, causal=call.causal, mask=call.mask, key_mask=call.key_mask,
                             dropout_p=call.dropout_p, return_weights=call.return_weights)


@recycled.impl("sdpa", fudge=SDPA_FUDGE, description="the exact forward via torch scaled_dot_product_attention")
def sdpa(q, k, v, call):
    """The full forward through ``scaled_dot_product_attention``."""
    return sdpa_attention(q, k, v, scale=call.scale, causal=call.causal, mask=call.mask, key_mask=call.key_mask,
                          dropout_p=call.dropout_p)


# -------------------------------------------------------------------------- decoding


class RecycledState:
    """The KV cache plus the recycled key set ``idx (B, Hq, K)`` (positions in the cache),
    ``full_len`` (cache length right after the last full step) and the steps since it."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.idx = None
        self.full_len = 0
        self.since_full = 0
        self.last_was_full = False


class RecycledDecoder:
    """Recycled-attention decoding with ``stride`` (full step every ``stride`` steps)
    and ``topk`` recycled keys per head.

        dec = RecycledDecoder(stride=4, topk=256)
        state = dec.init_state(B, Hkv, D, Dv)
        out = dec.step(state, q, k, v)      # q (B, Hq, T, D), k/v (B, Hkv, T, D/Dv)
    """

    def __init__(self, stride: int = 4, topk: int = 256):
        if int(stride) < 1 or int(topk) < 1:
            raise AttentionInputError(f"stride and topk must be >= 1, got stride={stride}, topk={topk}")
        self.stride, self.topk = int(stride), int(topk)

    def init_state(self, batch_size, kv_heads, head_dim, v_dim=None, *, dtype=torch.float32, device=None,
                   max_len=None) -> RecycledState:
        return RecycledState(KVCache(batch_size, kv_heads, head_dim, v_dim or head_dim, dtype=dtype, device=device,
                                     capacity=max_len))

    def is_full_step(self, state: RecycledState, T: int) -> bool:
        return T > 1 or state.idx is None or state.since_full + 1 >= self.stride

    def step(self, state: RecycledState, q, k, v, *, scale=None) -> torch.Tensor:
        """Append ``k, v`` and attend the ``T`` new queries (see the module docstring)."""
        if q.shape[2] != k.shape[2]:
            raise AttentionInputError(f"step takes as many new queries as new keys, got {q.shape[2]} and {k.shape[2]}")
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        T = q.shape[2]
        full = self.is_full_step(state, T)
        cache = state.cache
        cache.append(k, v)
        keys, values, L = cache.keys, cache.values, cache.length
        if full:
            out = sdpa_attention(q, keys, values, scale=scale, causal=T > 1)
            ct = compute_dtype(q.dtype)
            # the last query's weights over the whole cache (it sees every key): O(L), never T x L
            s = (q[:, :, -1:].to(ct) @ repeat_kv(keys, q.shape[1]).to(ct).transpose(-1, -2)).squeeze(2) * scale
            last = torch.softmax(s, dim=-1)  # (B, Hq, L)
            K = min(self.topk, L)
            # ties go to the lower position: stable sort, descending
            state.idx = torch.sort(last, dim=-1, descending=True, stable=True).indices[..., :K]
            state.full_len, state.since_full, state.last_was_full = L, 0, True
            if stats.active():
                stats.report("density", 1.0)
            return out
        state.since_full += 1
        state.last_was_full = False
        B, Hq = q.shape[:2]
        Hkv = keys.shape[1]
        G = Hq // Hkv
        idx = state.idx  # (B, Hq, K)
        kv_head = (torch.arange(Hq, device=q.device) // G).view(1, Hq, 1)
        bi = torch.arange(B, device=q.device).view(B, 1, 1)
        kr, vr = keys[bi, kv_head, idx], values[bi, kv_head, idx]  # (B, Hq, K, D)
        recent_k = repeat_kv(keys[:, :, state.full_len:L], Hq)
        recent_v = repeat_kv(values[:, :, state.full_len:L], Hq)
        ks, vs = torch.cat([kr, recent_k], dim=2), torch.cat([vr, recent_v], dim=2)
        ct = compute_dtype(q.dtype)
        s = (q.to(ct).unsqueeze(3) @ ks.to(ct).unsqueeze(2).transpose(-1, -2)).squeeze(3) * scale  # (B, Hq, 1, M)
        p = masked_softmax(s, None)
        out = (p @ vs.to(ct)).to(q.dtype)
        if stats.active():
            stats.report("density", ks.shape[2] / L)
        return out

    def attended(self, state: RecycledState) -> torch.Tensor:
        """Bool ``(B, Hq, L)``: the keys the next non-full step attends to besides its own
        new key (the recycled set and the keys appended since the last full step)."""
        B, Hq, _ = state.idx.shape
        L = state.cache.length
        m = torch.zeros(B, Hq, L, dtype=torch.bool, device=state.idx.device)
        m.scatter_(-1, state.idx, True)
        m[..., state.full_len:] = True
        return m
