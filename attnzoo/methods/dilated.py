"""Dilated sliding-window attention, the dilation varying across heads (LongNet).

    head h, dilation r = r_h, aligned query position i' = i + Nk - Nq, d = i' - j:
    causal:    query i sees j = i' - r·t,  t = 0 .. w-1,  j >= 0      (d >= 0, d % r == 0, d // r < w)
    noncausal: query i sees j = i' ± r·t,  t = 0 .. w//2              (|d| % r == 0, |d| // r <= w // 2)
    O_i = sum_j softmax_j(scale · q_i·k_j) v_j  over the visible j     (masked pairs dropped)

Paper: "LongNet: Scaling Transformers to 1,000,000,000 Tokens" (Ding et al., 2023).
LongNet splits the sequence into segments and keeps every r-th token inside each, with
the dilation growing geometrically with the segment length and *different heads using
different offsets / dilations* so that together they cover every position. This method
keeps LongNet's core idea — a sparse, dilated pattern whose spacing varies across heads
— in the sliding-window form (each query attends to ``window`` keys spaced ``r_h``
apart ending at itself), so the pattern is translation invariant, causal, decodable
with a constant-size cache, and every query of head ``h`` covers ``r_h·(w-1)+1``
positions back with ``w`` keys. The pattern is the mask_mod
:func:`attnzoo.masks.dilated_window_mask`; the reference is dense masked softmax built
from it.

Judgement calls:

* [J] Sliding dilated windows instead of LongNet's fixed segments (see above): one
  mask_mod, lower-right aligned like every local method of the library, causal and
  decodable; the per-head dilation mixture is LongNet's.
* [J] ``dilations``: an int or a list/tuple/1-D tensor of positive ints, *cycled* over
  the query heads (head ``h`` uses ``dilations[h % len(dilations)]``); default
  ``(1, 2, 4, 8)``, LongNet's geometric sequence of rates.
* [J] ``window`` counts the attended keys per query (causal: ``w`` keys, the query's own
  included; noncausal: ``w // 2`` dilated steps on each side, ``2·(w // 2) + 1`` keys),
  the convention of ``sliding_window``. Default 64.
* [J] All four patterns. In cross attention the query positions are aligned lower-right
  to the keys, as everywhere in the library. Because the pattern depends on a query's
  position, a row's output depends on how many queries there are (through the
  alignment): the spec says ``rows_independent=False``, so the layer refuses to decode
  noncausal cross-attention one query at a time (which would align every query to the
  last key and silently compute something else).
* [J] A dense ``mask`` / mask_mod and ``key_padding_mask`` are combined by AND with the
  pattern; a query with nothing visible returns zeros.

Implementations:

* ``reference`` — dense masked softmax with the pattern from ``dense_mask`` (O(N²)).
* ``block`` — the block-sparse kernel (:mod:`attnzoo.methods._blocksparse`) over the key
  blocks the pattern touches, with the same mask_mod as the element mask. The per-head
  block layout (:func:`dilated_layout`) is analytic, from the block bounds: the key
  block ``[kf, kl]`` is kept for the query block ``[qf, ql]`` (aligned) iff a multiple
  ``r·t`` of the head's dilation with ``t`` in the window lies in the range of
  differences ``[qf - kl, ql - kf]`` — exactly the blocks the element pattern touches
  (blocks in the gaps of a dilation larger than the block are skipped). Time
  O(N·w·min(r, b)·D) and memory O(N·w·min(r, b)) for the largest dilation ``r`` and
  block ``b`` (a row block of ``b`` queries with ``r <= b`` touches every block of its
  ``r·w`` span; the kernel pads every head to the head with the most kept blocks); never
  N×N, forward or backward.
* decoding — the last ``max_h(r_h)·(w-1)+1`` tokens (:class:`WindowCache`, constant
  memory); each new query attends with its head's pattern by global positions.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import AttentionInputError
from ..masks import _head_values, dense_mask, dilated_window_mask
from ..registry import Impl, MethodSpec, register
from . import softmax
from ._blocksparse import block_indices, block_sparse_attention
from .sliding_window import WindowCache

DEFAULT_DILATIONS = (1, 2, 4, 8)


def _check(window, dilations, block_size: Optional[int] = None) -> torch.Tensor:
    """Validate the options; return the dilations as a long tensor (CPU)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise AttentionInputError(f"dilated: window must be a positive int, got {window!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise AttentionInputError(f"dilated: block_size must be a positive int, got {block_size!r}")
    return _head_values(dilations, "dilations")


def _pattern(causal, window, dilations, q_len, kv_len):
    return dilated_window_mask(window, dilations, causal, q_len, kv_len)


def head_rates(dilations, heads: int, device=None) -> torch.Tensor:
    """The dilation of each of ``heads`` query heads, ``(heads,)`` long (the list cycled)."""
    rates = _head_values(dilations, "dilations")
    return rates[torch.arange(heads) % rates.numel()].to(device)


def reference(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
              return_weights=False, window: int = 64, dilations=DEFAULT_DILATIONS):
    """Dense softmax masked by the per-head dilated window (the definition).

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    _check(window, dilations)
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    allowed = dense_mask(_pattern(causal, window, dilations, Nq, Nk), B, Hq, Nq, Nk, q.device)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            mask = dense_mask(mask, B, Hq, Nq, Nk, q.device)
        allowed = allowed & mask
    return softmax.reference(q, k, v, causal=causal, mask=allowed, key_padding_mask=key_padding_mask, scale=scale,
                             dropout_p=dropout_p, return_weights=return_weights)


def dilated_layout(q_len: int, kv_len: int, block: int, window: int, rates: torch.Tensor, causal: bool,
                   device=None) -> torch.Tensor:
    """Block layout ``(H, nqb, nkb)`` of the dilated window for per-head dilations ``rates
    (H,)``, from the block bounds only (no element-level N×N evaluation).

    For a query block with aligned positions ``[qf, ql]`` and a key block ``[kf, kl]`` the
    differences ``d = i' - j`` fill the integer range ``[qf - kl, ql - kf]``; the block is
    touched iff that range holds a multiple ``r·t`` of the head's dilation with ``t`` in
    the window (``0 <= t < w`` causal, ``|t| <= w // 2`` noncausal). This is exact: it
    equals :func:`attnzoo.masks.block_layout` of the mask_mod.
    """
    nqb, nkb = -(-q_len // block), -(-kv_len // block)
    off = kv_len - q_len
    qf = torch.arange(nqb, device=device) * block + off
    ql = torch.clamp(qf + block - 1, max=q_len - 1 + off)
    kf = torch.arange(nkb, device=device) * block
    kl = torch.clamp(kf + block - 1, max=kv_len - 1)
    qf, ql = qf.view(1, -1, 1), ql.view(1, -1, 1)
    kf, kl = kf.view(1, 1, -1), kl.view(1, 1, -1)
    r = rates.to(device=device, dtype=torch.long).view(-1, 1, 1)
    if causal:
        lo = (qf - kl).clamp(min=0)
        hi = torch.minimum(ql - kf, r * (window - 1))
    else:
        reach = r * (window // 2)
        lo = torch.maximum(qf - kl, -reach)
        hi = torch.minimum(ql - kf, reach)
    first_multiple = -torch.div(-lo, r, rounding_mode="floor") * r  # smallest multiple of r >= lo
    return first_multiple <= hi


def block_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                    return_weights=False, window: int = 64, dilations=DEFAULT_DILATIONS, block_size: int = 64):
    """The block-sparse kernel over the key blocks each head's dilated window touches."""
    _check(window, dilations, block_size)
    Hq, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rates = head_rates(dilations, Hq)
    if bool((rates == rates[0]).all()):
        rates = rates[:1]  # one dilation for every head: one shared layout
    layout = dilated_layout(Nq, Nk, block_size, window, rates, causal, q.device)
    idx, valid = block_indices(layout)
    return block_sparse_attention(q, k, v, idx=idx, valid=valid, block=block_size, scale=scale, causal=causal,
                                  mask=mask, key_padding_mask=key_padding_mask,
                                  element_mask=_pattern(causal, window, dilations, Nq, Nk))


# ---------------------------------------------------------------------------- decoding


def flex_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                   return_weights=False, window: int = 64, dilations=DEFAULT_DILATIONS):
    """FlexAttention with the same mask_mod (inference on CPU)."""
    _check(window, dilations)
    pattern = _pattern(causal, window, dilations, q.shape[2], k.shape[2])
    return softmax.flex_with_pattern(q, k, v, pattern, causal=causal, mask=mask, key_padding_mask=key_padding_mask,
                                     scale=scale)


def cache_tokens(window: int, dilations) -> int:
    """Tokens the decoding cache keeps: ``max_h(r_h)·(w-1) + 1`` (the farthest any head looks back)."""
    return int(_head_values(dilations, "dilations").max()) * (int(window) - 1) + 1


def init_state(batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None, window=64,
               dilations=DEFAULT_DILATIONS, block_size=64):
    _check(window, dilations, block_size)
    return WindowCache(batch_size, kv_heads, head_dim, v_dim, cache_tokens(window, dilations), 0, dtype, device)


def step(cache: WindowCache, q, k, v, *, scale, impl="auto", window=64, dilations=DEFAULT_DILATIONS, block_size=64):
    """Attend the T new queries over the kept tokens plus the new ones with each head's
    dilated window (by global positions), then keep only the last ``max_h(r_h)·(w-1)+1``."""
    _check(window, dilations, block_size)
    keep = cache_tokens(window, dilations)
    if keep != cache.window:
        raise AttentionInputError(
            f"dilated: step with window={window}, dilations={tuple(_head_values(dilations, 'dilations').tolist())} "
            f"needs a cache of {keep} tokens, but the state keeps {cache.window}; pass the same options to init_state"
        )
    return cache.attend(q, k, v, dilated_window_mask(window, dilations, True), scale)


register(
    MethodSpec(
        name="dilated",
        family="local",
        summary="softmax over a dilated sliding window of w keys, the dilation varying across heads (LongNet)",
        paper="LongNet: Scaling Transformers to 1,000,000,000 Tokens",
        reference=reference,
        impls=[Impl("block", block_attention, mask_mod=True,
                    description="block-sparse kernel over the key blocks each head's dilated window touches, "
                                "O(N·w·min(r, block))"),
               Impl("flex", flex_attention, supports=softmax._flex_supports, mask_mod=True,
                    description="FlexAttention with the same mask_mod (CPU: inference only)")],
        exact=False,
        time="O(N w min(r,b) D)",
        memory="O(N w min(r,b))",
        decoding=True,
        state_size="last max_h(r_h)·(w-1)+1 tokens: ·2·Hkv·D per sequence, constant in N",
        init_state=init_state,
        step=step,
        # a small window, a dilation larger than the kernel's 64-token block (gapped layouts)
        # and three rates cycled over 2 or 4 heads, so N = 63..1000 exercise the sparsity
        test_options={"window": 6, "dilations": (1, 70, 3)},
        rows_independent=False,  # a row's keys depend on its lower-right aligned position (see [J] above)
    )
)
