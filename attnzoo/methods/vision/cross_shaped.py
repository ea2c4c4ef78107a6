"""Cross-shaped window attention (CSWin): horizontal and vertical stripes in parallel,
half of the heads each.

    stripes of width sw: horizontal stripe of cell (r, c) = rows [⌊r/sw⌋·sw, ⌊r/sw⌋·sw + sw), all columns
                         vertical stripe  of cell (r, c) = cols [⌊c/sw⌋·sw, ⌊c/sw⌋·sw + sw), all rows
    heads 0 .. ⌈Hq/2⌉-1: softmax over the horizontal stripe of the query
    heads ⌈Hq/2⌉ .. Hq-1: softmax over its vertical stripe

"CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows"
(Dong et al., CVPR 2022): "we split the K heads into two parallel groups (each has K/2
heads)": one group attends within horizontal stripes, the other within vertical
stripes, and together a layer sees a cross-shaped window; the stripe width grows with
depth (1, 2, 7, 7 across CSWin-T's stages at 56, 28, 14, 7 pixels). Its Locally-
enhanced Positional Encoding (LePE) — a depthwise 3 × 3 convolution of V inside each
stripe, added to the attention output — has parameters, so it is a layer option:
:class:`attnzoo.layers.vision.CrossShapedAttention` (``lepe=True``).

Judgement calls:

* [J] Heads: the first ``⌈Hq/2⌉`` query heads take the horizontal stripes, the rest the
  vertical ones (an odd head count gives the extra head to the horizontal group; with
  one head the layer is horizontal only). With GQA the query heads keep their kv heads.
* [J] Padding: a grid the stripe width does not divide is padded at the bottom
  (horizontal stripes) and on the right (vertical stripes); padded cells are absent,
  so the last stripe is narrower. A width larger than an axis is clamped to it (the
  stripe is then the whole grid, as CSWin's last stage).
* Self-attention only (``noncausal_self``); masks, key padding, score_mods and GQA are
  combined by AND with the stripes, evaluated at the gathered pairs only.

Complexity: time O(N·sw·(H + W)/2·D), memory O(N·sw·max(H, W)) (``stripes``); the
reference builds the dense N×N mask: O(N²).

Implementations:

* ``reference`` — dense masked softmax with :func:`cross_shaped_mask` (the definition,
  per head);
* ``stripes`` — the horizontal heads over ``(sw × W)`` stripe windows, the vertical
  heads over ``(H × sw)`` ones (:func:`attnzoo.kernels.grid2d.window_groups`), one SDPA
  each, heads concatenated; never N×N;
* ``flex`` — FlexAttention with the same mask_mod (CPU: inference only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...errors import AttentionInputError
from ...kernels.common import int_pair
from ...kernels.flex import flex_unsupported
from ...kernels.grid2d import check_grid, group_attention, head_kv, square_grid, window_groups
from ...kernels.masking import MaskMod
from ...kernels.windows import pattern_flex, pattern_reference
from ...registry import MethodOptions, method

NAME = "cross_shaped"


def horizontal_heads(heads: int) -> int:
    """How many of ``heads`` query heads take the horizontal stripes: ``⌈heads / 2⌉``."""
    return (heads + 1) // 2


def cross_shaped_mask(grid, stripe_width: int, heads: int) -> MaskMod:
    """CSWin's pattern on ``grid=(H, W)`` (tokens row-major) for a call with ``heads``
    query heads: heads ``h < ⌈heads/2⌉`` see the query's horizontal stripe
    (``r // sw == r' // sw``), the others its vertical stripe (``c // sw == c' // sw``).
    Carries ``cache_key``."""
    H, W = int_pair("cross_shaped_mask: grid", grid)
    sw = int(stripe_width)
    swh, sww = min(sw, H), min(sw, W)
    hh = horizontal_heads(int(heads))

    def cross_shaped(b, h, q_idx, kv_idx):
        horizontal = (q_idx // W) // swh == (kv_idx // W) // swh
        vertical = (q_idx % W) // sww == (kv_idx % W) // sww
        return torch.where(h < hh, horizontal, vertical)

    cross_shaped.cache_key = ("cross_shaped", H, W, swh, sww, hh)  # type: ignore[attr-defined]
    return cross_shaped


@dataclass(frozen=True)
class CrossShapedOptions(MethodOptions):
    """Options of ``cross_shaped``.

    Attributes:
        grid: ``(H, W)``, the grid of the tokens (row-major, ``H·W = N``); required.
        stripe_width: ``sw``, rows per horizontal stripe and columns per vertical stripe
            (CSWin: 1, 2, 7, 7 by stage); clamped to the grid.
    """

    grid: Optional[tuple] = None
    stripe_width: int = 7

    def validate(self) -> None:
        if self.grid is not None:
            int_pair(f"{NAME}: grid", self.grid)
        if self.stripe_width < 1:
            raise AttentionInputError(f"{NAME}: stripe_width must be a positive int, got {self.stripe_width!r}")

    @classmethod
    def for_length(cls, n: int) -> dict:
        """The most square grid of ``n`` tokens and stripes a quarter of its shorter side
        wide (a quarter of the tokens per stripe), at most 7 (CSWin's widest): 7 on
        56 × 56, 4 on 16 × 16."""
        grid = square_grid(n)
        return {"grid": grid, "stripe_width": max(1, min(7, -(-min(grid) // 4)))}


def _grid(q, k, call):
    return check_grid(NAME, call.options.grid, q, k)


@method(NAME, options=CrossShapedOptions,
        paper="CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows",
        summary="2-D: half the heads in horizontal stripes, half in vertical stripes (CSWin cross-shaped window)",
        patterns=("noncausal_self",), time="O(N sw (H+W) D)", memory="O(N sw max(H, W)); O(N^2) reference",
        score_mods=True, grid=True, rows_independent=False, short_impl="stripes", mask_mods=(cross_shaped_mask,))
def cross_shaped(q, k, v, call):
    """Cross-shaped window attention as dense masked softmax (the definition, per head).

    q: (B, Hq, N, D), k: (B, Hkv, N, D), v: (B, Hkv, N, Dv) -> (B, Hq, N, Dv), N = H·W.
    """
    grid = _grid(q, k, call)
    return pattern_reference(q, k, v, call, cross_shaped_mask(grid, call.options.stripe_width, call.q_heads))


@cross_shaped.impl("stripes", description="horizontal heads over sw×W stripes, vertical heads over H×sw stripes, "
                                         "one SDPA each; O(N·sw·(H+W)), never N×N")
def stripes(q, k, v, call):
    """The two head groups, each over its stripe partition, concatenated."""
    H, W = _grid(q, k, call)
    sw, Hq = call.options.stripe_width, call.q_heads
    hh = horizontal_heads(Hq)
    outs = []
    for h0, h1, window in ((0, hh, (min(sw, H), W)), (hh, Hq, (H, min(sw, W)))):
        if h1 == h0:
            continue
        kp, vp = head_kv(k, v, Hq, h0, h1)
        outs.append(group_attention(q[:, h0:h1], kp, vp, window_groups((H, W), window, device=q.device),
                                    scale=call.scale, mask=call.mask, key_mask=call.key_mask,
                                    score_mod=call.score_mod, h0=h0))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


@cross_shaped.impl("flex", supports=flex_unsupported,
                   description="FlexAttention with the same mask_mod (CPU: inference only)")
def flex(q, k, v, call):
    """FlexAttention with :func:`cross_shaped_mask` (inference on CPU)."""
    grid = _grid(q, k, call)
    return pattern_flex(q, k, v, call, cross_shaped_mask(grid, call.options.stripe_width, call.q_heads))
