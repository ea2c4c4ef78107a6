"""Tokens on a 2-D grid: what the vision methods share.

Tokens are the cells of an ``H × W`` grid in row-major order (token ``n`` is the cell
``(n // W, n % W)``), passed as ``grid=(H, W)`` with ``H·W = N``. The vision methods
(``attnzoo/methods/vision``) restrict softmax attention to 2-D patterns — windows,
shifted windows, haloed blocks, stripes, dilated grids — or attend to pooled keys;
this module holds their common parts:

* the grid itself: :func:`square_grid` (the most square ``(H, W)`` with ``H·W = n``:
  the sizing hooks' choice), :func:`check_grid` (the errors when ``grid`` is missing or
  does not match the tokens), :func:`size_pair` (a window given as an int or a pair);
* **groups**: a pattern that splits the queries into groups sharing one key set is a
  :class:`Groups` — the token index of every query slot and key slot of every group,
  which slots are real (padding), and an optional per-pair mask (Swin's region mask).
  Builders: :func:`window_groups` (non-overlapping windows, optionally cyclically
  shifted: Swin's W-MSA and SW-MSA, MaxViT's block attention, CSWin's stripes, axial
  rows and columns), :func:`halo_groups` (HaloNet's blocks and haloed keys),
  :func:`dilated_groups` (MaxViT's grid attention);
* :func:`group_attention` — softmax attention of every group over its keys, the
  window partitioning of the fast forms: gathers, then SDPA over ``(B·G, H, L, D)``
  (or a masked softmax in the compute dtype when a score_mod is given), then the
  inverse gather. Time O(N·Lk·D), memory O(N·Lk): never ``N × N``. The call's mask,
  mask_mod, key mask and score_mod are evaluated at the gathered pairs only
  (:func:`pair_allowed`);
* pooling: :func:`pool_tokens` (average pooling of ``s_h × s_w`` cells, ceil mode,
  key padding respected) and :func:`pool_matrix` (the same as an explicit ``(M, N)``
  matrix, for references); :func:`cyclic_shift` and :func:`region_ids` (Swin's
  ``torch.roll`` and its region labels, for references and tests).

**Padding rule** (every builder, [J]): a grid that a window, block, stripe or dilation
does not divide is padded at the bottom and on the right to the next multiple (the
padding of Swin's and HaloNet's detection code, ``F.pad(x, (0, 0, 0, pad_r, 0,
pad_b))``). Padded cells are *absent*, not zero tokens: no query attends to them and
their own outputs are dropped. (Swin-det and timm attend to zero-padded tokens, so
their outputs depend on the padding; here the result is the pattern restricted to the
real cells, which is what the brute-force masks of the tests compute.) Shifts act on
the padded grid, as in Swin's code (pad first, then roll).

Everything here is integer index arithmetic on small tensors (cached per grid and
size) plus gathers; no N×N tensor is built.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..errors import AttentionInputError, fmt_shape
from .common import compute_dtype, int_pair
from .dense import masked_softmax, scores
from .masking import dense_mask, make_masker

__all__ = ["square_grid", "check_grid", "size_pair", "clamp_to_grid", "sized_window", "padded_size", "Groups",
           "window_groups",
           "halo_groups", "dilated_groups", "group_attention", "pair_allowed", "head_kv", "pool_tokens",
           "pool_matrix", "cyclic_shift", "region_ids", "grid_coords", "pattern_weights"]

# ------------------------------------------------------------------------------ grids


def square_grid(n: int) -> tuple:
    """The most square ``(H, W)`` with ``H·W = n`` and ``H <= W`` (``H`` the largest
    divisor of ``n`` not above ``√n``): ``(7, 9)`` for 63, ``(10, 10)`` for 100,
    ``(25, 40)`` for 1000, ``(1, n)`` for a prime ``n``."""
    n = int(n)
    if n < 1:
        raise AttentionInputError(f"square_grid: n must be a positive int, got {n!r}")
    h = math.isqrt(n)
    while n % h:
        h -= 1
    return h, n // h


def check_grid(method: str, grid, q: torch.Tensor, k: torch.Tensor) -> tuple:
    """``grid`` as ``(H, W)``, checked against the tokens: ``H·W = Nq`` and ``Nk = Nq``
    (these methods are self-attention on the grid). Raises :class:`AttentionInputError`
    naming the method, the expected and the actual."""
    nq, nk = q.shape[2], k.shape[2]
    if grid is None:
        raise AttentionInputError(
            f"method {method!r} takes tokens on a 2-D grid: pass grid=(H, W) with H·W = Nq = {nq} (tokens in "
            f"row-major order, as neighborhood takes them), e.g. grid={square_grid(nq)}")
    H, W = int_pair(f"{method}: grid", grid)
    if H * W != nq:
        raise AttentionInputError(
            f"method {method!r}: grid={tuple(grid)} has {H * W} cells but q has Nq={nq} tokens (q {fmt_shape(q)}); "
            "tokens must be the H·W grid cells in row-major order")
    if nk != nq:
        raise AttentionInputError(
            f"method {method!r} is self-attention on the grid: k must have as many tokens as q (the grid's "
            f"{H}·{W} = {nq} cells), got q {fmt_shape(q)} and k {fmt_shape(k)}")
    return H, W


def size_pair(method: str, name: str, value, minimum: int = 1) -> tuple:
    """``value`` (an int, or a pair ``(rows, cols)``) as a pair of ints ``>= minimum``."""
    vals = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(vals) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in vals):
        what = "a positive int" if minimum >= 1 else f"an int >= {minimum}"
        raise AttentionInputError(f"{method}: {name} must be {what} or a pair (rows, cols) of them, got {value!r}")
    return vals


def clamp_to_grid(size: tuple, grid: tuple) -> tuple:
    """A window no larger than the grid, per axis (a window longer than its axis is the
    whole axis, as Swin does when the resolution is below the window)."""
    return min(size[0], grid[0]), min(size[1], grid[1])


def sized_window(grid, cap: int, divisor: int = 2) -> tuple:
    """The sizing hooks' window for a grid: per axis ``min(cap, ceil(side / divisor))``
    (at least 1): about ``1/divisor²`` of the grid at small sizes, the paper's size
    ``cap`` on large grids (``(7, 7)`` on 56 × 56 with ``cap=7``)."""
    return tuple(max(1, min(int(cap), -(-int(side) // int(divisor)))) for side in grid)


def padded_size(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (the padded axis)."""
    return -(-n // multiple) * multiple


def grid_coords(n: int, W: int, device=None) -> tuple:
    """``(rows, cols)`` of the tokens ``0..n-1`` of a grid of width ``W``."""
    i = torch.arange(n, device=device)
    return i // W, i % W


# ----------------------------------------------------------------------------- groups


class Groups(NamedTuple):
    """Query groups with their key sets, as token indices.

    ``q_idx (G, Lq)``: the token of every query slot (padding slots hold 0);
    ``q_valid (G, Lq)`` bool or None (all real); ``k_idx (G, Lk)``, ``k_valid (G, Lk)``
    likewise for the keys; ``pair_ok (G, Lq, Lk)`` bool or None: which (query, key)
    slots may attend within a group (Swin's region mask); ``inverse (N,)``: the slot
    ``g·Lq + a`` holding token ``n`` as a query (every token is a query exactly once).
    """

    q_idx: torch.Tensor
    q_valid: Optional[torch.Tensor]
    k_idx: torch.Tensor
    k_valid: Optional[torch.Tensor]
    pair_ok: Optional[torch.Tensor]
    inverse: torch.Tensor

    def to(self, device) -> "Groups":
        return Groups(*(None if t is None else t.to(device) for t in self))


def _inverse(idx: torch.Tensor, valid: Optional[torch.Tensor], n: int) -> torch.Tensor:
    slots = torch.arange(idx.numel())
    flat = idx.reshape(-1)
    if valid is not None:
        keep = valid.reshape(-1)
        slots, flat = slots[keep], flat[keep]
    inv = torch.full((n,), -1, dtype=torch.long)
    inv[flat] = slots
    assert bool((inv >= 0).all()), "every token must be a query exactly once"
    return inv


def _none_if_all(valid: torch.Tensor) -> Optional[torch.Tensor]:
    return None if bool(valid.all()) else valid


@lru_cache(maxsize=128)
def _window_groups(grid: tuple, window: tuple, shift: tuple) -> Groups:
    H, W = grid
    wh, ww = window
    sh, sw = shift
    Hp, Wp = padded_size(H, wh), padded_size(W, ww)
    nh, nw = Hp // wh, Wp // ww
    # cell r' of the rolled (shifted) padded map holds the padded cell (r' + shift) mod Hp:
    # torch.roll(x, -shift) as in Swin's SW-MSA
    rows = ((torch.arange(Hp) + sh) % Hp).view(nh, 1, wh, 1)
    cols = ((torch.arange(Wp) + sw) % Wp).view(1, nw, 1, ww)
    valid = ((rows < H) & (cols < W)).reshape(nh * nw, wh * ww)
    idx = (rows * W + cols).reshape(nh * nw, wh * ww)
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    pair_ok = None
    if sh or sw:  # Swin's region labels, on the rolled map's own coordinates
        lab = region_ids(Hp, Wp, window, shift).view(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(nh * nw, wh * ww)
        pair_ok = lab[:, :, None] == lab[:, None, :]
        if bool(pair_ok.all()):
            pair_ok = None
    v = _none_if_all(valid)
    return Groups(idx, v, idx, v, pair_ok, _inverse(idx, v, H * W))


def window_groups(grid, window, shift=(0, 0), device=None) -> Groups:
    """Non-overlapping ``window = (wh, ww)`` windows of the grid padded to multiples of the
    window, after a cyclic shift of the padded grid by ``shift = (sh, sw)`` (Swin's
    ``torch.roll(x, (-sh, -sw))``); with a shift, ``pair_ok`` is Swin's region mask (cells
    of a window attend only within their region of the unshifted partition).
    ``Lq = Lk = wh·ww``; queries and keys are the same slots."""
    g = _window_groups((int(grid[0]), int(grid[1])), (int(window[0]), int(window[1])),
                       (int(shift[0]), int(shift[1])))
    return g if device is None else g.to(device)


@lru_cache(maxsize=128)
def _halo_groups(grid: tuple, block: tuple, halo: tuple) -> Groups:
    H, W = grid
    (bh, bw), (hh, hw) = block, halo
    Hp, Wp = padded_size(H, bh), padded_size(W, bw)
    nh, nw = Hp // bh, Wp // bw
    q = _window_groups(grid, block, (0, 0))
    kr = (torch.arange(nh) * bh - hh).view(nh, 1, 1, 1) + torch.arange(bh + 2 * hh).view(1, 1, -1, 1)
    kc = (torch.arange(nw) * bw - hw).view(1, nw, 1, 1) + torch.arange(bw + 2 * hw).view(1, 1, 1, -1)
    kvalid = ((kr >= 0) & (kr < H) & (kc >= 0) & (kc < W)).reshape(nh * nw, -1)
    kidx = torch.where(kvalid, (kr * W + kc).reshape(nh * nw, -1), torch.zeros((), dtype=torch.long))
    return Groups(q.q_idx, q.q_valid, kidx, _none_if_all(kvalid), None, q.inverse)


def halo_groups(grid, block, halo, device=None) -> Groups:
    """HaloNet's blocked local attention: query blocks ``block = (bh, bw)`` of the grid
    padded to multiples of the block; each block's keys are the block extended by
    ``halo = (hh, hw)`` cells on every side, ``(bh + 2hh)·(bw + 2hw)`` slots, those
    outside the image (and in the padding) invalid."""
    g = _halo_groups((int(grid[0]), int(grid[1])), (int(block[0]), int(block[1])), (int(halo[0]), int(halo[1])))
    return g if device is None else g.to(device)


@lru_cache(maxsize=128)
def _dilated_groups(grid: tuple, groups: tuple) -> Groups:
    H, W = grid
    gh, gw = groups
    Hp, Wp = padded_size(H, gh), padded_size(W, gw)
    sh, sw = Hp // gh, Wp // gw  # the stride between the members of a group
    rows = (torch.arange(sh).view(sh, 1, 1, 1) + sh * torch.arange(gh).view(1, 1, gh, 1))
    cols = (torch.arange(sw).view(1, sw, 1, 1) + sw * torch.arange(gw).view(1, 1, 1, gw))
    valid = ((rows < H) & (cols < W)).reshape(sh * sw, gh * gw)
    idx = torch.where(valid, (rows * W + cols).reshape(sh * sw, gh * gw), torch.zeros((), dtype=torch.long))
    v = _none_if_all(valid)
    return Groups(idx, v, idx, v, None, _inverse(idx, v, H * W))


def dilated_groups(grid, groups, device=None) -> Groups:
    """MaxViT's grid attention: a fixed ``groups = (gh, gw)`` grid over the image padded
    to multiples of it; the cells ``(r + t·Hp/gh, c + u·Wp/gw)`` (``t < gh``, ``u < gw``)
    form one group of ``gh·gw`` slots, spread across the whole image at stride
    ``(Hp/gh, Wp/gw)``."""
    g = _dilated_groups((int(grid[0]), int(grid[1])), (int(groups[0]), int(groups[1])))
    return g if device is None else g.to(device)


def region_ids(Hp: int, Wp: int, window, shift) -> torch.Tensor:
    """Swin's region labels ``(Hp, Wp)`` of the shifted partition, on the rolled map:
    rows ``[0, Hp - wh)``, ``[Hp - wh, Hp - sh)``, ``[Hp - sh, Hp)`` (and the same for
    columns) are regions 0, 1, 2; the label is ``3·row region + column region``
    (Swin's ``img_mask`` built from ``h_slices`` and ``w_slices``)."""
    (wh, ww), (sh, sw) = window, shift

    def axis(n, w, s):
        i = torch.arange(n)
        return (i >= n - w).long() + (i >= n - s).long() if s else torch.zeros(n, dtype=torch.long)

    return axis(Hp, wh, sh).view(-1, 1) * 3 + axis(Wp, ww, sw).view(1, -1)


def cyclic_shift(x: torch.Tensor, grid, shift) -> torch.Tensor:
    """Swin's cyclic shift of tokens ``x (..., N, D)`` on the grid: ``torch.roll`` by
    ``(-sh, -sw)`` (the token at cell ``(r, c)`` moves to ``((r - sh) mod H, (c - sw) mod W)``)."""
    H, W = grid
    lead = x.shape[:-2]
    y = x.reshape(*lead, H, W, x.shape[-1]).roll(shifts=(-int(shift[0]), -int(shift[1])), dims=(-3, -2))
    return y.reshape(*lead, H * W, x.shape[-1])


# -------------------------------------------------------------------- group attention


def head_kv(k: torch.Tensor, v: torch.Tensor, q_heads: int, h0: int, h1: int) -> tuple:
    """The k/v heads that serve the query heads ``[h0, h1)`` of a GQA call with
    ``q_heads`` query heads: a slice of k/v when the range covers whole groups (or lies
    in one group), else k/v repeated to those query heads."""
    hkv = k.shape[1]
    g = q_heads // hkv
    if h0 % g == 0 and h1 % g == 0:
        return k[:, h0 // g:h1 // g], v[:, h0 // g:h1 // g]
    if h0 // g == (h1 - 1) // g:
        return k[:, h0 // g:h0 // g + 1], v[:, h0 // g:h0 // g + 1]
    sel = torch.arange(h0, h1, device=k.device) // g
    return k.index_select(1, sel), v.index_select(1, sel)


def _as_bool(m, device) -> torch.Tensor:
    if not isinstance(m, torch.Tensor):
        m = torch.tensor(bool(m), device=device)
    return m.to(torch.bool)


def pair_allowed(qi: torch.Tensor, ki: torch.Tensor, *, batch: int, heads: int, h0: int = 0, mask=None,
                 key_mask=None) -> Optional[torch.Tensor]:
    """The call's mask at the pairs ``(qi, ki)``: bool broadcastable to
    ``(B, *S, Hs, Lq, Lk)``-style shapes, or None.

    ``qi``, ``ki``: long token indices, broadcastable to each other, with the head axis
    at dim ``-3`` (size 1) and a leading batch axis (size 1). ``mask``: a bool tensor
    ``(B|1, Hq|1, N, N)`` or a mask_mod ``(b, h, q_idx, kv_idx)``; its heads are
    ``h0 .. h0 + heads - 1``; ``key_mask``: ``(B, N)``, True = real key. The result has
    batch axis ``B`` or 1 and head axis ``heads`` or 1.
    """
    out = None
    extra = qi.dim() - 4  # axes between the batch and the head axis
    shape_b = (-1,) + (1,) * (qi.dim() - 1)
    shape_h = (1,) * (1 + extra) + (-1, 1, 1)
    if mask is not None:
        if isinstance(mask, torch.Tensor):
            mb, mh = mask.shape[0], mask.shape[1]
            bi = torch.arange(mb, device=qi.device).view(shape_b)
            hi = (torch.arange(h0, h0 + heads, device=qi.device) if mh > 1
                  else torch.zeros(1, dtype=torch.long, device=qi.device)).view(shape_h)
            out = mask[bi, hi, qi, ki]
        else:
            b = torch.arange(batch, device=qi.device).view(shape_b)
            h = torch.arange(h0, h0 + heads, device=qi.device).view(shape_h)
            out = _as_bool(mask(b, h, qi, ki), qi.device)
            while out.dim() < qi.dim():
                out = out.unsqueeze(0)
    if key_mask is not None:  # ki has a batch axis of size 1: the key mask supplies the batch
        km = key_mask[:, ki.reshape(-1)].view(key_mask.shape[0], *ki.shape[1:])
        out = km if out is None else out & km
    return out


def _pair_masks(groups: Groups, B: int, Hq: int, h0: int, mask, key_mask) -> Optional[torch.Tensor]:
    """Bool ``(B|1, G, Hq|1, Lq, Lk)`` of the allowed pairs of every group (pattern, call
    mask, key mask), or None when everything is allowed. Padding query slots may attend
    everything (their outputs are dropped; an all-masked row would only risk NaNs)."""
    G, Lq = groups.q_idx.shape
    Lk = groups.k_idx.shape[1]
    allowed = None
    if groups.k_valid is not None:
        allowed = groups.k_valid.view(1, G, 1, 1, Lk)
    if groups.pair_ok is not None:
        p = groups.pair_ok.view(1, G, 1, Lq, Lk)
        allowed = p if allowed is None else allowed & p
    if mask is not None or key_mask is not None:
        qi = groups.q_idx.view(1, G, 1, Lq, 1)
        ki = groups.k_idx.view(1, G, 1, 1, Lk)
        user = pair_allowed(qi, ki, batch=B, heads=Hq, h0=h0, mask=mask, key_mask=key_mask)
        allowed = user if allowed is None else allowed & user
    if allowed is not None and groups.q_valid is not None:
        allowed = allowed | ~groups.q_valid.view(1, G, 1, Lq, 1)
    return allowed


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x (B, H, N, D)`` -> ``(B·G, H, L, D)``: the tokens ``idx (G, L)`` of every group."""
    B, H, _, D = x.shape
    G, L = idx.shape
    y = x.transpose(1, 2).index_select(1, idx.reshape(-1))  # (B, G·L, H, D)
    return y.view(B * G, L, H, D).transpose(1, 2)


def group_attention(q, k, v, groups: Groups, *, scale: float, mask=None, key_mask=None, score_mod=None,
                    h0: int = 0) -> torch.Tensor:
    """Softmax attention of every query group over its key set.

    q: (B, Hq, N, D), k: (B, Hkv, N, D), v: (B, Hkv, N, Dv) -> (B, Hq, N, Dv). Token
    ``n`` (in group ``g``) attends to the valid keys ``groups.k_idx[g]`` allowed by
    ``groups.pair_ok``, the ``mask`` (a bool tensor ``(B|1, Hq_total|1, N, N)`` or a
    mask_mod), ``key_mask`` (``(B, N)``, True = real key), with ``score_mod`` applied to
    the scaled scores. The heads of q are the global heads ``h0 .. h0 + Hq - 1`` of the
    call (for the mask and the mods; a head split runs this once per part). A query
    with nothing to attend to gets zeros.

    Without a score_mod: one ``scaled_dot_product_attention`` over ``(B·G, Hq, Lq, D)``
    with a bool mask (none at all when every pair is allowed) and ``enable_gqa``; with
    one: scores, the mod and a masked softmax in the compute dtype (float32 for half
    inputs). Time O(N·Lk·D), memory O(N·Lk): the groups are the batch of one call, each
    holding only its ``Lq × Lk`` scores.
    """
    B, Hq, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    G, Lq = groups.q_idx.shape
    Lk = groups.k_idx.shape[1]
    allowed = _pair_masks(groups, B, Hq, h0, mask, key_mask)
    qg = _gather(q, groups.q_idx)
    kg, vg = _gather(k, groups.k_idx), _gather(v, groups.k_idx)
    am = None
    if allowed is not None:
        Ha = allowed.shape[2]
        am = allowed.expand(B, G, Ha, Lq, Lk).reshape(B * G, Ha, Lq, Lk)
    if score_mod is None:
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=am, scale=scale, enable_gqa=Hq != Hkv)
        if am is not None:
            empty = ~am.any(dim=-1, keepdim=True)
            if bool(empty.any()):
                out = out.masked_fill(empty, 0.0)
    else:
        ct = compute_dtype(q.dtype)
        gq = Hq // Hkv
        s = (qg.to(ct).reshape(B * G, Hkv, gq, Lq, D) * scale) @ kg.to(ct).unsqueeze(2).transpose(-1, -2)
        s = s.view(B, G, Hq, Lq, Lk)
        b = torch.arange(B, device=q.device).view(B, 1, 1, 1, 1)
        h = torch.arange(h0, h0 + Hq, device=q.device).view(1, 1, Hq, 1, 1)
        s = score_mod(s, b, h, groups.q_idx.view(1, G, 1, Lq, 1), groups.k_idx.view(1, G, 1, 1, Lk)).expand(s.shape)
        p = masked_softmax(s, None if allowed is None else allowed.expand(s.shape))
        p = p.reshape(B * G, Hkv, gq, Lq, Lk)
        out = (p @ vg.to(ct).unsqueeze(2)).reshape(B * G, Hq, Lq, Dv).to(q.dtype)
    out = out.reshape(B, G, Hq, Lq, Dv).permute(0, 2, 1, 3, 4).reshape(B, Hq, G * Lq, Dv)
    return out.index_select(2, groups.inverse)


def pattern_weights(q, k, *, scale: float, pattern, mask=None, key_mask=None, score_mod=None) -> torch.Tensor:
    """The dense softmax weights ``(B, Hq, N, N)`` of the pattern ``pattern`` (a mask_mod)
    combined with the call's mask, key mask and score_mod, in the compute dtype (the
    references that apply the weights more than once: criss-cross's passes, axial's row
    then column). O(N²): references only."""
    B, Hq, N = q.shape[0], q.shape[1], q.shape[2]
    Nk = k.shape[2]
    allowed = dense_mask(pattern, B, Hq, N, Nk, q.device)
    if mask is not None:
        allowed = allowed & (mask if isinstance(mask, torch.Tensor) else dense_mask(mask, B, Hq, N, Nk, q.device))
    allowed = make_masker(q, k, False, allowed, key_mask).full()
    return masked_softmax(scores(q, k, scale, score_mod), allowed)


# ---------------------------------------------------------------------------- pooling


def pool_tokens(x: torch.Tensor, grid, size, key_mask: Optional[torch.Tensor] = None) -> tuple:
    """Average pooling of the tokens ``x (B, H, N, D)`` of a grid over ``size = (sh, sw)``
    cells, ceil mode: ``(pooled (B, H, M, D), pooled_mask (B, M) bool or None, (Hc, Wc))``,
    pooled in the compute dtype (float32 for half inputs),
    with ``Hc = ceil(H/sh)``, ``Wc = ceil(W/sw)``, ``M = Hc·Wc`` cells in row-major order.

    A cell at the bottom or right edge that the grid does not fill averages the real
    cells it covers ([J]: AvgPool2d with ``ceil_mode=True``; PVT and LITv2 use the floor
    mode, which drops the last rows and columns, so some tokens would never be keys).
    With ``key_mask`` (``(B, N)``, True = real key), only real tokens are averaged and
    a cell with none is masked (``pooled_mask`` False, pooled value 0). O(N·D).
    """
    B, H, N, D = x.shape
    ct = compute_dtype(x.dtype)
    groups = window_groups(grid, size, device=x.device)
    G, L = groups.q_idx.shape
    xs = x.index_select(2, groups.q_idx.reshape(-1)).view(B, H, G, L, D).to(ct)
    w = torch.ones(1, G, L, dtype=ct, device=x.device) if groups.q_valid is None \
        else groups.q_valid.to(ct).view(1, G, L)
    if key_mask is not None:
        w = w * key_mask[:, groups.q_idx.reshape(-1)].view(B, G, L).to(ct)
    count = w.sum(-1)  # (B|1, G)
    pooled = (xs * w.view(w.shape[0], 1, G, L, 1)).sum(3) / count.clamp(min=1).view(count.shape[0], 1, G, 1)
    Hc, Wc = padded_size(grid[0], size[0]) // size[0], padded_size(grid[1], size[1]) // size[1]
    mask = None if key_mask is None else count > 0
    return pooled, mask, (Hc, Wc)


def pool_matrix(grid, size, dtype=torch.float64, device=None, key_mask: Optional[torch.Tensor] = None):
    """:func:`pool_tokens` as an explicit averaging matrix, built by loops over the cells:
    ``(M, N)`` (or ``(B, M, N)`` with ``key_mask``; a cell with no real token is a row of
    zeros), so that ``pooled = P @ x``."""
    H, W = grid
    sh, sw = size
    Hc, Wc = -(-H // sh), -(-W // sw)
    P = torch.zeros(Hc * Wc, H * W, dtype=dtype, device=device)
    for a in range(Hc):
        for b in range(Wc):
            cells = [r * W + c for r in range(a * sh, min(H, (a + 1) * sh))
                     for c in range(b * sw, min(W, (b + 1) * sw))]
            P[a * Wc + b, cells] = 1.0
    if key_mask is not None:
        P = P.unsqueeze(0) * key_mask.to(dtype).unsqueeze(1)
    return P / P.sum(-1, keepdim=True).clamp(min=1)
