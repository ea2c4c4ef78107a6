"""Sliding-window attention with attention sinks.

    causal:    query i sees keys j with  i' - w < j <= i'   (i' = i + Nk - Nq), plus j < s
    noncausal: query i sees keys j with  |j - i'| <= w // 2,                     plus j < s

Local attention (Longformer's sliding window, "Longformer: The Long-Document
Transformer"; Mistral) keeps the last ``window`` keys, the query's own included. The
first ``sinks`` tokens stay visible to every query: "Efficient Streaming Language
Models with Attention Sinks" (StreamingLLM) shows softmax dumps excess attention on the
first tokens, and keeping them lets a windowed model stream indefinitely; "Unveiling
and Harnessing Hidden Attention Sinks" studies the same sinks. The pattern is the
mask_mod :func:`attnzoo.masks.sliding_window_sink_mask`; the reference is dense masked
softmax built from it. The fast form ``block`` runs the block-sparse kernel over only the
key blocks the window (and the sinks) touch: time O(N·w·D), memory O(N·w).

Decoding keeps the sinks and a ring buffer of the last ``window`` keys: memory
``w + s`` tokens, constant in the generated length.
"""

from __future__ import annotations


import torch

from ..errors import AttentionInputError
from ..masks import dense_mask, sliding_window_sink_mask
from ..registry import Impl, MethodSpec, register
from . import softmax
from ._blocksparse import block_indices, block_sparse_attention


def _check(window, sinks):
    if int(window) < 1 or int(sinks) < 0:
        raise AttentionInputError(f"window must be >= 1 and sinks >= 0, got window={window}, sinks={sinks}")


def _pattern(causal, window, sinks, q_len, kv_len):
    return sliding_window_sink_mask(int(window), int(sinks), causal, q_len, kv_len)


def _combine(user_mask, pattern_mask):
    return pattern_mask if user_mask is None else pattern_mask & user_mask


def reference(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
              return_weights=False, window: int = 256, sinks: int = 0):
    """Dense softmax masked by the window/sink pattern.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    _check(window, sinks)
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    pattern = dense_mask(_pattern(causal, window, sinks, Nq, Nk), B, Hq, Nq, Nk, q.device)
    return softmax.reference(q, k, v, causal=causal, mask=_combine(mask, pattern), key_padding_mask=key_padding_mask,
                             scale=scale, dropout_p=dropout_p, return_weights=return_weights)


def window_layout(q_len: int, kv_len: int, block: int, window: int, sinks: int, causal: bool, device=None):
    """Block layout ``(1, nqb, nkb)`` of the window and sinks, computed from the block
    bounds (no element-level N×N evaluation)."""
    nqb, nkb = -(-q_len // block), -(-kv_len // block)
    off = kv_len - q_len
    first = torch.arange(nqb, device=device) * block + off  # aligned position of each block's first query
    last = torch.clamp(first + block - 1, max=q_len - 1 + off)
    if causal:
        lo, hi = first - window + 1, last
    else:
        lo, hi = first - window // 2, last + window // 2
    kb_first = torch.arange(nkb, device=device) * block
    kb_last = kb_first + block - 1
    layout = (kb_last.view(1, -1) >= lo.view(-1, 1)) & (kb_first.view(1, -1) <= hi.view(-1, 1))
    if sinks:
        sink = kb_first < sinks
        layout = layout | (sink.view(1, -1) & ((kb_first.view(1, -1) <= last.view(-1, 1)) if causal else True))
    return layout.unsqueeze(0)


def block_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                    return_weights=False, window: int = 256, sinks: int = 0, block_size: int = 64):
    """The block-sparse kernel over the key blocks the window and sinks touch."""
    _check(window, sinks)
    Nq, Nk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    layout = window_layout(Nq, Nk, block_size, int(window), int(sinks), causal, q.device)
    idx, valid = block_indices(layout)
    return block_sparse_attention(q, k, v, idx=idx, valid=valid, block=block_size, scale=scale, causal=causal,
                                  mask=mask, key_padding_mask=key_padding_mask,
                                  element_mask=_pattern(causal, window, sinks, Nq, Nk))


def flex_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                   return_weights=False, window: int = 256, sinks: int = 0):
    """FlexAttention with the same mask_mod (inference on CPU)."""
    _check(window, sinks)
    pattern = _pattern(causal, window, sinks, q.shape[2], k.shape[2])
    return softmax.flex_with_pattern(q, k, v, pattern, causal=causal, mask=mask, key_padding_mask=key_padding_mask,
                                     scale=scale)


class WindowCache:
    """The sinks and a ring buffer of the last ``window`` keys/values: ``w + s`` tokens."""

    def __init__(self, batch, kv_heads, head_dim, v_dim, window, sinks, dtype, device):
        self.window, self.sinks = int(window), int(sinks)
        self.k = torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, kv_heads, 0, v_dim, dtype=dtype, device=device)
        self.pos = torch.zeros(0, dtype=torch.long, device=device)  # global positions of the kept tokens
        self.length = 0  # tokens seen

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    @property
    def tokens(self) -> int:
        return self.k.shape[2]

    def attend(self, q, k, v, pattern, scale: float) -> torch.Tensor:
        """Append the T new tokens, attend the new queries over the kept tokens and the new
        ones with ``pattern`` (a mask_mod evaluated at global positions), then keep only the
        sinks and the last ``window`` tokens."""
        T, Hq = q.shape[2], q.shape[1]
        new_pos = torch.arange(self.length, self.length + T, device=q.device)
        keys = torch.cat([self.k, k], dim=2)
        values = torch.cat([self.v, v], dim=2)
        pos = torch.cat([self.pos, new_pos])
        heads = torch.arange(Hq, device=q.device).view(1, -1, 1, 1)
        allowed = pattern(0, heads, new_pos.view(1, 1, -1, 1), pos.view(1, 1, 1, -1))
        out = softmax.reference(q, keys, values, mask=allowed, scale=scale)
        kept = (pos < self.sinks) | (pos > self.length + T - 1 - self.window)
        self.k, self.v, self.pos = keys[:, :, kept], values[:, :, kept], pos[kept]
        self.length += T
        return out


def init_state(batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None, window=256,
               sinks=0, block_size=64):
    _check(window, sinks)
    return WindowCache(batch_size, kv_heads, head_dim, v_dim, window, sinks, dtype, device)


def step(cache: WindowCache, q, k, v, *, scale, impl="auto", window=256, sinks=0, block_size=64):
    """Attend the T new queries over the kept tokens plus the new ones (causal, window,
    sinks by global position), then keep only the sinks and the last ``window`` tokens."""
    return cache.attend(q, k, v, _pattern(True, cache.window, cache.sinks, None, None), scale)


register(
    MethodSpec(
        name="sliding_window",
        family="local",
        summary="softmax over the last w keys (or w/2 each side) plus s attention sinks",
        paper="Efficient Streaming Language Models with Attention Sinks",
        reference=reference,
        impls=[Impl("block", block_attention, mask_mod=True,
                    description="block-sparse kernel over the window's key blocks, O(N·w)"),
               Impl("flex", flex_attention, supports=softmax._flex_supports, mask_mod=True,
                    description="FlexAttention with the same mask_mod (CPU: inference only)")],
        exact=False,
        time="O(N w D)",
        memory="O(N w)",
        decoding=True,
        rows_independent=False,  # a cross-attention row's window depends on its aligned position
        state_size="ring buffer: (w + s)·2·Hkv·D per sequence, constant in N",
        init_state=init_state,
        step=step,
        test_options={"window": 24, "sinks": 3},
    )
)
