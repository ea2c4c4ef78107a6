"""Shifted-window attention (Swin's SW-MSA): windows of a cyclically shifted grid, with
the region mask of the shifted partition.

    pad the H × W grid to Hp × Wp (multiples of the window wh × ww), roll it by
    (-sh, -sw):  cell (r, c) moves to (r', c') = ((r - sh) mod Hp, (c - sw) mod Wp)
    window of (r, c) = (r' // wh, c' // ww)
    region of (r, c) = 3·ρ(r', Hp, wh, sh) + ρ(c', Wp, ww, sw),
        ρ(i, n, w, s) = 0 if i < n - w,  1 if n - w <= i < n - s,  2 if i >= n - s
    (r, c) sees (r', c') iff same window and same region; softmax over those keys.

"Swin Transformer: Hierarchical Vision Transformer using Shifted Windows" (Liu et al.,
ICCV 2021): successive blocks alternate W-MSA (the method ``window``) and SW-MSA, whose
windows are displaced by ``(⌊M/2⌋, ⌊M/2⌋)``, so that information crosses window
borders. Swin computes it with a "cyclic shift toward the top-left": after the roll a
window may hold cells that were not adjacent in the image, and a mask (the region
labels above, Swin's ``img_mask`` built from ``h_slices`` and ``w_slices``) keeps
attention within each sub-window; the roll is undone afterwards. The same number of
windows as W-MSA, the same cost.

Judgement calls:

* [J] Padding: as in Swin's detection code, the grid is padded at the bottom and on the
  right to multiples of the window *before* the roll, and the region labels are those
  of the padded grid. Padded cells are absent (never attended, outputs dropped), where
  Swin-det attends to zero tokens there.
* [J] A window larger than the grid is clamped to it, and on an axis the window then
  covers, the shift is 0 (Swin: "if window size is larger than input resolution, we
  don't partition windows" and sets the shift to 0).
* [J] ``shift_size`` defaults to ``window_size // 2`` per axis (Swin's ``⌊M/2⌋``); it may
  be an int or a pair, and must satisfy ``0 <= shift < window`` (Swin's assertion).
  ``shift_size=0`` is W-MSA.
* Self-attention only (``noncausal_self``); masks, key padding, score_mods and GQA
  as in ``window`` (combined by AND, evaluated at the windowed pairs only).

Complexity: time O(N·wh·ww·D), memory O(N·wh·ww) (``partition``); the reference builds
the dense N×N mask: O(N²).

Implementations:

* ``reference`` — dense masked softmax with :func:`shifted_window_mask` (the definition
  above, in the tokens' own coordinates: no roll);
* ``partition`` — the roll folded into the gather indices of the windows
  (:func:`attnzoo.kernels.grid2d.window_groups` with ``shift``), the region mask per
  window, one SDPA over ``(B·nW, H, wh·ww, D)``, merged back (the inverse roll);
* ``flex`` — FlexAttention with the same mask_mod (CPU: inference only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ...errors import AttentionInputError
from ...kernels.common import int_pair
from ...kernels.flex import flex_unsupported
from ...kernels.grid2d import check_grid, clamp_to_grid, group_attention, padded_size, size_pair, sized_window, \
    square_grid, window_groups
from ...kernels.masking import MaskMod
from ...kernels.windows import pattern_flex, pattern_reference
from ...registry import MethodOptions, method

NAME = "shifted_window"


def _resolve(grid, window_size, shift_size) -> tuple:
    """``(window, shift)`` on ``grid``: the window clamped to the grid, the shift
    (default half the window) 0 on an axis the window covers."""
    H, W = grid
    given = size_pair(NAME, "window_size", window_size)
    ws = clamp_to_grid(given, (H, W))
    sh = tuple(w // 2 for w in given) if shift_size is None else size_pair(NAME, "shift_size", shift_size, 0)
    for s, w, axis in zip(sh, given, ("rows", "cols")):
        if not 0 <= s < w:
            raise AttentionInputError(
                f"{NAME}: shift_size must satisfy 0 <= shift < window_size on every axis, got shift {s} and window "
                f"{w} on the {axis}")
    shift = tuple(0 if w == n else s for s, w, n in zip(sh, ws, (H, W)))
    return ws, shift


def shifted_window_mask(grid, window_size, shift_size=None) -> MaskMod:
    """Swin's SW-MSA pattern on ``grid=(H, W)`` (tokens row-major), in the tokens' own
    coordinates: two cells attend iff, after the roll of the padded grid by
    ``-shift``, they are in the same window and the same region of Swin's region mask
    (see the module docstring). Carries ``cache_key``."""
    H, W = int_pair("shifted_window_mask: grid", grid)
    (wh, ww), (sh, sw) = _resolve((H, W), window_size, shift_size)
    Hp, Wp = padded_size(H, wh), padded_size(W, ww)

    def region(i, n, w, s):  # Swin's slices (0, -w), (-w, -s), (-s, None) on the rolled axis
        return (i >= n - w).long() + (i >= n - s).long() if s else i * 0

    def swin_shifted_window(b, h, q_idx, kv_idx):
        qr, qc = (q_idx // W - sh) % Hp, (q_idx % W - sw) % Wp  # rolled coordinates
        kr, kc = (kv_idx // W - sh) % Hp, (kv_idx % W - sw) % Wp
        same_window = (qr // wh == kr // wh) & (qc // ww == kc // ww)
        same_region = (region(qr, Hp, wh, sh) == region(kr, Hp, wh, sh)) & \
                      (region(qc, Wp, ww, sw) == region(kc, Wp, ww, sw))
        return same_window & same_region

    swin_shifted_window.cache_key = ("shifted_window", H, W, wh, ww, sh, sw)  # type: ignore[attr-defined]
    return swin_shifted_window


@dataclass(frozen=True)
class ShiftedWindowOptions(MethodOptions):
    """Options of ``shifted_window``.

    Attributes:
        grid: ``(H, W)``, the grid of the tokens (row-major, ``H·W = N``); required.
        window_size: the window, an int or ``(wh, ww)`` (Swin: 7); clamped to the grid.
        shift_size: the cyclic shift, an int or ``(sh, sw)`` with ``0 <= shift < window``;
            None: ``window_size // 2`` (Swin's ⌊M/2⌋).
    """

    grid: Optional[tuple] = None
    window_size: Union[int, tuple] = 7
    shift_size: Union[None, int, tuple] = None

    def validate(self) -> None:
        if self.grid is not None:
            int_pair(f"{NAME}: grid", self.grid)
        given = size_pair(NAME, "window_size", self.window_size)
        _resolve(given, given, self.shift_size)  # the shift against the unclamped window

    @classmethod
    def for_length(cls, n: int) -> dict:
        """The most square grid of ``n`` tokens, windows of half its sides (at most 7 × 7),
        shifted by half a window (``(7, 7)`` shifted by ``(3, 3)`` on 56 × 56)."""
        grid = square_grid(n)
        return {"grid": grid, "window_size": sized_window(grid, 7)}


def _geometry(q, k, call):
    o = call.options
    grid = check_grid(NAME, o.grid, q, k)
    ws, shift = _resolve(grid, o.window_size, o.shift_size)
    return grid, ws, shift


@method(NAME, options=ShiftedWindowOptions,
        paper="Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
        summary="2-D: windows of the cyclically shifted grid with Swin's region mask (SW-MSA)",
        patterns=("noncausal_self",), time="O(N w² D)", memory="O(N w²); O(N^2) reference", score_mods=True,
        grid=True, rows_independent=False, short_impl="partition", mask_mods=(shifted_window_mask,))
def shifted_window(q, k, v, call):
    """Shifted-window attention as dense masked softmax (the definition).

    q: (B, Hq, N, D), k: (B, Hkv, N, D), v: (B, Hkv, N, Dv) -> (B, Hq, N, Dv), N = H·W.
    """
    grid, ws, shift = _geometry(q, k, call)
    return pattern_reference(q, k, v, call, shifted_window_mask(grid, ws, shift))


@shifted_window.impl("partition", description="the roll folded into the window gathers, Swin's region mask per "
                                              "window, one SDPA over (B·windows, H, wh·ww, D); O(N·w²)")
def partition(q, k, v, call):
    """Cyclic shift + window partition + region mask, SDPA per window, merge (inverse shift)."""
    grid, ws, shift = _geometry(q, k, call)
    return group_attention(q, k, v, window_groups(grid, ws, shift, device=q.device), scale=call.scale,
                           mask=call.mask, key_mask=call.key_mask, score_mod=call.score_mod)


@shifted_window.impl("flex", supports=flex_unsupported,
                     description="FlexAttention with the same mask_mod (CPU: inference only)")
def flex(q, k, v, call):
    """FlexAttention with :func:`shifted_window_mask` (inference on CPU)."""
    grid, ws, shift = _geometry(q, k, call)
    return pattern_flex(q, k, v, call, shifted_window_mask(grid, ws, shift))
