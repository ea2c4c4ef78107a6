"""Axial attention: attention along the rows and along the columns of the grid.

    A_row: (r, c) attends to its row    (r, c'), c' = 0..W-1  (softmax over W keys)
    A_col: (r, c) attends to its column (r', c), r' = 0..H-1  (softmax over H keys)
    mode="row_column" (default):  O = A_col (A_row V)   — row then column: global in one call
    mode="row": O = A_row V;  mode="column": O = A_col V
    mode="split": the first ⌈Hq/2⌉ heads A_row V, the others A_col V (in parallel)

"Axial Attention in Multidimensional Transformers" (Ho et al., 2019): attention over
one axis of the tensor at a time; a row layer followed by a column layer gives every
position a global receptive field at O(N·(H + W)) cost instead of O(N²). Axial-DeepLab
("Axial-DeepLab: Stand-Alone Axial-Attention for Panoptic Segmentation", Wang et al.,
ECCV 2020) factorises 2-D attention the same way, height-axis then width-axis.

Judgement calls:

* [J] ``row_column`` is the two axial layers with their projections tied: the column
  pass takes the same queries and keys and, as values, the row pass's output per query
  head. The models' two separate layers (with their own projections in between) are two
  calls with ``mode="row"`` and ``mode="column"``. The weights returned by the reference
  are ``A_col·A_row``.
* [J] Masks, key padding and score_mods are combined with the axis pattern in every
  pass (in the column pass a padded key position still carries no value).
* [J] ``split`` gives the odd head to the rows (as ``cross_shaped`` does).
* Self-attention only (``noncausal_self``); no padding is needed (rows and columns tile
  any grid); GQA works.

Complexity: time O(N·(H + W)·D), memory O(N·max(H, W)) (``axes``); the reference builds
the dense N×N matrices: O(N²).

Implementations:

* ``reference`` — the dense N×N row and column weights, applied as ``mode`` says;
* ``axes`` — rows and columns as groups (:func:`attnzoo.kernels.grid2d.window_groups`
  with windows ``(1, W)`` and ``(H, 1)``), one SDPA per pass over ``(B·H, Hq, W, D)`` and
  ``(B·W, Hq, H, D)``; never N×N;
* ``flex`` — FlexAttention with the axis mask_mod (modes ``row``, ``column``, ``split``;
  CPU: inference only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ...errors import AttentionInputError
from ...kernels.common import int_pair, repeat_kv
from ...kernels.flex import flex_unsupported
from ...kernels.grid2d import check_grid, group_attention, head_kv, pattern_weights, square_grid, window_groups
from ...kernels.masking import MaskMod
from ...kernels.windows import pattern_flex
from ...registry import MethodOptions, method

NAME = "axial"


def row_heads(heads: int, mode: str) -> int:
    """How many of ``heads`` query heads attend along the rows in a one-pass ``mode``."""
    return {"row": heads, "column": 0}.get(mode, (heads + 1) // 2)


def axial_mask(grid, axis: str, heads: int = 1) -> MaskMod:
    """The axial pattern on ``grid=(H, W)`` (tokens row-major): ``axis="row"`` (same row),
    ``"column"`` (same column) or ``"split"`` (the row for heads ``h < ⌈heads/2⌉``, the
    column for the others). Carries ``cache_key``."""
    H, W = int_pair("axial_mask: grid", grid)
    if axis not in ("row", "column", "split"):
        raise AttentionInputError(f"axial_mask: axis must be 'row', 'column' or 'split', got {axis!r}")
    nr = row_heads(int(heads), axis)

    def axial(b, h, q_idx, kv_idx):
        same_row, same_col = q_idx // W == kv_idx // W, q_idx % W == kv_idx % W
        if axis == "split":
            return torch.where(h < nr, same_row, same_col)
        return same_row if axis == "row" else same_col

    axial.cache_key = ("axial", H, W, axis, nr if axis == "split" else None)  # type: ignore[attr-defined]
    return axial


@dataclass(frozen=True)
class AxialOptions(MethodOptions):
    """Options of ``axial``.

    Attributes:
        grid: ``(H, W)``, the grid of the tokens (row-major, ``H·W = N``); required.
        mode: ``"row_column"`` (row then column, ``A_col (A_row V)``), ``"row"``, ``"column"``
            or ``"split"`` (half the heads along each axis).
    """

    grid: Optional[tuple] = None
    mode: Literal["row_column", "row", "column", "split"] = "row_column"

    def validate(self) -> None:
        if self.grid is not None:
            int_pair(f"{NAME}: grid", self.grid)

    @classmethod
    def for_length(cls, n: int) -> dict:
        """The most square grid of ``n`` tokens."""
        return {"grid": square_grid(n)}


def _grid(q, k, call):
    return check_grid(NAME, call.options.grid, q, k)


@method(NAME, options=AxialOptions, paper="Axial Attention in Multidimensional Transformers",
        summary="2-D: attention along the rows then the columns (or one axis, or half the heads each)",
        patterns=("noncausal_self",), time="O(N (H+W) D)", memory="O(N max(H, W)); O(N^2) reference",
        score_mods=True, grid=True, rows_independent=False, short_impl="axes", mask_mods=(axial_mask,))
def axial(q, k, v, call):
    """Axial attention with the explicit N×N row and column weights.

    q: (B, Hq, N, D), k: (B, Hkv, N, D), v: (B, Hkv, N, Dv) -> (B, Hq, N, Dv), N = H·W.
    """
    grid = _grid(q, k, call)
    mode = call.options.mode
    kw = dict(scale=call.scale, mask=call.mask, key_mask=call.key_mask, score_mod=call.score_mod)
    if mode == "row_column":
        a_row = pattern_weights(q, k, pattern=axial_mask(grid, "row"), **kw)
        a_col = pattern_weights(q, k, pattern=axial_mask(grid, "column"), **kw)
        weights = a_col @ a_row
    else:
        weights = pattern_weights(q, k, pattern=axial_mask(grid, mode, call.q_heads), **kw)
    out = (weights @ repeat_kv(v, call.q_heads).to(weights.dtype)).to(q.dtype)
    return (out, weights.to(q.dtype)) if call.return_weights else out


@axial.impl("axes", description="rows and columns as groups, one SDPA per pass over (B·H, Hq, W, D) / "
                                "(B·W, Hq, H, D); O(N·(H+W)), never N×N")
def axes(q, k, v, call):
    """Row attention and/or column attention as batched SDPA over the rows / columns."""
    H, W = _grid(q, k, call)
    mode, Hq = call.options.mode, call.q_heads
    rows = lambda: window_groups((H, W), (1, W), device=q.device)  # noqa: E731
    cols = lambda: window_groups((H, W), (H, 1), device=q.device)  # noqa: E731
    kw = dict(scale=call.scale, mask=call.mask, key_mask=call.key_mask, score_mod=call.score_mod)
    if mode == "row_column":
        out = group_attention(q, k, v, rows(), **kw)
        return group_attention(q, repeat_kv(k, Hq), out, cols(), **kw)
    nr = row_heads(Hq, mode)
    outs = []
    for h0, h1, groups in ((0, nr, rows), (nr, Hq, cols)):
        if h1 > h0:
            kp, vp = head_kv(k, v, Hq, h0, h1)
            outs.append(group_attention(q[:, h0:h1], kp, vp, groups(), h0=h0, **kw))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _flex_supports(call):
    if call.options.mode == "row_column":
        return "FlexAttention computes one pass (mode 'row', 'column' or 'split')"
    return flex_unsupported(call)


@axial.impl("flex", supports=_flex_supports,
            description="FlexAttention with the axis mask_mod (one-pass modes; CPU: inference only)")
def flex(q, k, v, call):
    """FlexAttention with :func:`axial_mask` (inference on CPU)."""
    return pattern_flex(q, k, v, call, axial_mask(_grid(q, k, call), call.options.mode, call.q_heads))
