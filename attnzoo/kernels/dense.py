"""Dense attention with explicit ``(B, Hq, Nq, Nk)`` matrices: the core of the references.

    S = scale · Q Kᵀ  [-> score_mod]       P = softmax(S) over the allowed keys      O = P V

Every reduction runs in float32 for half inputs (float64 stays float64). A query row
with nothing allowed gets P = 0 and O = 0, never NaN.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import score_mods
from .common import compute_dtype, repeat_kv
from .masking import make_masker


def masked_softmax(s: torch.Tensor, allowed: Optional[torch.Tensor], *, inplace: bool = False) -> torch.Tensor:
    """Row softmax of ``s`` over the allowed entries; a row with nothing allowed — masked
    out, or all ``-inf`` scores (a float mask) — gives zeros, never NaN, and a zero
    gradient. ``inplace``: for scores no graph needs, masked in place, so the softmax is
    the one new score-sized tensor (four otherwise)."""
    if allowed is not None:
        s = s.masked_fill_(~allowed, float("-inf")) if inplace else s.masked_fill(~allowed, float("-inf"))
    dead = torch.isneginf(s).all(dim=-1, keepdim=True)
    if inplace:
        if not bool(dead.any()):
            return torch.softmax(s, dim=-1)
        return torch.softmax(s.masked_fill_(dead, 0.0), dim=-1).masked_fill_(dead, 0.0)
    return torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def mask_future_(s: torch.Tensor, qs: int, offset: int, value: float = float("-inf")) -> torch.Tensor:
    """In place: ``value`` where a key is later than its query (lower-right causal), on a
    score block ``s (..., n, m)`` whose rows are queries ``qs .. qs + n - 1`` and whose
    columns are keys ``0 .. m - 1``. Only the columns past the block's first query are
    touched (a triangle, not the whole block): the other keys are visible to every row."""
    n, m = s.shape[-2], s.shape[-1]
    first = qs + offset + 1  # the first key the block's first query may not see
    start = max(first, 0)
    if start >= m:
        return s
    tri = torch.ones(n, m - start, dtype=torch.bool, device=s.device).triu(diagonal=first - start)
    s[..., start:].masked_fill_(tri, value)
    return s


def scores(q: torch.Tensor, k: torch.Tensor, scale: float, score_mod: Optional[Callable] = None) -> torch.Tensor:
    """``score_mod(scale · Q Kᵀ)``: ``(B, Hq, Nq, Nk)`` in the compute dtype (k repeated to
    the query heads)."""
    B, Hq = q.shape[0], q.shape[1]
    ct = compute_dtype(q.dtype)
    s = (q.to(ct) @ repeat_kv(k, Hq).to(ct).transpose(-1, -2)) * scale
    return score_mods.apply(score_mod, s, 0, 0, batch=B, heads=Hq)


def softmax_attention(q, k, v, *, scale: float, causal: bool = False, mask=None, key_mask=None,
                      score_mod: Optional[Callable] = None, dropout_p: float = 0.0, return_weights: bool = False):
    """Softmax attention with explicit N×N matrices.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv) in q's
    dtype (and the ``(B, Hq, Nq, Nk)`` weights with ``return_weights``). ``mask``: a bool
    tensor broadcastable to (B, Hq, Nq, Nk) or a mask_mod; ``key_mask``: (B, Nk) bool,
    True = real key; ``causal``: lower-right aligned.
    """
    ct = compute_dtype(q.dtype)
    s = scores(q, k, scale, score_mod)
    p = masked_softmax(s, make_masker(q, k, causal, mask, key_mask).full())
    weights = p
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    out = (p @ repeat_kv(v, q.shape[1]).to(ct)).to(q.dtype)
    return (out, weights.to(q.dtype)) if return_weights else out
