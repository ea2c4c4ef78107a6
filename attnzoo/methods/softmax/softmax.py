"""Exact softmax attention (scaled dot-product attention).

    S = scale · Q Kᵀ  [-> softcap · tanh(S / softcap)]  [+ ALiBi]  [+ the caller's score_mod]
    P = softmax(S) over the visible keys   (a row with nothing visible gives P = 0)
    O = dropout(P) V

"Attention Is All You Need" (Vaswani et al., 2017). Score modifiers: ALiBi ("Train
Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation") and
tanh soft-capping (Gemma 2), both score_mods (:mod:`attnzoo.kernels.score_mods`)
evaluated by every path. Time O(N² D); memory O(N²) for the reference, O(N · block)
for ``tiled``.

Implementations:

* ``reference`` — explicit N×N matrices, float32 (or float64) inside; can return the weights.
* ``sdpa`` — ``torch.nn.functional.scaled_dot_product_attention``; masks and additive
  biases (ALiBi, float masks) go in as one ``attn_mask``, kept in float32.
* ``tiled`` — FlashAttention's online softmax in PyTorch (:mod:`attnzoo.kernels.tiled`):
  no N×N tensor in the forward or the backward pass; mask_mods and score_mods per tile.
* ``flex`` — FlexAttention (compiled), for inference on CPU and anything on CUDA.

Decoding keeps a KV cache; ``impl="split_k"`` decodes with exact split-K
(flash-decoding), ``"kv"`` with one call over the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ...errors import AttentionInputError
from ...kernels import score_mods
from ...kernels.caches import KVCacheDecoder
from ...kernels.common import compute_dtype
from ...kernels.dense import softmax_attention
from ...kernels.flex import flex_attention, flex_unsupported
from ...kernels.sdpa import SDPA_FUDGE, sdpa_attention
from ...kernels.splitk import split_k_attention
from ...kernels.tiled import tiled_softmax_attention
from ...registry import MethodOptions, method


@dataclass(frozen=True)
class SoftmaxOptions(MethodOptions):
    """Options of ``softmax``.

    Attributes:
        alibi: ALiBi biases: True for the paper's slopes, or one slope per query head (a
            tuple/list, or a tensor, learnable through ``reference`` and ``sdpa``).
        softcap: tanh soft-capping value (None = off).
        block_q, block_k: tile sizes of ``tiled`` (default: key blocks of 256 and as many
            query rows as keep one tile at 2 MiB).
        num_splits: key chunks of split-K decoding (default one per 256 cached keys).
    """

    alibi: Union[bool, tuple, torch.Tensor] = False
    softcap: Optional[float] = None
    block_q: Optional[int] = None
    block_k: Optional[int] = None
    num_splits: Optional[int] = None

    def validate(self) -> None:
        if self.softcap is not None:
            score_mods.softcap(self.softcap)  # raises on a non-positive or infinite cap
        for name in ("block_q", "block_k", "num_splits"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AttentionInputError(f"option {name} must be a positive int (or None), got {value!r}")


def method_score_mod(call):
    """Soft-capping, then ALiBi, then the caller's score_mod, as one score_mod (or None)."""
    return score_mod_of(call.options, call.q_heads, call.q_len, call.kv_len, call.device, call.dtype, call.score_mod)


def score_mod_of(o, heads: int, q_len: int, kv_len: int, device, dtype, extra=None):
    """The score_mod of options ``o`` for ``q_len`` queries over ``kv_len`` keys (lower-right
    aligned), composed with ``extra``."""
    if o.softcap is None and o.alibi is False and extra is None:
        return None  # the common case, kept cheap: it is on every call's path
    cap = score_mods.softcap(o.softcap) if o.softcap is not None else None
    slopes = score_mods.resolve_alibi(o.alibi, heads, device, compute_dtype(dtype))
    bias = score_mods.alibi(slopes, q_len, kv_len) if slopes is not None else None
    return score_mods.compose(cap, bias, extra)


@method("softmax", options=SoftmaxOptions, paper="Attention Is All You Need",
        summary="exact scaled dot-product attention (SDPA, FlashAttention-style tiled, FlexAttention)",
        exact=True, time="O(N^2 D)", memory="O(N·block) tiled, O(N^2) reference", dropout=True, score_mods=True,
        short_impl="sdpa")
def softmax(q, k, v, call):
    """Softmax attention with explicit N×N matrices (:func:`attnzoo.kernels.dense.softmax_attention`).

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    return softmax_attention(q, k, v, scale=call.scale, causal=call.causal, mask=call.mask, key_mask=call.key_mask,
                             score_mod=method_score_mod(call), dropout_p=call.dropout_p,
                             return_weights=call.return_weights)


# ------------------------------------------------------------------------------ sdpa



def _sdpa_supports(call) -> Optional[str]:
    if call.options.softcap is not None:
        return "SDPA has no tanh soft-capping (it takes additive biases only); use impl='tiled'"
    if not score_mods.is_additive(call.score_mod):
        return "SDPA takes additive score_mods (biases) only; use impl='tiled' or 'reference'"
    return None


@softmax.impl("sdpa", supports=_sdpa_supports, fudge=SDPA_FUDGE,
              description="torch scaled_dot_product_attention; masks and biases as one attn_mask")
def sdpa(q, k, v, call):
    """``scaled_dot_product_attention`` with causal, mask, key padding and biases combined."""
    o = call.options
    if (call.mask is None and call.key_mask is None and call.score_mod is None and o.alibi is False
            and (not call.causal or call.q_len == call.kv_len)):
        # SDPA's own call, nothing to combine (the common case: kept short, it is every call's path)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=call.dropout_p, is_causal=call.causal,
                                              scale=call.scale, enable_gqa=call.q_heads != call.kv_heads)
    return sdpa_attention(q, k, v, scale=call.scale, causal=call.causal, mask=call.mask, key_mask=call.key_mask,
                          score_mod=method_score_mod(call), dropout_p=call.dropout_p)


# ----------------------------------------------------------------------------- tiled


def _tiled_supports(call) -> Optional[str]:
    if call.dropout_p > 0:
        return "the tiled path has no dropout; use impl='sdpa' (or 'reference')"
    alibi = call.options.alibi
    if isinstance(alibi, torch.Tensor) and alibi.requires_grad:
        return "the tiled path has no gradient for learnable ALiBi slopes; use impl='sdpa' or 'reference'"
    return None


@softmax.impl("tiled", supports=_tiled_supports, options=("block_q", "block_k"),
              description="FlashAttention online softmax in blocks, O(N·block) memory, custom backward")
def tiled(q, k, v, call):
    """FlashAttention's blocked online softmax in PyTorch; O(N · block) memory, autograd works."""
    o = call.options
    return tiled_softmax_attention(q, k, v, scale=call.scale, causal=call.causal, mask=call.mask,
                                   key_mask=call.key_mask, score_mod=method_score_mod(call), block_q=o.block_q,
                                   block_k=o.block_k)


# ------------------------------------------------------------------------------ flex


@softmax.impl("flex", supports=flex_unsupported, description="compiled FlexAttention (CPU: inference only)")
def flex(q, k, v, call):
    """FlexAttention with the call's mask as a (cached) block mask and the score_mods natively."""
    return flex_attention(q, k, v, scale=call.scale, causal=call.causal, mask=call.mask, key_mask=call.key_mask,
                          score_mod=method_score_mod(call))


# -------------------------------------------------------------------------- decoding


@softmax.decodes
class SoftmaxDecoder(KVCacheDecoder):
    """A KV cache; each step attends the new queries over the whole cache.

    ``impl``: ``"kv"`` (the default: one call over the cache through the method's own
    forward, SDPA for plain softmax) or ``"split_k"`` (exact split-K decoding,
    LeanAttention / flash-decoding: the cached keys in chunks merged by their
    log-sum-exp; never faster than ``"kv"`` on the CPU)."""

    impls = ("kv", "split_k")
    options = ("num_splits",)

    def step(self, run, cache, q, k, v, *, scale, impl, options):
        cache.append(k, v)
        keys, values = cache.keys, cache.values
        T, L = q.shape[2], cache.length
        if impl == "auto":
            # one call over the cache: split-K (a PyTorch composition here, not a fused
            # kernel) was measured slower at every cache length on the CPU (`attnzoo bench
            # goals`: 10-15x from 256 to 65,536 keys), and SDPA's own kernels decode one
            # query well on CUDA; it stays available by name
            impl = "kv"
        if impl == "kv":
            # one query sees every cached key: no causal mask to build
            return run(q, keys, values, causal=T > 1, scale=scale, options=options)
        return split_k_attention(q, keys, values, scale=scale, causal=T > 1, num_splits=options.num_splits,
                                 score_mod=score_mod_of(options, q.shape[1], T, L, q.device, q.dtype))
