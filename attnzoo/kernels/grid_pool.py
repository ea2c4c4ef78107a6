"""Pooled keys on a 2-D grid, and the grid option: what the pooled and positional vision
methods share (``pooled_kv``, ``aggregated``, ``gated_positional``; the window methods'
parts are in :mod:`attnzoo.kernels.grid2d`).

Tokens are the cells of an ``H × W`` grid in row-major order (token ``n`` is the cell
``(n // W, n % W)``).

* the grid option: :func:`resolve_grid` reads ``grid`` = ``(H, W)``, ``"auto"`` (the
  most square ``(H, W)`` with ``H·W = N``, :func:`attnzoo.kernels.grid2d.square_grid`:
  the sizing hooks' choice, since it fits any length, of queries or of keys) or None
  (a 1-D sequence, the ``1 × N`` grid); :func:`check_grid_option` validates it once,
  in an options class; :func:`size_of` reads a size given as an int or a pair;
* the pooling windows, as explicit lists of token indices (:func:`stride_windows`,
  :func:`adaptive_windows`) — what the references and the brute-force tests build
  their pooling matrices from (:func:`pool_matrix`);
* the pooling itself, fast: :func:`stride_pool` (average pooling over ``s_h × s_w``
  cells with stride ``s``, ceil mode: PVT's spatial reduction), :func:`adaptive_pool`
  (``AdaptiveAvgPool2d`` to a fixed size: PVTv2's linear SRA, TransNeXt's pooled
  branch), :func:`conv_pool` (PVT's strided convolution, one kernel per k/v head).
  Key padding is respected: only real tokens are averaged (a strided convolution sees
  padded tokens as zeros), and a pooled key with no real token under it is masked;
* :func:`pooled_attention` — softmax attention of every query over pooled keys through
  SDPA, the pooled keys' mask applied, rows with nothing to see giving zeros.

**Padding rule** (pooling, [J]): a grid that the stride does not divide gets partial
windows at the bottom and on the right, ``ceil(H / s_h) × ceil(W / s_w)`` pooled keys;
an average over a partial window averages the real cells it covers (AvgPool2d's ceil
mode), a convolution sees the missing cells as zeros (zero padding at the bottom and
on the right). PVT's code needs ``H`` and ``W`` divisible by the ratio; this is the
same result there. A stride longer than its axis is clamped to the axis for averaging
(a ``1 × N`` sequence pools along its one row).

Pooling costs O(N·D); the pooled attention O(Nq·M·D) time and O(Nq·M) memory for M
pooled keys, never ``Nq × Nk``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import AttentionInputError, fmt_shape
from .common import compute_dtype, int_pair
from .grid2d import square_grid

__all__ = [
    "adaptive_pool",
    "adaptive_windows",
    "check_conv_weight",
    "check_grid_option",
    "conv_pool",
    "from_maps",
    "pool_kv",
    "pool_matrix",
    "pooled_attention",
    "resolve_grid",
    "size_of",
    "square_grid",
    "stride_pool",
    "stride_windows",
    "to_maps",
]


# ------------------------------------------------------------------------------ grids


def check_grid_option(method: str, grid) -> None:
    """Validate a ``grid`` option: None, ``"auto"`` or a pair of positive ints."""
    if grid is None or grid == "auto":
        return
    if isinstance(grid, str):
        raise AttentionInputError(f"{method}: grid must be (H, W), 'auto' or None, got {grid!r}")
    int_pair(f"{method}: grid", grid)


def resolve_grid(method: str, grid, n: int, what: str = "q") -> tuple:
    """The grid ``(H, W)`` of ``n`` tokens: ``grid`` checked against ``n`` (``H·W = n``),
    ``"auto"`` -> the most square factorisation of ``n``, None -> ``(1, n)``. ``what``
    names the tensor whose tokens the grid lays out, for the error."""
    if grid is None:
        return 1, int(n)
    if grid == "auto":
        return square_grid(n)
    H, W = int_pair(f"{method}: grid", grid)
    if H * W != n:
        raise AttentionInputError(
            f"method {method!r}: grid={tuple(grid)} has {H * W} cells but {what} has {n} tokens; tokens must be the "
            f"H·W grid cells in row-major order (grid='auto' picks {square_grid(n)})")
    return H, W


def size_of(method: str, name: str, value) -> tuple:
    """A size given as an int or a pair ``(rows, cols)``, as a pair of positive ints."""
    vals = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(vals) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in vals):
        raise AttentionInputError(f"{method}: {name} must be a positive int or a pair (rows, cols) of them, "
                                  f"got {value!r}")
    return vals


# ---------------------------------------------------------------------------- windows


def stride_windows(grid: tuple, stride: tuple) -> list:
    """The windows of strided pooling in ceil mode, row-major: a list of lists of token
    indices, ``ceil(H / s_h) · ceil(W / s_w)`` of them (the stride clamped to the grid)."""
    H, W = grid
    sh, sw = min(stride[0], H), min(stride[1], W)
    out = []
    for a in range(-(-H // sh)):
        for b in range(-(-W // sw)):
            out.append([r * W + c for r in range(a * sh, min(H, (a + 1) * sh)) for c in range(b * sw, min(W, (b + 1) * sw))])
    return out


def adaptive_windows(grid: tuple, size: tuple) -> list:
    """The windows of ``AdaptiveAvgPool2d(size)``, row-major: output cell ``(a, b)`` covers
    rows ``floor(a·H/h) <= r < ceil((a+1)·H/h)`` and the same for columns. ``size`` is
    clamped to the grid."""
    H, W = grid
    h, w = min(size[0], H), min(size[1], W)
    out = []
    for a in range(h):
        for b in range(w):
            rows = range((a * H) // h, -(-((a + 1) * H) // h))
            cols = range((b * W) // w, -(-((b + 1) * W) // w))
            out.append([r * W + c for r in rows for c in cols])
    return out


def pool_matrix(windows: list, n: int, key_mask: Optional[torch.Tensor] = None, dtype=torch.float64,
                device=None) -> torch.Tensor:
    """The averaging matrix of ``windows`` over ``n`` tokens: ``(M, n)``, or ``(B, M, n)``
    with ``key_mask`` (``(B, n)``, True = real token: only real tokens are averaged, a
    window with none is a row of zeros). ``pooled = P @ x``."""
    P = torch.zeros(len(windows), n, dtype=dtype, device=device)
    for m, cells in enumerate(windows):
        P[m, cells] = 1.0
    if key_mask is not None:
        P = P.unsqueeze(0) * key_mask.to(dtype).unsqueeze(1)
    return P / P.sum(-1, keepdim=True).clamp(min=1)


# ---------------------------------------------------------------------------- pooling


def to_maps(x: torch.Tensor, grid: tuple) -> torch.Tensor:
    """``(B, H, N, D)`` tokens -> ``(B, H·D, rows, cols)`` feature maps (head-major channels)."""
    B, Hh, _, D = x.shape
    return x.transpose(2, 3).reshape(B, Hh * D, grid[0], grid[1])


def from_maps(y: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, H·D, h, w)`` feature maps -> ``(B, H, h·w, D)`` tokens."""
    B, C, h, w = y.shape
    return y.reshape(B, heads, C // heads, h * w).transpose(2, 3)


def _masked_pool(x, grid, key_mask, pool):
    """``pool`` (a linear averaging of feature maps) over the real tokens only."""
    B, Hh, N, _ = x.shape
    ct = compute_dtype(x.dtype)
    xc = x.to(ct)
    if key_mask is None:
        return from_maps(pool(to_maps(xc, grid)), Hh), None
    m = key_mask.to(ct).view(B, 1, N, 1)
    num = pool(to_maps(xc * m, grid))
    den = pool(m.view(B, 1, grid[0], grid[1]))  # (B, 1, h, w): the fraction of real cells
    pooled = from_maps(num / den.clamp(min=torch.finfo(ct).tiny), Hh)
    real = den.flatten(1) > 0  # (B, M)
    return pooled * real.view(B, 1, -1, 1), real


def stride_pool(x: torch.Tensor, grid: tuple, stride: tuple, key_mask: Optional[torch.Tensor] = None) -> tuple:
    """Average pooling of ``x (B, H, N, D)`` over windows of ``stride = (s_h, s_w)`` cells
    with that stride, ceil mode (partial windows at the bottom and right average the real
    cells they cover; the stride is clamped to the grid): ``(pooled (B, H, M, D),
    pooled_mask (B, M) or None)`` in the compute dtype, ``M = ceil(H/s_h)·ceil(W/s_w)``,
    row-major. With ``key_mask`` (``(B, N)``, True = real) only real tokens are averaged
    and a window with none is masked. Equals ``pool_matrix(stride_windows(...)) @ x``."""
    s = (min(stride[0], grid[0]), min(stride[1], grid[1]))

    def pool(maps):
        return F.avg_pool2d(maps, s, s, ceil_mode=True, count_include_pad=False)

    return _masked_pool(x, grid, key_mask, pool)


def adaptive_pool(x: torch.Tensor, grid: tuple, size: tuple, key_mask: Optional[torch.Tensor] = None) -> tuple:
    """``AdaptiveAvgPool2d(size)`` of ``x (B, H, N, D)`` on its grid (``size`` clamped to
    the grid): ``(pooled (B, H, h·w, D), pooled_mask (B, h·w) or None)``, key padding as
    in :func:`stride_pool`. Equals ``pool_matrix(adaptive_windows(...)) @ x``."""
    s = (min(size[0], grid[0]), min(size[1], grid[1]))
    return _masked_pool(x, grid, key_mask, lambda maps: F.adaptive_avg_pool2d(maps, s))


def pool_kv(k: torch.Tensor, v: torch.Tensor, grid: tuple, kind: str, size: tuple,
            key_mask: Optional[torch.Tensor] = None) -> tuple:
    """``(k_pooled, v_pooled, pooled_mask)``: keys and values pooled alike, by
    :func:`stride_pool` (``kind="stride"``, ``size`` the stride) or :func:`adaptive_pool`
    (``kind="adaptive"``, ``size`` the output grid)."""
    pool = stride_pool if kind == "stride" else adaptive_pool
    kp, real = pool(k, grid, size, key_mask)
    vp, _ = pool(v, grid, size, key_mask)
    return kp, vp, real


def conv_pool(x: torch.Tensor, grid: tuple, weight: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> tuple:
    """PVT's spatial reduction by a strided convolution: ``weight (H·Dout, D, s_h, s_w)``,
    one kernel per head (``groups = H``), stride = kernel size, the grid zero-padded at
    the bottom and on the right to multiples of the stride: ``(pooled (B, H, M, Dout),
    pooled_mask (B, M) or None)`` in the compute dtype. Padded (``key_mask`` False)
    tokens enter as zeros; a window with no real token is masked."""
    B, Hh, N, _ = x.shape
    ct = compute_dtype(x.dtype)
    sh, sw = weight.shape[-2:]
    xc = x.to(ct)
    if key_mask is not None:
        xc = xc * key_mask.to(ct).view(B, 1, N, 1)
    pad_r, pad_b = -grid[1] % sw, -grid[0] % sh
    maps = F.pad(to_maps(xc, grid), (0, pad_r, 0, pad_b))
    y = F.conv2d(maps, weight.to(ct), stride=(sh, sw), groups=Hh)
    real = None
    if key_mask is not None:
        m = F.pad(key_mask.to(ct).view(B, 1, grid[0], grid[1]), (0, pad_r, 0, pad_b))
        real = F.max_pool2d(m, (sh, sw), (sh, sw)).flatten(1) > 0
    return from_maps(y, Hh), real


def check_conv_weight(method: str, name: str, w, heads: int, d_in: int, stride: tuple) -> torch.Tensor:
    """A strided-convolution kernel ``(heads·Dout, d_in, s_h, s_w)`` (the weight of
    ``nn.Conv2d(heads·d_in, heads·Dout, s, stride=s, groups=heads)``), checked."""
    if not isinstance(w, torch.Tensor):
        raise AttentionInputError(f"{method}: {name} must be a tensor (Hkv·Dout, D, s_h, s_w), got {type(w).__name__}")
    if w.dim() != 4 or w.shape[0] % heads or w.shape[1] != d_in or tuple(w.shape[2:]) != tuple(stride):
        raise AttentionInputError(
            f"{method}: {name} must have shape (Hkv·Dout, D, s_h, s_w) = ({heads}·Dout, {d_in}, {stride[0]}, "
            f"{stride[1]}) (the weight of nn.Conv2d({heads}·{d_in}, {heads}·Dout, {tuple(stride)}, "
            f"stride={tuple(stride)}, groups={heads})), got {fmt_shape(w)}")
    return w


# ------------------------------------------------------------------ pooled attention


def pooled_attention(q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, pooled_mask: Optional[torch.Tensor], *,
                     scale: float) -> torch.Tensor:
    """Softmax attention of ``q (B, Hq, Nq, D)`` over pooled keys ``kp (B, Hkv, M, D)``
    and values ``vp (B, Hkv, M, Dv)`` (any float dtype; the result is in q's dtype),
    ``pooled_mask`` ``(B, M)`` (True = a pooled key with real tokens under it) or None.
    SDPA with ``enable_gqa``; rows with no pooled key to see give zeros."""
    ct = kp.dtype
    Hq, Hkv = q.shape[1], kp.shape[1]
    am = None if pooled_mask is None else pooled_mask.view(pooled_mask.shape[0], 1, 1, -1)
    out = F.scaled_dot_product_attention(q.to(ct), kp, vp, attn_mask=am, scale=scale, enable_gqa=Hq != Hkv)
    if am is not None:
        empty = ~pooled_mask.any(-1)
        if bool(empty.any()):
            out = out.masked_fill(empty.view(-1, 1, 1, 1), 0.0)
    return out.to(q.dtype)
