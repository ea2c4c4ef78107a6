"""Cascaded group attention (EfficientViT): the heads run in sequence, each fed the one before.

    head 0:      O_0 = softmax(scale · q_0 k_0ᵀ) v_0
    head j > 0:  q'_j = q_j + O_{j-1} F^q_j,   k'_j = k_j + O_{j-1} F^k_j,   v'_j = v_j + O_{j-1} F^v_j
                 O_j = softmax(scale · q'_j k'_jᵀ) v'_j
    O = [O_0, ..., O_{H-1}]                                          (masks, causality: per head)

"EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention" (Liu
et al., CVPR 2023). Attention maps of different heads are highly similar, so cascaded
group attention (CGA) feeds each head a different split of the full feature — head j
sees ``X_j``, the j-th channel split of the input — and, to grow the network's depth
and capacity, adds the previous head's output to it: ``X'_j = X_j + Õ_{j-1}``, whose
projections give head j's q, k and v. Each head's projections act on C/h channels
instead of C, which saves computation and memory.

Learnable method or layer? A **learnable method**: the splits are the layer's
business (project each split with its own per-head projection: the heads of q, k, v
given here are those projections), and what the cascade adds to them is linear in the
previous head's output: ``X'_j W^Q_j = X_j W^Q_j + Õ_{j-1} W^Q_j``, so the cascade on
given (q, k, v) is exactly the feed maps ``F^q_j = W^Q_j`` restricted to the fed
output (and ``F^k``, ``F^v`` likewise). Here they are free parameters
(``feed_q``, ``feed_k``, ``feed_v``; :class:`CascadedGroupAttention` learns them), which
contains EfficientViT's tied ones; any layer (``attnzoo.Attention``) gets CGA by naming
the method.

Judgement calls:

* [J] Defaults without parameters: no feed into q and k (their identity maps would
  need D = Dv), the identity into v: ``v'_j = v_j + O_{j-1}`` (EfficientViT's
  ``X_j + Õ_{j-1}`` seen through an identity value projection). The module starts
  from that (``F^q = F^k = 0``, ``F^v = I``) and learns all three.
* [J] EfficientViT's depth-wise convolution on the queries (token interaction) and
  its small key dimension are the layer's projections, not the attention's maths.
* [J] Every head sees the call's mask (a bool mask's head axis is the heads'),
  the key padding and causality. GQA: query head j starts from its k/v head, then is
  fed on its own.
* [J] Self-attention only: the previous head's output has one row per query and is
  added to the next head's keys and values, which needs the queries and keys to be
  the same positions. Causal self-attention is strictly causal (head j's row t reads
  rows <= t of head j-1), and decodes with a KV cache of every query head's fed keys
  and values.

Complexity: time O(H·N²·D) (H softmax attentions in sequence, plus O(H·N·Dv·D) for the
feeds); memory O(N²) for the reference, SDPA's for ``sdpa`` (O(N) without a mask).

Implementations:

* ``reference`` — the heads in a loop, each by dense softmax attention (explicit
  N × N), can return the per-head weights;
* ``sdpa`` — the heads in a loop, each by ``scaled_dot_product_attention``.
* decoding: a KV cache of the fed keys and values of every query head; the new
  tokens run the cascade head by head over it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...errors import AttentionInputError, fmt_shape
from ...kernels.caches import Decoder, KVCache
from ...kernels.common import compute_dtype
from ...kernels.dense import softmax_attention
from ...kernels.sdpa import sdpa_attention
from ...registry import MethodOptions, method

NAME = "cascaded_group"


@dataclass(frozen=True)
class CascadedOptions(MethodOptions):
    """Options of ``cascaded_group``.

    Attributes:
        feed_q: ``(Hq-1, Dv, D)``: ``feed_q[j]`` maps head j's output into head j+1's
            queries (``q_{j+1} += O_j @ feed_q[j]``); None: no feed.
        feed_k: ``(Hq-1, Dv, D)``: the same into the keys; None: no feed.
        feed_v: ``(Hq-1, Dv, Dv)``: the same into the values; None: the identity
            (``v_{j+1} += O_j``).
    """

    feed_q: Optional[torch.Tensor] = None
    feed_k: Optional[torch.Tensor] = None
    feed_v: Optional[torch.Tensor] = None


def _feeds(q, v, o):
    """The three feed maps, checked, in the compute dtype (None = no feed; feed_v None =
    the identity, returned as the string ``"identity"``)."""
    Hq, D, Dv = q.shape[1], q.shape[3], v.shape[3]
    ct = compute_dtype(q.dtype)
    out = []
    for name, t, shape in (("feed_q", o.feed_q, (Hq - 1, Dv, D)), ("feed_k", o.feed_k, (Hq - 1, Dv, D)),
                           ("feed_v", o.feed_v, (Hq - 1, Dv, Dv))):
        if t is None:
            out.append(None)
            continue
        if tuple(t.shape) != shape:
            raise AttentionInputError(f"{NAME}: {name} must have shape (Hq-1, Dv, {'D' if name != 'feed_v' else 'Dv'}) "
                                      f"= {fmt_shape(shape)}, got {fmt_shape(t)}")
        out.append(t.to(device=q.device, dtype=ct))
    if out[2] is None:
        out[2] = "identity"
    return out


def _check_self(q, k):
    if q.shape[2] != k.shape[2]:
        raise AttentionInputError(
            f"{NAME} is self-attention: q and k must have the same length, got q {fmt_shape(q)} and k {fmt_shape(k)} "
            "(each head's output is added to the next head's keys and values)")


def _head_mask(mask, j: int):
    """The call's mask for query head ``j`` alone (a one-head call sees head index 0)."""
    if mask is None or (isinstance(mask, torch.Tensor) and mask.shape[1] == 1):
        return mask
    if isinstance(mask, torch.Tensor):
        return mask[:, j:j + 1]

    def head_j(b, h, q_idx, kv_idx):
        return mask(b, h + j, q_idx, kv_idx)

    return head_j


def _fed(x, prev, feed):
    """``x + prev @ feed`` (``feed`` None: x; ``"identity"``: x + prev), in prev's dtype."""
    if prev is None or feed is None:
        return x
    if isinstance(feed, str):
        return x + prev
    return x + prev @ feed


def _heads(q, k, v, options, head_attention) -> list:
    """The heads in sequence: ``head_attention(qj, kj, vj, j)`` attends head j (its fed
    one-head q, k, v in the compute dtype) and returns ``(out, weights or None)``; the
    list of those pairs."""
    ct = compute_dtype(q.dtype)
    Hq, Hkv = q.shape[1], k.shape[1]
    G = Hq // Hkv
    f_q, f_k, f_v = _feeds(q, v, options)
    results, prev = [], None
    for j in range(Hq):
        g = j // G  # the k/v head of query head j
        fq = None if j == 0 or f_q is None else f_q[j - 1]
        fk = None if j == 0 or f_k is None else f_k[j - 1]
        fv = None if j == 0 else (f_v if isinstance(f_v, str) else f_v[j - 1])
        res = head_attention(_fed(q[:, j:j + 1].to(ct), prev, fq), _fed(k[:, g:g + 1].to(ct), prev, fk),
                             _fed(v[:, g:g + 1].to(ct), prev, fv), j)
        prev = res[0]
        results.append(res)
    return results


def _cascade(q, k, v, call, head_attention):
    _check_self(q, k)
    results = _heads(q, k, v, call.options, head_attention)
    out = torch.cat([r[0] for r in results], dim=1).to(q.dtype)
    if call.return_weights:
        return out, torch.cat([r[1] for r in results], dim=1).to(q.dtype)
    return out


# ------------------------------------------------------------------------ reference


@method(NAME, short_impl="sdpa", options=CascadedOptions,
        paper="EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention",
        summary="heads in sequence: each head's q, k, v are fed the previous head's output (EfficientViT CGA)",
        patterns=("noncausal_self", "causal_self"), time="O(H N² D)", memory="O(N^2) reference, SDPA's for sdpa")
def cascaded_group(q, k, v, call):
    """Cascaded group attention, each head by dense softmax attention (the definition).

    q: (B, Hq, N, D), k: (B, Hkv, N, D), v: (B, Hkv, N, Dv) -> (B, Hq, N, Dv); weights per head.
    """
    def head(qj, kj, vj, j):
        res = softmax_attention(qj, kj, vj, scale=call.scale, causal=call.causal, mask=_head_mask(call.mask, j),
                                key_mask=call.key_mask, return_weights=call.return_weights)
        return res if call.return_weights else (res, None)

    return _cascade(q, k, v, call, head)


@cascaded_group.impl("sdpa", description="the heads in sequence, each by scaled_dot_product_attention")
def sdpa(q, k, v, call):
    """Cascaded group attention, each head by SDPA."""
    one_key = call.kv_len == 1 and call.mask is None and call.key_mask is None

    def head(qj, kj, vj, j):
        if one_key:  # the one key's weight is exactly 1 (SDPA's backward would add rounding to dk = 0)
            return vj + 0 * (qj.sum() + kj.sum()), None
        return sdpa_attention(qj, kj, vj, scale=call.scale, causal=call.causal, mask=_head_mask(call.mask, j),
                              key_mask=call.key_mask), None

    return _cascade(q, k, v, call, head)


# -------------------------------------------------------------------------- decoding


class CascadedCache:
    """The fed keys and values of every query head (a :class:`KVCache` with Hq heads,
    made at the first step, when Hq is known)."""

    def __init__(self, batch_size, head_dim, v_dim, dtype, device, max_len):
        self.batch_size, self.head_dim, self.v_dim = batch_size, head_dim, v_dim
        self.dtype, self.device, self.max_len = dtype, device, max_len
        self.cache: Optional[KVCache] = None

    @property
    def length(self) -> int:
        return 0 if self.cache is None else self.cache.length

    def nbytes(self) -> int:
        return 0 if self.cache is None else self.cache.nbytes()


@cascaded_group.decodes
class CascadedDecoder(Decoder):
    """Causal decoding: the new tokens run the cascade head by head; head j's fed keys
    and values join its cache, and its new queries attend the cache causally."""

    state_size = "KV cache of the fed keys/values of every query head: 2·Hq·N·D per sequence"

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, options):
        return CascadedCache(batch_size, head_dim, v_dim, dtype, device, max_len)

    def step(self, run, state, q, k, v, *, scale, impl, options):
        B, Hq, _, D = q.shape
        if state.cache is None:
            state.cache = KVCache(B, Hq, D, v.shape[3], dtype=state.dtype, device=state.device,
                                  capacity=state.max_len)
        cache = state.cache
        if k.dtype != cache.k.dtype or k.shape[0] != B or D != cache.k.shape[3] or v.shape[3] != cache.v.shape[3]:
            raise AttentionInputError(f"new k {fmt_shape(k)} / v {fmt_shape(v)} do not match the cascade's cache "
                                      f"{fmt_shape(cache.k)} ({cache.k.dtype})")
        keys_new, values_new = [], []

        def head(qj, kj, vj, j):
            keys = torch.cat([cache.keys[:, j:j + 1].to(kj.dtype), kj], dim=2)
            values = torch.cat([cache.values[:, j:j + 1].to(vj.dtype), vj], dim=2)
            keys_new.append(kj)
            values_new.append(vj)
            return softmax_attention(qj, keys, values, scale=scale, causal=True), None

        out = torch.cat([r[0] for r in _heads(q, k, v, options, head)], dim=1).to(q.dtype)
        cache.append(torch.cat(keys_new, 1).to(cache.k.dtype), torch.cat(values_new, 1).to(cache.v.dtype))
        return out


# --------------------------------------------------------------------------- module


@cascaded_group.module_class
class CascadedGroupAttention(torch.nn.Module):
    """Cascaded group attention with learnable feed maps; call it like the functional form:
    ``module(q, k, v, causal=..., mask=...)``; ``init_state`` / ``step`` decode.

    Args:
        heads, kv_heads: query and key/value heads (``kv_heads`` defaults to ``heads``).
        head_dim: D. ``v_dim``: Dv (default D).

    Parameters: ``feed_q``, ``feed_k`` ``(heads-1, Dv, D)`` (zeros at first), ``feed_v``
    ``(heads-1, Dv, Dv)`` (the identity at first): the module starts as the functional default.
    """

    def __init__(self, heads: int, head_dim: int, kv_heads: Optional[int] = None, v_dim: Optional[int] = None,
                 impl: str = "auto"):
        super().__init__()
        kv_heads = kv_heads or heads
        v_dim = v_dim or head_dim
        self.heads, self.kv_heads, self.impl = heads, kv_heads, impl
        self.feed_q = torch.nn.Parameter(torch.zeros(heads - 1, v_dim, head_dim))
        self.feed_k = torch.nn.Parameter(torch.zeros(heads - 1, v_dim, head_dim))
        self.feed_v = torch.nn.Parameter(torch.eye(v_dim).repeat(heads - 1, 1, 1))

    def _feeds(self):
        return {"feed_q": self.feed_q, "feed_k": self.feed_k, "feed_v": self.feed_v}

    def forward(self, q, k, v, **kwargs):
        kwargs.setdefault("impl", self.impl)
        return cascaded_group(q, k, v, **self._feeds(), **kwargs)

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None):
        return cascaded_group.init_state(batch_size, kv_heads, head_dim, v_dim, dtype=dtype, device=device,
                                         max_len=max_len)

    def step(self, state, q, k, v, *, scale=None, impl="auto"):
        return cascaded_group.step(state, q, k, v, scale=scale, impl=impl, **self._feeds())

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}"
