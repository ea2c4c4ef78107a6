"""Criss-cross attention (CCNet): each pixel attends to its row and its column.

    keys of (r, c): the H + W - 1 cells of row r and column c (itself once)
    A_(r,c),(r',c') = softmax over those keys of scale · q_(r,c)·k_(r',c')  (one softmax)
    one pass:   O = A V
    passes = 2: O = A (A V)   — every pixel reaches every pixel: (r, c) -> (r, c') -> (r', c')

"CCNet: Criss-Cross Attention for Semantic Segmentation" (Huang et al., ICCV 2019):
the criss-cross attention module gathers, for every pixel, the context on its
horizontal and vertical paths with one softmax over the ``H + W - 1`` affinities (the
pixel itself is counted once: CCNet's code puts ``-inf`` on the diagonal of the
vertical energies), and the *recurrent* criss-cross attention (RCCA) applies it twice,
"R = 2", so that every pixel gathers the context of the whole image, at "11x less GPU
memory" than a non-local block.

**What one call computes, and how the two passes run.** One call with the default
``passes=1`` is one criss-cross pass: ``A V``. CCNet's second pass recomputes Q, K and V
from the first pass's output with the same 1 × 1 convolutions (shared weights) — the
projections live in the layer, not in the call, so RCCA is two applications of one
attention layer, e.g. ``attn = attnzoo.Attention(dim, heads, method="criss_cross",
grid=(H, W)); y = x + attn(x); y = y + attn(y)``. ``passes=2`` ([J]) is the
attention-level form of the recurrence: the second pass reuses the first pass's
weights, ``O = A (A V)`` (RCCA with Q and K held fixed), which reaches every pixel in one
call; the returned weights are then ``A²``.

Judgement calls:

* [J] Masks, key padding and score_mods are combined with the criss-cross pattern
  before the softmax (so they hold in both passes of ``passes=2``; in the second pass
  a padded key position still carries no value).
* Self-attention only (``noncausal_self``); no padding rule is needed (rows and columns
  tile any grid); a 1 × N grid is plain attention along the row. GQA works.

Complexity: time O(N·(H + W)·D) per pass, memory O(N·(H + W)) (``rowcol``); the
reference builds the dense N×N matrix: O(N²).

Implementations:

* ``reference`` — the dense N×N weights of :func:`criss_cross_mask` (the definition),
  applied ``passes`` times;
* ``rowcol`` — CCNet's own form: the row energies ``(…, H, W, W)`` and the column
  energies ``(…, H, W, H)`` (diagonal excluded) by batched matmuls over the rows and the
  columns, one softmax over their concatenation, the two weighted sums of V; no gather,
  never N×N;
* ``flex`` — FlexAttention with the same mask_mod (``passes=1``; CPU: inference only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...errors import AttentionInputError
from ...kernels.common import compute_dtype, int_pair, repeat_kv
from ...kernels.flex import flex_unsupported
from ...kernels.grid2d import check_grid, pair_allowed, pattern_weights, square_grid
from ...kernels.masking import MaskMod
from ...kernels.windows import pattern_flex
from ...registry import MethodOptions, method

NAME = "criss_cross"


def criss_cross_mask(grid) -> MaskMod:
    """CCNet's pattern on ``grid=(H, W)`` (tokens row-major): ``(r, c)`` sees ``(r', c')``
    iff ``r == r'`` or ``c == c'``. Carries ``cache_key``."""
    H, W = int_pair("criss_cross_mask: grid", grid)

    def criss_cross(b, h, q_idx, kv_idx):
        return (q_idx // W == kv_idx // W) | (q_idx % W == kv_idx % W)

    criss_cross.cache_key = ("criss_cross", H, W)  # type: ignore[attr-defined]
    return criss_cross


@dataclass(frozen=True)
class CrissCrossOptions(MethodOptions):
    """Options of ``criss_cross``.

    Attributes:
        grid: ``(H, W)``, the grid of the tokens (row-major, ``H·W = N``); required.
        passes: how many times the criss-cross weights are applied (1: one pass, ``A V``;
            2: ``A (A V)``, every pixel reaches every pixel; see the module docstring).
    """

    grid: Optional[tuple] = None
    passes: int = 1

    def validate(self) -> None:
        if self.grid is not None:
            int_pair(f"{NAME}: grid", self.grid)
        if self.passes < 1:
            raise AttentionInputError(f"{NAME}: passes must be a positive int, got {self.passes!r}")

    @classmethod
    def for_length(cls, n: int) -> dict:
        """The most square grid of ``n`` tokens (row and column: ``2√n`` keys per query)."""
        return {"grid": square_grid(n)}


def _grid(q, k, call):
    return check_grid(NAME, call.options.grid, q, k)


@method(NAME, options=CrissCrossOptions, paper="CCNet: Criss-Cross Attention for Semantic Segmentation",
        summary="2-D: each pixel attends to its row and column under one softmax (CCNet); passes=2 applies it twice",
        patterns=("noncausal_self",), time="O(N (H+W) D) per pass", memory="O(N (H+W)); O(N^2) reference",
        score_mods=True, grid=True, rows_independent=False, short_impl="rowcol", mask_mods=(criss_cross_mask,))
def criss_cross(q, k, v, call):
    """Criss-cross attention with the explicit N×N weights, applied ``passes`` times.

    q: (B, Hq, N, D), k: (B, Hkv, N, D), v: (B, Hkv, N, Dv) -> (B, Hq, N, Dv), N = H·W.
    Returns the weights ``A^passes`` with ``return_weights``.
    """
    grid = _grid(q, k, call)
    A = pattern_weights(q, k, scale=call.scale, pattern=criss_cross_mask(grid), mask=call.mask,
                        key_mask=call.key_mask, score_mod=call.score_mod)
    out = A @ repeat_kv(v, call.q_heads).to(A.dtype)
    weights = A
    for _ in range(call.options.passes - 1):
        out = A @ out
        weights = A @ weights
    out = out.to(q.dtype)
    return (out, weights.to(q.dtype)) if call.return_weights else out


def _allowed(call, qi, ki, extra=None):
    """The call's mask at the energies' pairs ``qi``, ``ki`` (layout ``(1, A, 1, C, K)``: the
    head axis at dim 2), moved to ``(B|1, Hq|1, A, C, K)``, with ``extra`` ANDed; or None."""
    out = None
    if call.mask is not None or call.key_mask is not None:
        out = pair_allowed(qi, ki, batch=call.batch, heads=call.q_heads, mask=call.mask,
                           key_mask=call.key_mask).transpose(1, 2)
    if extra is not None:
        out = extra if out is None else out & extra
    return out


def _scores(call, e, qi, ki, allowed):
    """The call's score_mod and mask on energies ``e (B, Hq, A, C, K)`` (-inf where masked)."""
    if call.score_mod is not None:
        b = torch.arange(call.batch, device=e.device).view(-1, 1, 1, 1, 1)
        h = torch.arange(call.q_heads, device=e.device).view(1, -1, 1, 1, 1)
        e = call.score_mod(e, b, h, qi.transpose(1, 2), ki.transpose(1, 2)).expand(e.shape)
    return e if allowed is None else e.masked_fill(~allowed, float("-inf"))


@criss_cross.impl("rowcol", description="row energies (per row) and column energies (per column) by batched "
                                        "matmuls, one softmax over both, two weighted sums of V (CCNet's form); "
                                        "O(N·(H+W)), never N×N")
def rowcol(q, k, v, call):
    """CCNet's criss-cross attention: energies along the rows (batched over the rows) and
    along the columns (batched over the columns, the pixel itself excluded), one softmax
    over both (a shared, detached maximum and a shared denominator, so the two layouts
    never need concatenating), applied ``passes`` times."""
    H, W = _grid(q, k, call)
    B, Hq, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    g = Hq // Hkv
    ct, dev = compute_dtype(q.dtype), q.device
    qr = (q.to(ct) * call.scale).view(B, Hkv, g, H, W, D)
    kr = k.to(ct).view(B, Hkv, 1, H, W, D)
    vr = v.to(ct).view(B, Hkv, 1, H, W, Dv)
    # row layout (rows, cols, keys): pixel (r, c) and key (r, c'); column layout (cols, rows, keys): key (r', c)
    rr, cc = torch.arange(H, device=dev), torch.arange(W, device=dev)
    qi_row = (rr.view(1, H, 1, 1, 1) * W + cc.view(1, 1, 1, W, 1))
    ki_row = rr.view(1, H, 1, 1, 1) * W + cc.view(1, 1, 1, 1, W)
    qi_col = rr.view(1, 1, 1, H, 1) * W + cc.view(1, W, 1, 1, 1)
    ki_col = rr.view(1, 1, 1, 1, H) * W + cc.view(1, W, 1, 1, 1)
    not_self = (rr.view(1, 1, 1, H, 1) != rr.view(1, 1, 1, 1, H))  # the pixel is a key of its row only
    e_row = (qr @ kr.transpose(-1, -2)).view(B, Hq, H, W, W)
    e_col = (qr.transpose(3, 4) @ kr.transpose(3, 4).transpose(-1, -2)).view(B, Hq, W, H, H)
    e_row = _scores(call, e_row, qi_row, ki_row, _allowed(call, qi_row, ki_row))
    e_col = _scores(call, e_col, qi_col, ki_col, _allowed(call, qi_col, ki_col, not_self))
    with torch.no_grad():  # softmax is shift-invariant: a detached shared maximum, finite for dead rows
        m = torch.maximum(e_row.amax(-1), e_col.amax(-1).transpose(-1, -2))
        m = m.masked_fill(torch.isinf(m), 0.0)
    p_row = torch.exp(e_row - m.unsqueeze(-1))
    p_col = torch.exp(e_col - m.transpose(-1, -2).unsqueeze(-1))
    z = p_row.sum(-1) + p_col.sum(-1).transpose(-1, -2)  # (B, Hq, H, W): >= 1 (the maximum's exp(0)), or
    z = z.masked_fill(z == 0, 1.0)  # 0 for a pixel that sees nothing: its weights stay 0, its gradients finite
    p_row = (p_row / z.unsqueeze(-1)).view(B, Hkv, g, H, W, W)
    p_col = (p_col / z.transpose(-1, -2).unsqueeze(-1)).view(B, Hkv, g, W, H, H)
    out = p_row @ vr + (p_col @ vr.transpose(3, 4)).transpose(3, 4)
    for _ in range(call.options.passes - 1):  # the values of the next pass: this pass's output, per query head
        out = p_row @ out + (p_col @ out.transpose(3, 4)).transpose(3, 4)
    return out.reshape(B, Hq, N, Dv).to(q.dtype)


def _flex_supports(call):
    if call.options.passes != 1:
        return "FlexAttention computes one pass (passes=1)"
    return flex_unsupported(call)


@criss_cross.impl("flex", supports=_flex_supports,
                  description="FlexAttention with the same mask_mod (passes=1; CPU: inference only)")
def flex(q, k, v, call):
    """FlexAttention with :func:`criss_cross_mask` (inference on CPU)."""
    return pattern_flex(q, k, v, call, criss_cross_mask(_grid(q, k, call)))
