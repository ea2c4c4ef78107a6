"""Head-level maths shared by the head mixtures (:mod:`attnzoo.layers.mixtures`) and the
methods of ``attnzoo/methods/mixtures``.

* :func:`two_stage_gates` — MoH's routing weights ("MoH: Multi-Head Attention as
  Mixture-of-Head Attention"): shared heads always on, the top-k of the routed heads,
  the two stages mixed by a second softmax; :func:`balance_loss`, MoH's load-balance loss;
* :func:`add_auxiliary_loss` — attach an auxiliary loss to a tensor so that
  ``loss.backward()`` on anything computed from it also back-propagates the auxiliary
  loss (how a layer adds its balance loss without a change to the training loop);
* :func:`chunked_rows_with_data` — the segmented executor's row chunks with per-row data
  (a per-query quantity, a learnable per-head value broadcast over the rows) that
  receives gradients: it rides along as extra channels of q;
* :func:`depthwise_conv_seq` — depth-wise convolution along the sequence of a
  ``(B, H, N, D)`` tensor with a centred odd kernel, causal (past taps only) or not.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..errors import AttentionInputError, fmt_shape
from .common import compute_dtype
from .masking import Masker
from .segmented import chunked_rows

# ------------------------------------------------------------------------------ MoH


def two_stage_gates(shared_logits: Optional[torch.Tensor], routed_logits: Optional[torch.Tensor],
                    mix_logits: Optional[torch.Tensor], top_k: int):
    """MoH's two-stage routing weights for each token.

    ``shared_logits (..., h_s) = W_s x``, ``routed_logits (..., h_r) = W_r x``,
    ``mix_logits (..., 2) = W_h x`` (either of the first two may be None when there are
    no heads of that kind)::

        [α1, α2] = softmax(W_h x)
        g_i = α1 · softmax(W_s x)_i                       shared heads, 1 <= i <= h_s
        g_i = α2 · softmax(W_r x)_i   if i in top-k(W_r x)  routed heads
        g_i = 0                        otherwise

    Returns ``(gates (..., h_s + h_r), chosen (..., h_r) bool, probs (..., h_r))`` with
    ``probs = softmax(W_r x)`` (what the balance loss reads). The softmax over the routed
    heads runs over all of them and is not renormalised after the top-k, as in the
    paper's equation. [J] With no shared heads (or no routed ones) there is one stage and
    its α is 1 (``mix_logits`` is then ignored). Ties in the top-k go to the lower index. In float32 for half inputs.
    """
    parts = []
    alpha = None
    some = shared_logits if shared_logits is not None else routed_logits
    ct = compute_dtype(some.dtype)
    if shared_logits is not None and routed_logits is not None:
        alpha = torch.softmax(mix_logits.to(ct), dim=-1)
    chosen = probs = None
    if shared_logits is not None:
        g = torch.softmax(shared_logits.to(ct), dim=-1)
        parts.append(g if alpha is None else alpha[..., :1] * g)
    if routed_logits is not None:
        probs = torch.softmax(routed_logits.to(ct), dim=-1)
        r = routed_logits.shape[-1]
        k = max(0, min(int(top_k), r))
        # stable top-k: equal logits go to the lower head index (torch.topk leaves ties unspecified)
        order = torch.sort(routed_logits.to(ct), dim=-1, descending=True, stable=True).indices[..., :k]
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, True)
        g = probs * chosen
        parts.append(g if alpha is None else alpha[..., 1:] * g)
    return torch.cat(parts, dim=-1), chosen, probs


def balance_loss(chosen: torch.Tensor, probs: torch.Tensor, token_mask: Optional[torch.Tensor] = None):
    """MoH's load-balance loss ``L_b = Σ_i f_i P_i`` over the routed heads, with ``f_i``
    the fraction of tokens that chose head ``i`` and ``P_i`` the mean routing probability
    of head ``i`` (``chosen``, ``probs``: ``(..., h_r)``; ``token_mask``: which tokens
    count, broadcastable to ``chosen.shape[:-1]``). [J] The formula as the paper writes
    it, with no factor of ``h_r``: the loss weight β absorbs it."""
    c, p = chosen.to(probs.dtype).reshape(-1, chosen.shape[-1]), probs.reshape(-1, probs.shape[-1])
    if token_mask is not None:
        keep = token_mask.expand(chosen.shape[:-1]).reshape(-1)
        c, p = c[keep], p[keep]
    if c.shape[0] == 0:
        return probs.sum() * 0.0
    return (c.mean(0) * p.mean(0)).sum()


class _AuxLoss(torch.autograd.Function):
    """Identity on ``x``; the backward pass gives ``loss`` a gradient of one."""

    @staticmethod
    def forward(ctx, x, loss):
        ctx.loss_shape, ctx.loss_dtype, ctx.loss_device = loss.shape, loss.dtype, loss.device
        return x.clone()  # a fresh tensor: a view of an input would carry view semantics out of the Function

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=ctx.loss_device)


def add_auxiliary_loss(x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """``x`` unchanged, except that back-propagating anything computed from it also
    back-propagates ``loss`` (a scalar) with weight one — as if ``loss`` had been added
    to the training loss (the trick of DeepSeekMoE's ``AddAuxiliaryLoss``)."""
    if not (torch.is_grad_enabled() and loss.requires_grad):
        return x
    return _AuxLoss.apply(x, loss)


# ---------------------------------------------------------------------- row chunks


def chunked_rows_with_data(row_fn: Callable, q: torch.Tensor, row_data: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, masker: Masker, block_q: Optional[int] = None) -> torch.Tensor:
    """:func:`attnzoo.kernels.segmented.chunked_rows` with per-row data that gets gradients.

    ``row_data``: ``(B, H, Nq, C)`` (anything broadcastable to it), per query row, e.g. a
    learnable per-head value broadcast over the rows, or a per-row product ``q Rᵀ``.
    The segmented executor differentiates only its three tensors, so the data rides
    along as ``C`` extra channels of q (both in the compute dtype); ``row_fn(qb, db, kb,
    vb, qs, qe)`` receives the chunk's queries ``(B, H, n, D)`` and data ``(B, H, n, C)``
    apart. Memory O(rows · Nk), as ``chunked_rows``.
    """
    B, H, Nq, D = q.shape
    ct = compute_dtype(q.dtype)
    data = row_data.to(ct).expand(B, H, Nq, row_data.shape[-1])
    qa = torch.cat([q.to(ct), data], dim=-1)

    def rows(qb, kb, vb, qs, qe):
        return row_fn(qb[..., :D], qb[..., D:], kb, vb, qs, qe)

    return chunked_rows(rows, qa, k, v, masker, block_q)


# --------------------------------------------------------------------- convolutions


def check_depthwise(name: str, weight, channels: int, layout: str) -> None:
    """A depth-wise kernel ``(channels, 1, k)`` (or ``(1, 1, k)``, shared) with ``k`` odd."""
    if not isinstance(weight, torch.Tensor):
        raise AttentionInputError(f"{name} must be a tensor {layout}, got {type(weight).__name__}")
    if (weight.dim() != 3 or weight.shape[1] != 1 or weight.shape[0] not in (1, channels) or weight.shape[2] < 1
            or weight.shape[2] % 2 == 0):
        raise AttentionInputError(
            f"{name} must have shape {layout} = ({channels}, 1, k) with k odd (or (1, 1, k), one kernel shared by "
            f"every channel), got {fmt_shape(weight)}")


def depthwise_conv_seq(x: torch.Tensor, weight: torch.Tensor, causal: bool) -> torch.Tensor:
    """Depth-wise convolution of ``x (B, H, N, D)`` along N, channel ``(h, d)`` by its own
    kernel ``weight[(h·D + d), 0]`` of odd size ``k`` (or one kernel for all channels),
    centred, zero padding::

        y[t] = Σ_u w[u] · x[t + u - c]        c = (k - 1) // 2,  u = 0 .. k-1   (noncausal)
        y[t] = Σ_{u <= c} w[u] · x[t + u - c]                                  (causal: past taps only)

    In the compute dtype (float32 for half inputs). ``F.conv1d`` with groups = channels.
    """
    B, H, N, D = x.shape
    ct = compute_dtype(x.dtype)
    C, k = H * D, weight.shape[-1]
    c = (k - 1) // 2
    w = weight.to(device=x.device, dtype=ct).expand(C, 1, k)
    if causal:
        w = w[..., : c + 1]  # taps u <= c: x[t - c .. t]
        pad = (c, 0)
    else:
        pad = (c, c)
    xs = F.pad(x.to(ct).permute(0, 1, 3, 2).reshape(B, C, N), pad)
    y = F.conv1d(xs, w, groups=C)
    return y.view(B, H, D, N).permute(0, 1, 3, 2)
