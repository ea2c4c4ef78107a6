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
:func:`dilated_window_mask` (also ``attnzoo.masks.dilated_window_mask``); the reference is dense masked softmax built
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
* [J] A dense ``mask`` / mask_mod and the key padding are combined by AND with the
  pattern; a query with nothing visible returns zeros.

Implementations:

* ``reference`` — dense masked softmax with the pattern from ``dense_mask`` (O(N²)).
* ``block`` — the block-sparse kernel (:mod:`attnzoo.kernels.blocksparse`) over the key
  blocks the pattern touches, with the same mask_mod as the element mask. The per-head
  block layout (:func:`attnzoo.kernels.windows.dilated_layout`) is analytic, from the
  block bounds: the key block ``[kf, kl]`` is kept for the query block ``[qf, ql]``
  (aligned) iff a multiple ``r·t`` of the head's dilation with ``t`` in the window lies in the range of
  differences ``[qf - kl, ql - kf]`` — exactly the blocks the element pattern touches
  (blocks in the gaps of a dilation larger than the block are skipped). Time
  O(N·w·min(r, b)·D) and memory O(N·w·min(r, b)) for the largest dilation ``r`` and
  block ``b`` (a row block of ``b`` queries with ``r <= b`` touches every block of its
  ``r·w`` span; the kernel pads every head to the head with the most kept blocks); never
  N×N, forward or backward.
* ``flex`` — FlexAttention with the same mask_mod (CPU: inference only).
* decoding — the last ``max_h(r_h)·(w-1)+1`` tokens (a
  :class:`~attnzoo.kernels.caches.WindowCache`, constant memory); each new query attends
  with its head's pattern by global positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from ...errors import AttentionInputError
from ...kernels.caches import Decoder, WindowCache
from ...kernels.flex import flex_unsupported
from ...kernels.masking import MaskMod, head_values, offset_of, take_head
from ...kernels.windows import dilated_layout, one_if_shared, pattern_blocks, pattern_flex, pattern_reference
from ...registry import MethodOptions, method

DEFAULT_DILATIONS = (1, 2, 4, 8)


def dilated_window_mask(
    window: int, dilations=DEFAULT_DILATIONS, causal: bool = True, q_len: Optional[int] = None,
    kv_len: Optional[int] = None,
) -> MaskMod:
    """LongNet's dilated sliding window ("LongNet: Scaling Transformers to 1,000,000,000
    Tokens"), the dilation varying across heads: head ``h`` uses ``r = dilations[h % len]``.

    With ``i' = i + kv_len - q_len`` (lower-right alignment) and ``d = i' - j``:

    * causal: query ``i`` sees ``j = i' - r·t`` for ``t = 0..window-1`` (``j >= 0``), i.e.
      ``d >= 0``, ``d % r == 0`` and ``d // r < window``;
    * noncausal: ``|d| % r == 0`` and ``|d| // r <= window // 2`` (``window // 2`` dilated
      steps on each side).

    ``dilations``: an int or a list/tuple/1-D tensor of positive ints, cycled over the heads.
    The returned function carries ``window``, ``dilations`` (the long tensor), ``causal``,
    ``offset`` and ``cache_key`` as attributes.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise AttentionInputError(f"window must be a positive int, got {window!r}")
    rates = head_values(dilations, "dilations")
    offset = offset_of(q_len, kv_len)

    if causal:

        def dilated_window_causal(b, h, q_idx, kv_idx):
            r = take_head(rates, h)
            back = q_idx + offset - kv_idx
            return (back >= 0) & (back % r == 0) & (back < r * window)

        mod = dilated_window_causal
    else:
        half = window // 2

        def dilated_window(b, h, q_idx, kv_idx):
            r = take_head(rates, h)
            dist = (q_idx + offset - kv_idx).abs()
            return (dist % r == 0) & (dist <= r * half)

        mod = dilated_window

    mod.window, mod.dilations, mod.causal, mod.offset = window, rates, bool(causal), offset  # type: ignore[attr-defined]
    mod.cache_key = ("dilated_window", window, tuple(rates.tolist()), bool(causal), offset)  # type: ignore
    return mod


@dataclass(frozen=True)
class DilatedOptions(MethodOptions):
    """Options of ``dilated``.

    Attributes:
        window: keys per query (causal: ``w`` keys, its own included; noncausal:
            ``w // 2`` dilated steps on each side).
        dilations: an int or a list/tuple/1-D tensor of positive ints, cycled over the
            query heads (LongNet's geometric rates by default).
        block_size: tile size of ``block``.
    """

    window: int = 64
    dilations: Union[int, tuple, torch.Tensor] = DEFAULT_DILATIONS
    block_size: int = 64

    def validate(self) -> None:
        if self.window < 1:
            raise AttentionInputError(f"dilated: window must be a positive int, got {self.window!r}")
        if self.block_size < 1:
            raise AttentionInputError(f"dilated: block_size must be a positive int, got {self.block_size!r}")
        head_values(self.dilations, "dilations")

    @classmethod
    def for_length(cls, n: int) -> dict:
        return {"window": min(64, max(2, n // 4))}


def head_rates(dilations, heads: int, device=None) -> torch.Tensor:
    """The dilation of each of ``heads`` query heads, ``(heads,)`` long (the list cycled)."""
    rates = head_values(dilations, "dilations")
    return rates[torch.arange(heads) % rates.numel()].to(device)


def _pattern(call):
    o = call.options
    return dilated_window_mask(o.window, o.dilations, call.causal, call.q_len, call.kv_len)


@method("dilated", options=DilatedOptions, paper="LongNet: Scaling Transformers to 1,000,000,000 Tokens",
        summary="softmax over a dilated sliding window of w keys, the dilation varying across heads (LongNet)",
        time="O(N w min(r,b) D)", memory="O(N w min(r,b))", score_mods=True,
        rows_independent=False,  # a row's keys depend on its lower-right aligned position (see [J] above)
        mask_mods=(dilated_window_mask,))
def dilated(q, k, v, call):
    """Dense softmax masked by the per-head dilated window (the definition).

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    return pattern_reference(q, k, v, call, _pattern(call))


@dilated.impl("block", options=("block_size",),
              description="block-sparse kernel over the key blocks each head's dilated window touches, "
                          "O(N·w·min(r, block))")
def block_attention(q, k, v, call):
    """The block-sparse kernel over the key blocks each head's dilated window touches."""
    o = call.options
    rates = one_if_shared(head_rates(o.dilations, call.q_heads))  # one dilation for every head: one layout
    layout = dilated_layout(call.q_len, call.kv_len, o.block_size, o.window, rates, call.causal, q.device)
    return pattern_blocks(q, k, v, call, layout, o.block_size, _pattern(call))


@dilated.impl("flex", supports=flex_unsupported,
              description="FlexAttention with the same mask_mod (CPU: inference only)")
def flex(q, k, v, call):
    """FlexAttention with the same mask_mod (inference on CPU)."""
    return pattern_flex(q, k, v, call, _pattern(call))


# ---------------------------------------------------------------------------- decoding


def cache_tokens(window: int, dilations) -> int:
    """Tokens the decoding cache keeps: ``max_h(r_h)·(w-1) + 1`` (the farthest any head looks back)."""
    return int(head_values(dilations, "dilations").max()) * (int(window) - 1) + 1


@dilated.decodes
class DilatedDecoder(Decoder):
    """The last ``max_h(r_h)·(w-1)+1`` tokens in a :class:`~attnzoo.kernels.caches.WindowCache`."""

    state_size = "last max_h(r_h)·(w-1)+1 tokens: ·2·Hkv·D per sequence, constant in N"

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, options):
        return WindowCache(batch_size, kv_heads, head_dim, v_dim, cache_tokens(options.window, options.dilations), 0,
                           dtype, device)

    def step(self, run, cache, q, k, v, *, scale, impl, options):
        """Attend the T new queries over the kept tokens plus the new ones with each head's
        dilated window (by global positions), then keep only the last ``max_h(r_h)·(w-1)+1``."""
        window, dilations = options.window, options.dilations
        keep = cache_tokens(window, dilations)
        if keep != cache.window:
            raise AttentionInputError(
                f"dilated: step with window={window}, dilations={tuple(head_values(dilations, 'dilations').tolist())} "
                f"needs a cache of {keep} tokens, but the state keeps {cache.window}; pass the same options to "
                "init_state"
            )
        return cache.attend(q, k, v, dilated_window_mask(window, dilations, True), scale)
