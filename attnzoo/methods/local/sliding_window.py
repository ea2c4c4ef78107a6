"""Sliding-window attention with attention sinks.

    causal:    query i sees keys j with  i' - w < j <= i'   (i' = i + Nk - Nq), plus j < s
    noncausal: query i sees keys j with  |j - i'| <= w // 2,                     plus j < s

Local attention (Longformer's sliding window, "Longformer: The Long-Document
Transformer"; Mistral) keeps the last ``window`` keys, the query's own included. The
first ``sinks`` tokens stay visible to every query: "Efficient Streaming Language
Models with Attention Sinks" (StreamingLLM) shows softmax dumps excess attention on the
first tokens, and keeping them lets a windowed model stream indefinitely; "Unveiling
and Harnessing Hidden Attention Sinks" studies the same sinks. The pattern is the
mask_mod :func:`sliding_window_sink_mask` (also ``attnzoo.masks.sliding_window_sink_mask``);
the reference is dense masked softmax built from it. The fast form ``block`` runs the
block-sparse kernel over only the key blocks the window (and the sinks) touch
(:func:`attnzoo.kernels.windows.window_layout`); ``band`` runs chunks of query rows over
the contiguous key span their window reaches (:func:`attnzoo.kernels.windows.band_attention`),
with no gathers and no data-dependent shapes, so it also traces under
``torch.compile(fullgraph=True)``. Both: time O(N·w·D), memory O(N·w).

Decoding keeps the sinks and the last ``window`` keys (a window cache): memory
``w + s`` tokens, constant in the generated length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...errors import AttentionInputError
from ...kernels.caches import Decoder, WindowCache
from ...kernels.flex import flex_unsupported
from ...kernels.masking import MaskMod, and_masks, causal_mask, offset_of, or_masks, sink_mask, sliding_window_mask
from ...kernels.windows import band_attention, band_rows, pattern_blocks, pattern_flex, pattern_reference, window_layout
from ...registry import MethodOptions, method


def sliding_window_sink_mask(
    window: int, sinks: int = 0, causal: bool = True, q_len: Optional[int] = None, kv_len: Optional[int] = None
) -> MaskMod:
    """The ``sliding_window`` method's pattern: a sliding window (see
    :func:`attnzoo.masks.sliding_window_mask`) or one of the first ``sinks`` keys; causal
    (lower-right) when ``causal``. The function carries ``cache_key``
    (``("sliding_window", window, sinks, causal, offset)``)."""
    mod = sliding_window_mask(window, causal, q_len, kv_len)
    if sinks:
        mod = or_masks(mod, sink_mask(sinks))
        if causal:
            mod = and_masks(mod, causal_mask(q_len, kv_len))
    mod.cache_key = ("sliding_window", int(window), int(sinks), bool(causal), offset_of(q_len, kv_len))
    mod.per_head = False  # positions only: kernels may build its mask once per geometry
    return mod


@dataclass(frozen=True)
class SlidingWindowOptions(MethodOptions):
    """Options of ``sliding_window``.

    Attributes:
        window: keys per query (causal: the last ``window``, its own included;
            noncausal: ``window // 2`` on each side).
        sinks: initial tokens every query also sees (StreamingLLM's attention sinks).
        block_size: tile size of ``block``.
        block_q: query rows per chunk of ``band`` (default: about half the window).
    """

    window: int = 256
    sinks: int = 0
    block_size: int = 64
    block_q: Optional[int] = None

    def validate(self) -> None:
        if self.window < 1 or self.sinks < 0:
            raise AttentionInputError(
                f"window must be >= 1 and sinks >= 0, got window={self.window}, sinks={self.sinks}")
        if self.block_size < 1:
            raise AttentionInputError(f"option block_size must be a positive int, got {self.block_size!r}")
        if self.block_q is not None and self.block_q < 1:
            raise AttentionInputError(f"option block_q must be a positive int (or None), got {self.block_q!r}")

    @classmethod
    def for_length(cls, n: int) -> dict:
        return {"window": min(256, max(2, n // 4))}


def _pattern(call):
    o = call.options
    return sliding_window_sink_mask(o.window, o.sinks, call.causal, call.q_len, call.kv_len)


@method("sliding_window", options=SlidingWindowOptions,
        paper="Efficient Streaming Language Models with Attention Sinks",
        summary="softmax over the last w keys (or w/2 each side) plus s attention sinks",
        time="O(N w D)", memory="O(N w)", score_mods=True,
        rows_independent=False,  # a cross-attention row's window depends on its aligned position
        mask_mods=(sliding_window_sink_mask,))
def sliding_window(q, k, v, call):
    """Dense softmax masked by the window/sink pattern.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    return pattern_reference(q, k, v, call, _pattern(call))


def _window_ranges(call):
    """``key_ranges(qs, qe)`` of the queries ``[qs, qe)``: the sinks and the window's span."""
    o, off, causal = call.options, call.offset, call.causal

    def key_ranges(qs, qe):
        if causal:
            lo, hi = qs + off - o.window + 1, qe + off
        else:
            lo, hi = qs + off - o.window // 2, qe - 1 + off + o.window // 2 + 1
        if not o.sinks:
            return [(lo, hi)]
        if o.sinks >= lo:
            return [(0, max(hi, o.sinks))]
        return [(0, o.sinks), (lo, hi)]

    return key_ranges


@sliding_window.impl("band", options=("block_q",),
                     description="query chunks over their window's contiguous key span (and the sinks), O(N·w); "
                                 "no gathers, traces under torch.compile")
def band(q, k, v, call):
    """Chunks of query rows, each over the contiguous span of keys its window reaches."""
    o = call.options
    rows = o.block_q or band_rows(call.batch, call.q_heads, o.window + o.sinks)
    return band_attention(q, k, v, call, _pattern(call), _window_ranges(call), rows)


def _block_supports(call):
    if torch.compiler.is_compiling():
        return "the block-sparse kernel's gathers have data-dependent shapes under torch.compile; use impl='band'"
    return None


@sliding_window.impl("block", options=("block_size",), supports=_block_supports,
                     description="block-sparse kernel over the window's key blocks, O(N·w)")
def block_attention(q, k, v, call):
    """The block-sparse kernel over the key blocks the window and sinks touch."""
    o = call.options
    layout = window_layout(call.q_len, call.kv_len, o.block_size, o.window, o.sinks, call.causal, q.device)
    return pattern_blocks(q, k, v, call, layout, o.block_size, _pattern(call))


@sliding_window.impl("flex", supports=flex_unsupported,
                     description="FlexAttention with the same mask_mod (CPU: inference only)")
def flex(q, k, v, call):
    """FlexAttention with the same mask_mod (inference on CPU)."""
    return pattern_flex(q, k, v, call, _pattern(call))


@sliding_window.decodes
class SlidingWindowDecoder(Decoder):
    """The sinks and the last ``window`` keys/values (a
    :class:`~attnzoo.kernels.caches.WindowCache`): ``w + s`` tokens."""

    state_size = "sinks + last w tokens: (w + s)·2·Hkv·D per sequence, constant in N"

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, options):
        return WindowCache(batch_size, kv_heads, head_dim, v_dim, options.window, options.sinks, dtype, device)

    def step(self, run, cache, q, k, v, *, scale, impl, options):
        """Attend the T new queries over the kept tokens plus the new ones (causal, window,
        sinks by global position), then keep only the sinks and the last ``window`` tokens."""
        return cache.attend(q, k, v, sliding_window_sink_mask(cache.window, cache.sinks, True), scale)
