"""Window attention (Swin's W-MSA): softmax inside non-overlapping windows of the grid.

    tokens: the cells of an H × W grid in row-major order (``grid=(H, W)``, N = H·W)
    windows of wh × ww cells: cell (r, c) is in window (r // wh, c // ww)
    O_(r,c) = Σ_{(r',c') in the window of (r,c)} softmax(scale · q_(r,c)·k_(r',c')) v_(r',c')

"Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (Liu et al.,
ICCV 2021), window-based multi-head self-attention (W-MSA): the image is partitioned
into non-overlapping ``M × M`` windows and self-attention runs inside each, linear in
the number of tokens for a fixed ``M`` (Swin's ``M = 7``). The shifted form, SW-MSA,
is the method ``shifted_window``.

Judgement calls:

* [J] Padding: a grid the window does not divide is padded at the bottom and on the
  right to multiples of the window (Swin's detection code pads the same way). Padded
  cells are absent: the partial windows at the bottom and right edges hold only their
  real cells, no query attends to a padded cell. Swin-det attends to zero-padded
  tokens instead; here the result does not depend on padding content and equals the
  mask "same window of the padded partition".
* [J] A window larger than the grid is clamped to it per axis (Swin: "if the input
  resolution is smaller than the window size, we don't partition windows"), so the
  defaults run on any grid, 1 × N included (there the windows are row segments).
* [J] ``window_size`` may be an int or a pair ``(wh, ww)``.
* Self-attention only (``noncausal_self``): the windows are positions of the query's
  own grid. ``mask``/mask_mod, ``key_padding_mask`` and score_mods (float masks) are
  combined with the windows by AND (evaluated at the windowed pairs only); GQA works.

Complexity: time O(N·wh·ww·D), memory O(N·wh·ww) (``partition``); the reference builds
the dense N×N mask: O(N²).

Implementations:

* ``reference`` — dense masked softmax with :func:`window_mask` (the definition);
* ``partition`` — gather the windows (:func:`attnzoo.kernels.grid2d.window_groups`),
  one ``scaled_dot_product_attention`` over ``(B·nW, H, wh·ww, D)`` (no mask at all when
  the windows divide the grid and no mask is given), merge back; never N×N;
* ``flex`` — FlexAttention with the same mask_mod (CPU: inference only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ...kernels.common import int_pair
from ...kernels.flex import flex_unsupported
from ...kernels.grid2d import check_grid, clamp_to_grid, group_attention, size_pair, sized_window, square_grid, \
    window_groups
from ...kernels.masking import MaskMod
from ...kernels.windows import pattern_flex, pattern_reference
from ...registry import MethodOptions, method

NAME = "window"


def window_mask(grid, window_size) -> MaskMod:
    """Swin's W-MSA pattern on ``grid=(H, W)`` (tokens row-major): query ``(r, c)`` sees
    key ``(r', c')`` iff ``r // wh == r' // wh`` and ``c // ww == c' // ww``, with the
    window ``(wh, ww)`` clamped to the grid. Carries ``cache_key``."""
    H, W = int_pair("window_mask: grid", grid)
    wh, ww = clamp_to_grid(size_pair("window_mask", "window_size", window_size), (H, W))

    def swin_window(b, h, q_idx, kv_idx):
        same_rows = (q_idx // W) // wh == (kv_idx // W) // wh
        return same_rows & ((q_idx % W) // ww == (kv_idx % W) // ww)

    swin_window.cache_key = ("window", H, W, wh, ww)  # type: ignore[attr-defined]
    return swin_window


@dataclass(frozen=True)
class WindowOptions(MethodOptions):
    """Options of ``window``.

    Attributes:
        grid: ``(H, W)``, the grid of the tokens (row-major, ``H·W = N``); required.
        window_size: the window, an int or ``(wh, ww)`` (Swin: 7); clamped to the grid.
    """

    grid: Optional[tuple] = None
    window_size: Union[int, tuple] = 7

    def validate(self) -> None:
        if self.grid is not None:
            int_pair(f"{NAME}: grid", self.grid)
        size_pair(NAME, "window_size", self.window_size)

    @classmethod
    def for_length(cls, n: int) -> dict:
        """The most square grid of ``n`` tokens and windows of half its sides (a quarter
        of the tokens), at most Swin's 7 × 7: ``(7, 7)`` on 56 × 56 and 112 × 112."""
        grid = square_grid(n)
        return {"grid": grid, "window_size": sized_window(grid, 7)}


def _window(q, k, call):
    o = call.options
    grid = check_grid(NAME, o.grid, q, k)
    return grid, clamp_to_grid(size_pair(NAME, "window_size", o.window_size), grid)


@method(NAME, options=WindowOptions, paper="Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
        summary="2-D: softmax inside non-overlapping wh × ww windows of the grid (Swin W-MSA)",
        patterns=("noncausal_self",), time="O(N w² D)", memory="O(N w²); O(N^2) reference", score_mods=True,
        grid=True, rows_independent=False, short_impl="partition", mask_mods=(window_mask,))
def window(q, k, v, call):
    """Window attention as dense masked softmax (the definition).

    q: (B, Hq, N, D), k: (B, Hkv, N, D), v: (B, Hkv, N, Dv) -> (B, Hq, N, Dv), N = H·W.
    """
    grid, ws = _window(q, k, call)
    return pattern_reference(q, k, v, call, window_mask(grid, ws))


@window.impl("partition", description="gather the windows, one SDPA over (B·windows, H, wh·ww, D), merge; O(N·w²), "
                                      "never N×N")
def partition(q, k, v, call):
    """Window partition, SDPA per window (batched), merge back."""
    grid, ws = _window(q, k, call)
    return group_attention(q, k, v, window_groups(grid, ws, device=q.device), scale=call.scale, mask=call.mask,
                           key_mask=call.key_mask, score_mod=call.score_mod)


@window.impl("flex", supports=flex_unsupported,
             description="FlexAttention with the same mask_mod (CPU: inference only)")
def flex(q, k, v, call):
    """FlexAttention with :func:`window_mask` (inference on CPU)."""
    grid, ws = _window(q, k, call)
    return pattern_flex(q, k, v, call, window_mask(grid, ws))
