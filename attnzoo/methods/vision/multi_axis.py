"""Multi-axis attention (MaxViT): block attention and grid attention.

    block attention: windows of P_h × P_w cells (local):
        (r, c) sees (r', c') iff r // P_h == r' // P_h and c // P_w == c' // P_w
    grid attention: a fixed G_h × G_w grid over the image (global, dilated); with the
        grid padded to Hp × Wp (multiples of G) and strides s_h = Hp / G_h, s_w = Wp / G_w:
        (r, c) sees (r', c') iff r ≡ r' (mod s_h) and c ≡ c' (mod s_w)
        — the G_h·G_w cells spread over the whole image at stride (s_h, s_w)

"MaxViT: Multi-Axis Vision Transformer" (Tu et al., ECCV 2022): "blocked local and
dilated global attention". Block attention partitions the ``(H, W, C)`` map into
``(H/P × W/P, P × P, C)`` and attends within each window; grid attention grids it into
``(G × G, H/G × W/G, C)`` and attends along the ``G × G`` axis, i.e. among the cells
spread at stride ``H/G``. Both cost O(N) for fixed ``P = G = 7``, and together they give
global interaction in one block.

**How the two are combined in one call** (``mode``). In MaxViT they are two sequential
attention layers of a block (MBConv, block attention + FFN, grid attention + FFN), with
projections between them, which one attention call cannot hold. So:

* ``mode="block"``: block attention only; ``mode="grid"``: grid attention only. A MaxViT
  block is two layers, ``mode="block"`` then ``mode="grid"``;
* ``mode="split"`` (the default, [J]): both in parallel in one call, the first
  ``⌈Hq/2⌉`` query heads block attention, the rest grid attention (as CSWin splits its
  heads between stripe orientations), so one layer is local and global at once.

Judgement calls:

* [J] Padding: a grid that ``P`` or ``G`` does not divide is padded at the bottom and on
  the right (for grid attention, to multiples of ``G``, so the stride is ``Hp / G``);
  padded cells are absent (not keys, no outputs). MaxViT's code requires divisibility.
* [J] A block larger than the grid is clamped to it; a grid size ``G`` larger than an
  axis is clamped to the axis (every cell of that axis in one group).
* [J] ``block_size`` and ``grid_size`` may be ints or pairs ``(rows, cols)``.
* Self-attention only (``noncausal_self``); masks, key padding, score_mods and GQA are
  combined by AND with the pattern, evaluated at the gathered pairs only.

Complexity: time O(N·(P² + G²)·D), memory O(N·max(P², G²)) (``partition``); the
reference builds the dense N×N mask: O(N²).

Implementations:

* ``reference`` — dense masked softmax with :func:`multi_axis_mask` (the definition);
* ``partition`` — block heads over the window partition, grid heads over the dilated
  partition (:func:`attnzoo.kernels.grid2d.window_groups`,
  :func:`~attnzoo.kernels.grid2d.dilated_groups`), one SDPA each; never N×N;
* ``flex`` — FlexAttention with the same mask_mod (CPU: inference only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

from ...kernels.common import int_pair
from ...kernels.flex import flex_unsupported
from ...kernels.grid2d import check_grid, clamp_to_grid, dilated_groups, group_attention, head_kv, padded_size, \
    size_pair, sized_window, square_grid, window_groups
from ...kernels.masking import MaskMod
from ...kernels.windows import pattern_flex, pattern_reference
from ...registry import MethodOptions, method

NAME = "multi_axis"


def block_heads(heads: int, mode: str) -> int:
    """How many of ``heads`` query heads run block attention (the rest run grid attention)."""
    return {"block": heads, "grid": 0}.get(mode, (heads + 1) // 2)


def multi_axis_mask(grid, block_size, grid_size, heads: int, mode: str = "split") -> MaskMod:
    """MaxViT's pattern on ``grid=(H, W)`` (tokens row-major) for a call with ``heads``
    query heads: block attention for heads ``h < block_heads(heads, mode)``, grid
    attention for the others (see the module docstring). Carries ``cache_key``."""
    H, W = int_pair("multi_axis_mask: grid", grid)
    ph, pw = clamp_to_grid(size_pair("multi_axis_mask", "block_size", block_size), (H, W))
    gh, gw = clamp_to_grid(size_pair("multi_axis_mask", "grid_size", grid_size), (H, W))
    sh, sw = padded_size(H, gh) // gh, padded_size(W, gw) // gw  # the grid attention's strides
    nb = block_heads(int(heads), mode)

    def multi_axis(b, h, q_idx, kv_idx):
        qr, qc, kr, kc = q_idx // W, q_idx % W, kv_idx // W, kv_idx % W
        block = (qr // ph == kr // ph) & (qc // pw == kc // pw)
        dilated = (qr % sh == kr % sh) & (qc % sw == kc % sw)
        return torch.where(h < nb, block, dilated)

    multi_axis.cache_key = ("multi_axis", H, W, ph, pw, gh, gw, nb)  # type: ignore[attr-defined]
    return multi_axis


@dataclass(frozen=True)
class MultiAxisOptions(MethodOptions):
    """Options of ``multi_axis``.

    Attributes:
        grid: ``(H, W)``, the grid of the tokens (row-major, ``H·W = N``); required.
        block_size: ``P``, the block attention's window, an int or ``(rows, cols)`` (MaxViT: 7).
        grid_size: ``G``, the grid attention's fixed grid, an int or ``(rows, cols)`` (MaxViT: 7).
        mode: ``"split"`` (half the heads each, in parallel), ``"block"`` or ``"grid"``.
    """

    grid: Optional[tuple] = None
    block_size: Union[int, tuple] = 7
    grid_size: Union[int, tuple] = 7
    mode: Literal["split", "block", "grid"] = "split"

    def validate(self) -> None:
        if self.grid is not None:
            int_pair(f"{NAME}: grid", self.grid)
        size_pair(NAME, "block_size", self.block_size)
        size_pair(NAME, "grid_size", self.grid_size)

    @classmethod
    def for_length(cls, n: int) -> dict:
        """The most square grid of ``n`` tokens; ``P`` and ``G`` half its sides, at most
        MaxViT's 7 (``P = G = 7`` on 56 × 56)."""
        grid = square_grid(n)
        size = sized_window(grid, 7)
        return {"grid": grid, "block_size": size, "grid_size": size}


def _geometry(q, k, call):
    o = call.options
    grid = check_grid(NAME, o.grid, q, k)
    return (grid, clamp_to_grid(size_pair(NAME, "block_size", o.block_size), grid),
            clamp_to_grid(size_pair(NAME, "grid_size", o.grid_size), grid))


@method(NAME, options=MultiAxisOptions, paper="MaxViT: Multi-Axis Vision Transformer",
        summary="2-D: block (local window) and grid (dilated global) attention, split across heads or one of them",
        patterns=("noncausal_self",), time="O(N (P²+G²) D)", memory="O(N max(P², G²)); O(N^2) reference",
        score_mods=True, grid=True, rows_independent=False, short_impl="partition", mask_mods=(multi_axis_mask,))
def multi_axis(q, k, v, call):
    """Multi-axis attention as dense masked softmax (the definition, per head).

    q: (B, Hq, N, D), k: (B, Hkv, N, D), v: (B, Hkv, N, Dv) -> (B, Hq, N, Dv), N = H·W.
    """
    grid, block, gsize = _geometry(q, k, call)
    return pattern_reference(q, k, v, call, multi_axis_mask(grid, block, gsize, call.q_heads, call.options.mode))


@multi_axis.impl("partition", description="block heads over P×P windows, grid heads over the dilated G×G groups, "
                                         "one SDPA each; O(N·(P²+G²)), never N×N")
def partition(q, k, v, call):
    """Block attention and grid attention over their partitions, heads concatenated."""
    grid, block, gsize = _geometry(q, k, call)
    Hq = call.q_heads
    nb = block_heads(Hq, call.options.mode)
    outs = []
    for h0, h1, groups in ((0, nb, lambda: window_groups(grid, block, device=q.device)),
                           (nb, Hq, lambda: dilated_groups(grid, gsize, device=q.device))):
        if h1 == h0:
            continue
        kp, vp = head_kv(k, v, Hq, h0, h1)
        outs.append(group_attention(q[:, h0:h1], kp, vp, groups(), scale=call.scale, mask=call.mask,
                                    key_mask=call.key_mask, score_mod=call.score_mod, h0=h0))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


@multi_axis.impl("flex", supports=flex_unsupported,
                 description="FlexAttention with the same mask_mod (CPU: inference only)")
def flex(q, k, v, call):
    """FlexAttention with :func:`multi_axis_mask` (inference on CPU)."""
    grid, block, gsize = _geometry(q, k, call)
    return pattern_flex(q, k, v, call, multi_axis_mask(grid, block, gsize, call.q_heads, call.options.mode))
