"""HiLo attention (LITv2): high-frequency heads in local windows, low-frequency heads
attending to average-pooled keys and values.

    heads split by α: the last ⌊α·Hq⌋ query heads are Lo-Fi, the first Hq - ⌊α·Hq⌋ Hi-Fi
    Hi-Fi: window attention in non-overlapping s × s windows (local detail)
    Lo-Fi: every query attends to K̄ = pool_s(K), V̄ = pool_s(V), the s × s average-
           pooled keys and values (one per window: global structure)
           O = softmax(scale · Q K̄ᵀ) V̄                      (N × N/s² scores)
    output: the heads concatenated (Hi-Fi first, as LITv2 concatenates its branches)

"Fast Vision Transformers with HiLo Attention" (Pan et al., NeurIPS 2022): high
frequencies carry local detail and low frequencies global structure, so HiLo splits the
heads of a layer: the Hi-Fi group runs self-attention in ``s × s`` windows, the Lo-Fi
group has each query attend to the average-pooled windows. LITv2 uses ``s = 2`` and
``α = 0.9``; the paper designs by measured speed, not FLOPs, and reports that «HiLo is
1.4x faster than spatial reduction attention and 1.6x faster than local window
attention on CPUs».

Pooling the keys and values given to the call equals LITv2's pooling of the input
features before its K/V projection (a linear map commutes with averaging).

Judgement calls:

* [J] Heads: ``⌊α·Hq⌋`` Lo-Fi heads (LITv2: ``l_heads = int(num_heads * alpha)``), the rest
  Hi-Fi; with GQA each query head keeps its kv head, whose keys and values the Lo-Fi
  heads see pooled.
* [J] Padding: the Hi-Fi windows pad the grid at the bottom and on the right, padded
  cells absent (LITv2 pads with zero tokens that are attended); the Lo-Fi pooling is in
  ceil mode, a partial window at the edge averaging its real cells (LITv2's AvgPool2d
  floors, dropping the last rows and columns from the keys). A window larger than the
  grid is clamped to it.
* [J] Key padding: padded keys leave the Hi-Fi windows and the Lo-Fi averages; a pooled
  window with no real key is masked out. A general mask has no meaning over the pooled
  keys, so the spec takes key padding only (``masks=False``).
* [J] The weights returned by the reference are the effective ``N × N`` weights over the
  tokens: the window weights for the Hi-Fi heads, ``softmax(Q K̄ᵀ)·P`` (``P`` the pooling
  matrix) for the Lo-Fi heads.
* Self-attention only (``noncausal_self``).

Complexity: time O(N·s²·D) (Hi-Fi) + O(N²/s²·D) (Lo-Fi), memory O(N·s²) + O(N·D) with
SDPA's fused kernel (``hilo``); the reference builds N×N: O(N²).

Implementations:

* ``reference`` — the dense window mask for the Hi-Fi heads, the explicit pooling matrix
  (:func:`attnzoo.kernels.grid2d.pool_matrix`) for the Lo-Fi heads;
* ``hilo`` — window partition + SDPA for the Hi-Fi heads, token pooling
  (:func:`attnzoo.kernels.grid2d.pool_tokens`) + SDPA over the ``N/s²`` pooled keys for the
  Lo-Fi heads; never N×N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ...errors import AttentionInputError
from ...kernels.common import compute_dtype, int_pair
from ...kernels.dense import softmax_attention
from ...kernels.grid2d import check_grid, clamp_to_grid, group_attention, head_kv, pool_matrix, pool_tokens, \
    size_pair, square_grid, window_groups
from ...kernels.masking import dense_mask
from ...registry import MethodOptions, method

NAME = "hilo"


def lofi_heads(heads: int, alpha: float) -> int:
    """How many of ``heads`` query heads are Lo-Fi: ``⌊α·heads⌋`` (LITv2's ``int(num_heads * alpha)``)."""
    return int(heads * alpha)


@dataclass(frozen=True)
class HiLoOptions(MethodOptions):
    """Options of ``hilo``.

    Attributes:
        grid: ``(H, W)``, the grid of the tokens (row-major, ``H·W = N``); required.
        window_size: ``s``, the Hi-Fi windows and the Lo-Fi pooling, an int or ``(rows,
            cols)`` (LITv2: 2).
        alpha: the fraction of Lo-Fi heads, in [0, 1] (LITv2: 0.9).
    """

    grid: Optional[tuple] = None
    window_size: Union[int, tuple] = 2
    alpha: float = 0.9

    def validate(self) -> None:
        if self.grid is not None:
            int_pair(f"{NAME}: grid", self.grid)
        size_pair(NAME, "window_size", self.window_size)
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise AttentionInputError(f"{NAME}: alpha (the fraction of Lo-Fi heads) must be in [0, 1], got "
                                      f"{self.alpha!r}")

    @classmethod
    def for_length(cls, n: int) -> dict:
        """The most square grid of ``n`` tokens, LITv2's ``s = 2`` (and ``α = 0.9``)."""
        return {"grid": square_grid(n), "window_size": 2}


def _geometry(q, k, call):
    o = call.options
    grid = check_grid(NAME, o.grid, q, k)
    return grid, clamp_to_grid(size_pair(NAME, "window_size", o.window_size), grid), \
        lofi_heads(call.q_heads, float(o.alpha))


def _window_mod(grid, size):
    W = grid[1]
    sh, sw = size

    def hifi_window(b, h, q_idx, kv_idx):
        return ((q_idx // W) // sh == (kv_idx // W) // sh) & ((q_idx % W) // sw == (kv_idx % W) // sw)

    return hifi_window


@method(NAME, options=HiLoOptions, paper="Fast Vision Transformers with HiLo Attention",
        summary="2-D: Hi-Fi heads in s×s windows, Lo-Fi heads over s×s average-pooled keys/values (LITv2)",
        patterns=("noncausal_self",), time="O(N s² D + N² D / s²)", memory="O(N s² + N D); O(N^2) reference",
        masks=False, grid=True, rows_independent=False, short_impl="hilo")
def hilo(q, k, v, call):
    """HiLo attention with the dense window mask and the explicit pooling matrix.

    q: (B, Hq, N, D), k: (B, Hkv, N, D), v: (B, Hkv, N, Dv) -> (B, Hq, N, Dv), N = H·W.
    """
    grid, size, nlo = _geometry(q, k, call)
    B, Hq, N, _ = q.shape
    nhi = Hq - nlo
    ct = compute_dtype(q.dtype)
    outs, weights = [], []
    if nhi:
        kh, vh = head_kv(k, v, Hq, 0, nhi)
        allowed = dense_mask(_window_mod(grid, size), B, nhi, N, N, q.device)
        res = softmax_attention(q[:, :nhi], kh, vh, scale=call.scale, mask=allowed, key_mask=call.key_mask,
                                return_weights=call.return_weights)
        outs.append(res[0] if call.return_weights else res)
        if call.return_weights:
            weights.append(res[1].to(ct))
    if nlo:
        kl, vl = head_kv(k, v, Hq, nhi, Hq)
        P = pool_matrix(grid, size, ct, q.device, key_mask=call.key_mask)  # (M, N) or (B, M, N)
        Pb = P if P.dim() == 3 else P.unsqueeze(0)
        kp, vp = Pb.unsqueeze(1) @ kl.to(ct), Pb.unsqueeze(1) @ vl.to(ct)  # pooled keys / values (B, h, M, ·)
        real = Pb.sum(-1) > 0  # (B|1, M): a pooled window with a real key
        res = softmax_attention(q[:, nhi:].to(ct), kp.expand(B, -1, -1, -1), vp.expand(B, -1, -1, -1),
                                scale=call.scale, key_mask=real.expand(B, -1), return_weights=True)
        outs.append(res[0].to(q.dtype))
        if call.return_weights:
            weights.append(res[1] @ Pb.unsqueeze(1))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    if call.return_weights:
        return out, (weights[0] if len(weights) == 1 else torch.cat(weights, dim=1)).to(q.dtype)
    return out


@hilo.impl("hilo", description="Hi-Fi heads: window partition + SDPA; Lo-Fi heads: pooled K/V (N/s² keys) + SDPA; "
                               "never N×N")
def hilo_fast(q, k, v, call):
    """Hi-Fi window attention and Lo-Fi pooled attention, both by SDPA, heads concatenated."""
    grid, size, nlo = _geometry(q, k, call)
    B, Hq, N, _ = q.shape
    nhi = Hq - nlo
    outs = []
    if nhi:
        kh, vh = head_kv(k, v, Hq, 0, nhi)
        outs.append(group_attention(q[:, :nhi], kh, vh, window_groups(grid, size, device=q.device),
                                    scale=call.scale, key_mask=call.key_mask))
    if nlo:
        kl, vl = head_kv(k, v, Hq, nhi, Hq)
        kp, real, _ = pool_tokens(kl, grid, size, call.key_mask)
        vp, _, _ = pool_tokens(vl, grid, size, call.key_mask)
        ql = q[:, nhi:].to(kp.dtype)
        am = None if real is None else real.view(B, 1, 1, -1)
        out = F.scaled_dot_product_attention(ql, kp, vp, attn_mask=am, scale=call.scale,
                                             enable_gqa=ql.shape[1] != kp.shape[1])
        if real is not None:
            out = out.masked_fill(~real.any(-1).view(B, 1, 1, 1), 0.0)
        outs.append(out.to(q.dtype))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

