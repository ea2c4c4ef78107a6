"""Blocked local attention with haloed keys (HaloNet).

    queries: non-overlapping blocks of bh × bw cells, block (i, j) = rows [i·bh, (i+1)·bh),
             cols [j·bw, (j+1)·bw)
    keys of block (i, j): the block grown by the halo, rows [i·bh - hh, (i+1)·bh + hh),
             cols [j·bw - hw, (j+1)·bw + hw), inside the image
    O_(r,c) = Σ_{keys of the block of (r,c)} softmax(scale · q_(r,c)·k) v

"Scaling Local Self-Attention for Parameter Efficient Visual Backbones" (Vaswani et
al., CVPR 2021), blocked local self-attention: instead of a window centred on every
pixel (a different key set per query), the queries of a ``b × b`` block share one key
set, the block plus a halo of ``h`` pixels, so a layer is a few large matmuls. HaloNet
uses ``b = 8, h = 3`` (keys 14 × 14). Each query's neighbourhood is not centred (a
query at a block corner sees up to ``b + h - 1`` cells on one side, ``h`` on the other).

Judgement calls:

* [J] Image borders: halo cells outside the image are not keys (masked out). HaloNet's
  and timm's code zero-pad the image, so their queries at the border also attend to
  zero keys with weight ``exp(0)``; here the result does not depend on the padding.
* [J] Padding: a grid the block does not divide is padded at the bottom and on the
  right to multiples of the block; padded cells are absent (not keys, no outputs).
* [J] ``block_size`` and ``halo_size`` may be ints or pairs ``(rows, cols)``; ``halo_size
  = 0`` is plain window attention; a block larger than the grid is clamped to it.
* Self-attention only (``noncausal_self``); masks, key padding, score_mods and GQA are
  combined by AND with the pattern, evaluated at the gathered pairs only.

Complexity: time O(N·(bh+2hh)(bw+2hw)·D), memory O(N·(bh+2hh)(bw+2hw)) (``blocked``);
the reference builds the dense N×N mask: O(N²).

Implementations:

* ``reference`` — dense masked softmax with :func:`halo_mask` (the definition);
* ``blocked`` — gather the query blocks and their haloed key blocks
  (:func:`attnzoo.kernels.grid2d.halo_groups`), one SDPA over
  ``(B·blocks, H, bh·bw, D) × (B·blocks, Hkv, (bh+2hh)(bw+2hw), D)`` with the
  out-of-image keys masked, merge back; never N×N;
* ``flex`` — FlexAttention with the same mask_mod (CPU: inference only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from ...kernels.common import int_pair
from ...kernels.flex import flex_unsupported
from ...kernels.grid2d import check_grid, clamp_to_grid, group_attention, halo_groups, size_pair, sized_window, \
    square_grid
from ...kernels.masking import MaskMod
from ...kernels.windows import pattern_flex, pattern_reference
from ...registry import MethodOptions, method

NAME = "halo"


def halo_mask(grid, block_size, halo_size) -> MaskMod:
    """HaloNet's pattern on ``grid=(H, W)`` (tokens row-major): query ``(r, c)`` in block
    ``(r // bh, c // bw)`` sees key ``(r', c')`` iff ``(r // bh)·bh - hh <= r' < (r // bh + 1)·bh
    + hh`` and the same for the columns (keys are cells of the image). The block is
    clamped to the grid. Carries ``cache_key``."""
    H, W = int_pair("halo_mask: grid", grid)
    bh, bw = clamp_to_grid(size_pair("halo_mask", "block_size", block_size), (H, W))
    hh, hw = size_pair("halo_mask", "halo_size", halo_size, 0)

    def haloed_block(b, h, q_idx, kv_idx):
        r0, c0 = (q_idx // W) // bh * bh, (q_idx % W) // bw * bw  # the query's block corner
        kr, kc = kv_idx // W, kv_idx % W
        rows = (kr >= r0 - hh) & (kr < r0 + bh + hh)
        return rows & (kc >= c0 - hw) & (kc < c0 + bw + hw)

    haloed_block.cache_key = ("halo", H, W, bh, bw, hh, hw)  # type: ignore[attr-defined]
    return haloed_block


@dataclass(frozen=True)
class HaloOptions(MethodOptions):
    """Options of ``halo``.

    Attributes:
        grid: ``(H, W)``, the grid of the tokens (row-major, ``H·W = N``); required.
        block_size: the query block, an int or ``(bh, bw)`` (HaloNet: 8).
        halo_size: the halo around each block, an int or ``(hh, hw)`` (HaloNet: 3).
    """

    grid: Optional[tuple] = None
    block_size: Union[int, tuple] = 8
    halo_size: Union[int, tuple] = 3

    def validate(self) -> None:
        if self.grid is not None:
            int_pair(f"{NAME}: grid", self.grid)
        size_pair(NAME, "block_size", self.block_size)
        size_pair(NAME, "halo_size", self.halo_size, 0)

    @classmethod
    def for_length(cls, n: int) -> dict:
        """The most square grid of ``n`` tokens, blocks of a quarter of its sides (at most
        HaloNet's 8) and a halo of half a block (at least 1, at most 3): keys ``(2·b)²``, about a
        quarter of a small grid; ``b = 8, h = 3`` on 56 × 56."""
        grid = square_grid(n)
        block = sized_window(grid, 8, divisor=4)
        return {"grid": grid, "block_size": block, "halo_size": tuple(min(3, max(1, b // 2)) for b in block)}


def _geometry(q, k, call):
    o = call.options
    grid = check_grid(NAME, o.grid, q, k)
    return grid, clamp_to_grid(size_pair(NAME, "block_size", o.block_size), grid), \
        size_pair(NAME, "halo_size", o.halo_size, 0)


@method(NAME, options=HaloOptions, paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones",
        summary="2-D: query blocks attend to their block grown by a halo (HaloNet blocked local attention)",
        patterns=("noncausal_self",), time="O(N (b+2h)² D)", memory="O(N (b+2h)²); O(N^2) reference",
        score_mods=True, grid=True, rows_independent=False, short_impl="blocked", mask_mods=(halo_mask,))
def halo(q, k, v, call):
    """Blocked local attention with haloed keys as dense masked softmax (the definition).

    q: (B, Hq, N, D), k: (B, Hkv, N, D), v: (B, Hkv, N, Dv) -> (B, Hq, N, Dv), N = H·W.
    """
    grid, block, halo_ = _geometry(q, k, call)
    return pattern_reference(q, k, v, call, halo_mask(grid, block, halo_))


@halo.impl("blocked", description="gather query blocks and their haloed key blocks, one SDPA over the blocks, "
                                  "out-of-image keys masked; O(N·(b+2h)²), never N×N")
def blocked(q, k, v, call):
    """Query blocks × haloed key blocks, SDPA per block (batched), merge back."""
    grid, block, halo_ = _geometry(q, k, call)
    return group_attention(q, k, v, halo_groups(grid, block, halo_, device=q.device), scale=call.scale,
                           mask=call.mask, key_mask=call.key_mask, score_mod=call.score_mod)


@halo.impl("flex", supports=flex_unsupported, description="FlexAttention with the same mask_mod (CPU: inference only)")
def flex(q, k, v, call):
    """FlexAttention with :func:`halo_mask` (inference on CPU)."""
    grid, block, halo_ = _geometry(q, k, call)
    return pattern_flex(q, k, v, call, halo_mask(grid, block, halo_))
