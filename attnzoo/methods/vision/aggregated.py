"""Aggregated attention (TransNeXt): a local window and pooled global keys under one softmax.

    tokens on an H × W grid (row-major, ``grid=(H, W)``, N = H·W)
    L(i) = the k_h × k_w window centred on i (cells outside the image left out)
    K̄, V̄ = k, v pooled on the grid (M tokens)
    S_ij = scale · q_i·k_j  (j in L(i)),   S̄_im = scale · q_i·k̄_m  (m = 1..M)
    O_i = Σ_{j in L(i)} p_ij v_j + Σ_m p̄_im v̄_m,   (p_i, p̄_i) = softmax over the concatenation [S_i, S̄_i]

"TransNeXt: Robust Foveal Visual Perception for Vision Transformers" (Shi, CVPR 2024).
Its pixel-focused attention gives every query a fine-grained view of its
neighbourhood (a sliding window, "foveal" vision) and a coarse view of the whole
image (keys and values pooled to a small grid), and normalises the two sets of
similarities together with one softmax, so the query itself decides how much goes to
its surroundings and how much to the global summary. Aggregated attention adds
learnable tokens, a query embedding, positional biases and length-scaled cosine
similarities on top of this core.

Judgement calls:

* [J] The core only: the softmax over [local window ; pooled keys] with the call's
  ``scale``. TransNeXt's learnable tokens, query embedding, relative position biases
  and cosine similarity with a learned, length-scaled temperature are parameters of
  the layer around it (the scores they add are affine in q and k); its pooled branch
  runs the pooled *input* through a 1×1 convolution, LayerNorm and GELU before the
  key/value projection, which on per-head k and v has no counterpart: here the
  pooled keys are the averages of k and v (pooling commutes with the projection).
* [J] The window is centred (``k // 2`` cells on each side; an even size has one more
  cell before the query than after it) and cropped at the borders: cells outside the
  image are left out, as TransNeXt's zero-padded unfold with its padding mask does,
  so a corner query sees fewer local keys.
* [J] Pooling: ``reduction=R`` (TransNeXt's sr_ratio) averages R_h × R_w windows with
  stride R in ceil mode (partial windows at the bottom and right average their real
  cells); TransNeXt pools adaptively to ``H // R × W // R``, which is the same when R
  divides the grid. ``pool_size=(h, w)`` pools adaptively to a fixed size instead.
* [J] ``grid=None`` is a 1-D sequence (the ``1 × N`` grid), ``"auto"`` the most square
  ``(H, W)`` with ``H·W = N``.
* [J] Key padding: padded keys leave the window and the pooled averages (a pooled key
  with no real key under it is masked). General masks do not apply to pooled keys
  (masks=False). GQA: the k/v heads' windows and pooled keys serve their query heads.
* [J] Self-attention only (the window is positions of the query's own grid); no
  causal form (pooled keys average later positions).
* Returned weights: the effective ``N × N`` weights, the local probabilities plus the
  pooled ones spread back over the keys they average (``O = W V``).

Complexity: time O(N·(k_h·k_w + M)·D), memory O(N·(k_h·k_w + M)) for M pooled keys
(``M ≈ N/R²``, or ``h·w`` with ``pool_size``); the reference builds the N × N window
mask and the N × (N + M) scores.

Implementations:

* ``reference`` — the N × N scores masked to the window, concatenated with the scores
  of the pooled keys (pooling as an explicit matrix), one masked softmax;
* ``gather`` — each query's window gathered by index from the padded grid, the pooled
  keys by ``avg_pool2d``, one softmax over the ``k_h·k_w + M`` scores: never N × N.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Optional, Union

import torch

from ...errors import AttentionInputError, fmt_shape
from ...kernels.common import compute_dtype, repeat_kv
from ...kernels.dense import masked_softmax
from ...kernels.grid_pool import (
    adaptive_windows,
    check_grid_option,
    pool_kv,
    pool_matrix,
    resolve_grid,
    size_of,
    stride_windows,
)
from ...kernels.masking import MaskMod
from ...registry import MethodOptions, method

NAME = "aggregated"


def foveal_window_mask(grid, kernel_size) -> MaskMod:
    """TransNeXt's local window on ``grid=(H, W)`` (tokens row-major): query ``(r, c)``
    sees key ``(r', c')`` iff ``-(k_h // 2) <= r' - r <= (k_h - 1) // 2`` and the same for
    columns (a centred window, cropped at the borders). Carries ``cache_key``."""
    H, W = size_of(NAME, "grid", grid)
    kh, kw = size_of(NAME, "kernel_size", kernel_size)

    def foveal_window(b, h, q_idx, kv_idx):
        dr = kv_idx // W - q_idx // W
        dc = kv_idx % W - q_idx % W
        return (dr >= -(kh // 2)) & (dr <= (kh - 1) // 2) & (dc >= -(kw // 2)) & (dc <= (kw - 1) // 2)

    foveal_window.cache_key = ("foveal_window", H, W, kh, kw)  # type: ignore[attr-defined]
    return foveal_window


@dataclass(frozen=True)
class AggregatedOptions(MethodOptions):
    """Options of ``aggregated``.

    Attributes:
        grid: ``(H, W)`` (row-major, ``H·W = N``), ``"auto"`` (the most square
            factorisation of N) or None (a 1-D sequence, the 1 × N grid).
        kernel_size: the local window, an int or ``(k_h, k_w)`` (TransNeXt: 3), centred.
        reduction: the pooling ratio R (TransNeXt's sr_ratio), an int or ``(R_h, R_w)``.
        pool_size: ``(h, w)``: adaptive pooling to a fixed size instead of ``reduction``.
    """

    grid: Optional[Union[tuple, Literal["auto"]]] = None
    kernel_size: Union[int, tuple] = 3
    reduction: Union[int, tuple] = 8
    pool_size: Optional[tuple] = None

    def validate(self) -> None:
        check_grid_option(NAME, self.grid)
        size_of(NAME, "kernel_size", self.kernel_size)
        size_of(NAME, "reduction", self.reduction)
        if self.pool_size is not None:
            size_of(NAME, "pool_size", self.pool_size)

    @classmethod
    def for_length(cls, n: int) -> dict:
        """The most square grid, TransNeXt's 3 × 3 window, and a ratio that pools to
        about 16 global keys on short sequences (4 up to 1024 tokens, TransNeXt's 8 beyond)."""
        return {"grid": "auto", "kernel_size": 3, "reduction": 4 if n <= 1024 else 8}


def _check_self(q, k):
    if q.shape[2] != k.shape[2]:
        raise AttentionInputError(
            f"{NAME} is self-attention on the grid: q and k must have the same length, got q {fmt_shape(q)} and "
            f"k {fmt_shape(k)} (the local window is positions of the query's own grid)")


def _layout(q, k, o):
    _check_self(q, k)
    grid = resolve_grid(NAME, o.grid, q.shape[2], "q")
    kernel = size_of(NAME, "kernel_size", o.kernel_size)
    if o.pool_size is not None:
        return grid, kernel, "adaptive", size_of(NAME, "pool_size", o.pool_size)
    return grid, kernel, "stride", size_of(NAME, "reduction", o.reduction)


# ------------------------------------------------------------------------ reference


@method(NAME, short_impl="gather", options=AggregatedOptions, paper="TransNeXt: Robust Foveal Visual Perception for Vision Transformers",
        summary="2-D: a local k×k window plus keys pooled over the whole grid, under one softmax (TransNeXt)",
        patterns=("noncausal_self",), time="O(N (k² + N/R²) D)", memory="O(N (k² + N/R²))", masks=False, grid=True,
        rows_independent=False, mask_mods=(foveal_window_mask,))
def aggregated(q, k, v, call):
    """Aggregated attention with the N × N window mask and the N × M pooled scores, one
    softmax over their concatenation (the definition).

    q: (B, Hq, N, D), k: (B, Hkv, N, D), v: (B, Hkv, N, Dv) -> (B, Hq, N, Dv), N = H·W.
    Weights: the effective ``(B, Hq, N, N)`` (local plus pooled spread over their keys).
    """
    o = call.options
    grid, kernel, kind, size = _layout(q, k, o)
    ct = compute_dtype(q.dtype)
    B, Hq, N = q.shape[0], q.shape[1], q.shape[2]
    km = call.key_mask
    idx = torch.arange(N, device=q.device)
    local = foveal_window_mask(grid, kernel)(0, 0, idx.view(-1, 1), idx.view(1, -1)).view(1, 1, N, N)
    if km is not None:
        local = local & km.view(B, 1, 1, N)
    windows = stride_windows(grid, size) if kind == "stride" else adaptive_windows(grid, size)
    P = pool_matrix(windows, N, km, dtype=ct, device=q.device)  # (M, N) or (B, M, N)
    P4 = P if km is None else P.unsqueeze(1)
    kp, vp = P4 @ k.to(ct), P4 @ v.to(ct)
    pooled_real = torch.ones(1, P.shape[-2], dtype=torch.bool, device=q.device) if km is None else P.sum(-1) > 0
    qc = q.to(ct)
    s_local = (qc @ repeat_kv(k, Hq).to(ct).transpose(-1, -2)) * call.scale  # (B, Hq, N, N)
    s_pool = (qc @ repeat_kv(kp, Hq).transpose(-1, -2)) * call.scale  # (B, Hq, N, M)
    allowed = torch.cat([local.expand(-1, -1, N, N), pooled_real.view(-1, 1, 1, P.shape[-2]).expand(-1, 1, N, -1)],
                        dim=-1)
    p = masked_softmax(torch.cat([s_local, s_pool], dim=-1), allowed)
    p_local, p_pool = p[..., :N], p[..., N:]
    out = (p_local @ repeat_kv(v, Hq).to(ct) + p_pool @ repeat_kv(vp, Hq)).to(q.dtype)
    if call.return_weights:
        return out, (p_local + p_pool @ P4).to(q.dtype)
    return out


# ---------------------------------------------------------------------------- gather


@lru_cache(maxsize=64)
def _window_index(grid: tuple, kernel: tuple) -> tuple:
    """``(idx (N, k_h·k_w), valid (N, k_h·k_w))``: the tokens of each query's centred
    window (invalid slots, outside the image, hold 0)."""
    H, W = grid
    kh, kw = kernel
    r = torch.arange(H).view(H, 1, 1, 1) + (torch.arange(kh) - kh // 2).view(1, 1, kh, 1)
    c = torch.arange(W).view(1, W, 1, 1) + (torch.arange(kw) - kw // 2).view(1, 1, 1, kw)
    valid = ((r >= 0) & (r < H) & (c >= 0) & (c < W)).reshape(H * W, kh * kw)
    idx = torch.where(valid, (r * W + c).reshape(H * W, kh * kw), torch.zeros((), dtype=torch.long))
    return idx, valid


@aggregated.impl("gather", description="each query's window gathered by index, pooled keys by avg_pool2d, one "
                                       "softmax over the k²+M scores: O(N·(k²+M)), never N×N")
def gather(q, k, v, call):
    """The window keys gathered per query, the pooled keys by torch's pooling, one
    softmax over their scores."""
    o = call.options
    grid, kernel, kind, size = _layout(q, k, o)
    ct = compute_dtype(q.dtype)
    B, Hq, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    G = Hq // Hkv
    km = call.key_mask
    idx, valid = _window_index(grid, kernel)
    idx, valid = idx.to(q.device), valid.to(q.device)
    K = idx.shape[1]
    kc, vc = k.to(ct), v.to(ct)
    flat = idx.reshape(-1)
    kg = kc.index_select(2, flat).view(B, Hkv, N, K, D)
    vg = vc.index_select(2, flat).view(B, Hkv, N, K, Dv)
    kp, vp, real = pool_kv(k, v, grid, kind, size, km)
    M = kp.shape[2]
    qg = q.to(ct).view(B, Hkv, G, N, D) * call.scale
    s_local = torch.einsum("bhgnd,bhnkd->bhgnk", qg, kg)
    s_pool = torch.einsum("bhgnd,bhmd->bhgnm", qg, kp)
    ok_local = valid.view(1, 1, 1, N, K)
    if km is not None:
        ok_local = ok_local & km[:, flat].view(B, 1, 1, N, K)
    ok_pool = torch.ones(1, 1, 1, 1, M, dtype=torch.bool, device=q.device) if real is None \
        else real.view(B, 1, 1, 1, M)
    shape = (B, Hkv, G, N)
    allowed = torch.cat([ok_local.expand(*shape, K), ok_pool.expand(*shape, M)], dim=-1)
    p = masked_softmax(torch.cat([s_local, s_pool], dim=-1), allowed)
    out = torch.einsum("bhgnk,bhnkd->bhgnd", p[..., :K], vg) + torch.einsum("bhgnm,bhmd->bhgnd", p[..., K:], vp)
    return out.reshape(B, Hq, N, Dv).to(q.dtype)
