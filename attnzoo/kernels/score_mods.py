"""Score modifiers as pure functions, with FlexAttention's ``score_mod`` signature.

A *score_mod* ``mod(score, b, h, q_idx, kv_idx) -> score`` changes the scaled
attention scores before the softmax (or the sigmoid, or whatever the method applies).
Like a mask_mod it uses elementwise tensor operations only, so one function serves

* the dense references, on ``(B, H, Nq, Nk)`` scores with broadcast index grids
  (:func:`index_grids`),
* the blocked kernels (``tiled``, the block-sparse kernel, split-K), one tile at a
  time, on the grids of that tile (grouped ``(B, Hkv, G, n, m)`` layouts included),
* FlexAttention, natively (scalars under ``torch.vmap``).

A mod of the form ``score + bias(b, h, q_idx, kv_idx)`` is *additive* (:func:`additive`
marks it): SDPA can then take it as a float ``attn_mask`` (:func:`dense_bias`), and a
backward pass needs no derivative of it. Biases are computed in the scores' dtype
(float32 for half inputs), never rounded to the input dtype.

Positions follow the masks' lower-right alignment: with ``Nq`` queries and ``Nk``
keys, query ``i`` sits at position ``i + Nk - Nq``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..errors import AttentionInputError, fmt_shape

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def additive(mod: ScoreMod) -> ScoreMod:
    """Mark ``mod`` as additive: ``mod(s, ...) == s + mod(0, ...)`` for every ``s``."""
    mod.additive = True  # type: ignore[attr-defined]
    return mod


def is_additive(mod: Optional[ScoreMod]) -> bool:
    """Whether ``mod`` is None or marked :func:`additive`."""
    return mod is None or bool(getattr(mod, "additive", False))


def compose(*mods: Optional[ScoreMod]) -> Optional[ScoreMod]:
    """Apply the given mods in order (None entries are skipped); None when none is left.
    The result is additive when every part is."""
    parts = [m for m in mods if m is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]

    def composed(score, b, h, q_idx, kv_idx):
        for mod in parts:
            score = mod(score, b, h, q_idx, kv_idx)
        return score

    if all(is_additive(m) for m in parts):
        additive(composed)
    composed.parts = tuple(parts)  # type: ignore[attr-defined]
    return composed


# ------------------------------------------------------------------------------ grids


def index_grids(batch: int, heads: int, qs: int, qe: int, ks: int, ke: int, device=None,
                kv_heads: Optional[int] = None):
    """Broadcast index grids ``(b, h, q_idx, kv_idx)`` of the block ``[qs:qe] x [ks:ke]``.

    4-D (``(B, H, n, m)`` scores) by default; with ``kv_heads`` the grouped 5-D layout
    ``(B, Hkv, G, n, m)`` of GQA kernels, where query head ``h = hkv * G + g``.
    """
    b = torch.arange(batch, device=device)
    qi = torch.arange(qs, qe, device=device)
    ki = torch.arange(ks, ke, device=device)
    if kv_heads is None:
        h = torch.arange(heads, device=device)
        return b.view(-1, 1, 1, 1), h.view(1, -1, 1, 1), qi.view(1, 1, -1, 1), ki.view(1, 1, 1, -1)
    h = torch.arange(heads, device=device).view(1, kv_heads, heads // kv_heads, 1, 1)
    return b.view(-1, 1, 1, 1, 1), h, qi.view(1, 1, 1, -1, 1), ki.view(1, 1, 1, 1, -1)


def apply(mod: Optional[ScoreMod], s: torch.Tensor, qs: int, ks: int, *, batch: int, heads: int,
          kv_heads: Optional[int] = None) -> torch.Tensor:
    """``mod`` on the score block ``s`` whose first query is ``qs`` and first key ``ks``
    (``s``: ``(B, H, n, m)``, or ``(B, Hkv, G, n, m)`` with ``kv_heads``)."""
    if mod is None:
        return s
    n, m = s.shape[-2], s.shape[-1]
    grids = index_grids(batch, heads, qs, qs + n, ks, ks + m, s.device, kv_heads)
    out = mod(s, *grids)
    if out.shape != s.shape:  # a mod that ignores the score (a pure bias) still returns the block's shape
        out = out.expand(s.shape)
    return out


def dense_bias(mod: ScoreMod, batch: int, heads: int, q_len: int, kv_len: int, device=None,
               dtype=torch.float32) -> torch.Tensor:
    """The bias of an additive ``mod`` as a tensor broadcastable to ``(B, H, Nq, Nk)``, in
    ``dtype`` (SDPA's float ``attn_mask``)."""
    if not is_additive(mod):
        raise AttentionInputError("dense_bias needs an additive score_mod (score + bias)")
    zero = torch.zeros((), device=device, dtype=dtype)
    out = mod(zero, *index_grids(batch, heads, 0, q_len, 0, kv_len, device))
    out = out.to(dtype)
    while out.dim() < 4:
        out = out.unsqueeze(0)
    return out


# ------------------------------------------------------------------------------- mods


def softcap(cap: float) -> ScoreMod:
    """tanh soft-capping (Gemma 2): ``cap * tanh(score / cap)``; keeps logits in ``(-cap, cap)``."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0 or math.isinf(cap):
        raise AttentionInputError(f"softcap must be a positive finite number (or None), got {cap!r}")
    cap = float(cap)

    def soft_cap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    soft_cap.cap = cap  # type: ignore[attr-defined]
    return soft_cap


def alibi_slopes(heads: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al., "Train Short, Test Long"): a geometric
    sequence ``2^(-8/n), 2^(-16/n), ...`` for ``n`` a power of two; other head counts
    take the slopes of the next power of two at odd positions, as in the paper's code."""

    def power_of_two(n: int) -> list:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        slopes = power_of_two(heads)
    else:
        closest = 2 ** math.floor(math.log2(heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=dtype, device=device)


def resolve_alibi(alibi, heads: int, device, dtype=torch.float32) -> Optional[torch.Tensor]:
    """An ``alibi`` option (False/None, True for the standard slopes, or one slope per
    query head) as a ``(Hq,)`` tensor in ``dtype``, or None."""
    if alibi is None or alibi is False:
        return None
    if alibi is True:
        return alibi_slopes(heads, device, dtype)
    slopes = torch.as_tensor(alibi, device=device).to(dtype).flatten()
    if slopes.numel() != heads:
        raise AttentionInputError(f"alibi slopes must have one value per query head ({heads}), got {slopes.numel()}")
    return slopes


def alibi(slopes: torch.Tensor, q_len: int, kv_len: int) -> ScoreMod:
    """ALiBi: ``score - slope_h * |pos_i - j|`` with ``pos_i = i + kv_len - q_len``.
    ``slopes``: ``(Hq,)``; the bias is computed in the scores' dtype."""
    offset = int(kv_len) - int(q_len)

    def alibi_bias(score, b, h, q_idx, kv_idx):
        dist = (q_idx + offset - kv_idx).abs()
        return score - slopes[h].to(score.dtype) * dist.to(score.dtype)

    alibi_bias.slopes = slopes  # type: ignore[attr-defined]
    return additive(alibi_bias)


def tensor_bias(bias: torch.Tensor) -> ScoreMod:
    """A float tensor broadcastable to ``(B, H, Nq, Nk)`` added to the scores (SDPA's float
    ``attn_mask``; ``-inf`` entries mask). Indexed per block, never expanded."""
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise AttentionInputError(f"a float bias must be a floating-point tensor, got {type(bias).__name__}")
    m = bias
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dim() > 4:
        raise AttentionInputError(f"a float bias must have at most 4 dims (B, H, Nq, Nk), got {fmt_shape(bias)}")

    def float_mask(score, b, h, q_idx, kv_idx):
        value = m[b if m.shape[0] > 1 else 0, h if m.shape[1] > 1 else 0,
                  q_idx if m.shape[2] > 1 else 0, kv_idx if m.shape[3] > 1 else 0]
        return score + value.to(score.dtype)

    float_mask.tensor = m  # type: ignore[attr-defined]
    return additive(float_mask)


def query_scale(scale: torch.Tensor) -> ScoreMod:
    """``score * t[b, h, q_idx]`` for a per-query factor ``t`` broadcastable to
    ``(B, H, Nq, 1)`` (an inverse temperature per query)."""
    t = scale
    while t.dim() < 4:
        t = t.unsqueeze(0)

    def query_temperature(score, b, h, q_idx, kv_idx):
        value = t[b if t.shape[0] > 1 else 0, h if t.shape[1] > 1 else 0, q_idx if t.shape[2] > 1 else 0, 0]
        return score * value.to(score.dtype)

    query_temperature.tensor = t  # type: ignore[attr-defined]
    return query_temperature
