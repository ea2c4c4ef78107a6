"""Row-chunked attention with a hand-written backward, for methods whose weights are an
elementwise (or row-wise) function of the scores: ``W = f(S)``, ``O = W V``.

    S = scale · Q Kᵀ + bias   [-inf on the causal triangle]      W = f(S)      O = W V

The forward runs over chunks of query rows (each sees its whole visible key prefix, so
row-wise maths such as a softmax stays exact) and keeps only q, k, v. The backward
recomputes a chunk's scores and weights and applies the chain rule by hand —

    dW = dO Vᵀ     dS = f'(S)ᵀ dW     dQ = scale · dS K     dK += scale · dSᵀ Q     dV += Wᵀ dO

— five GEMMs and a few elementwise passes per chunk, with no autograd graph (the generic
:func:`~attnzoo.kernels.segmented.segmented` executor rebuilds one per chunk). GQA runs
in the grouped layout ``(B·Hkv, G·n, ·)``, so K and V are never repeated. Memory
O(rows · Nk), never O(Nq · Nk).

A *row transform* has ``forward(s) -> (w, saved)`` and ``backward(dw, saved) -> ds``
(``s``: ``(B·Hkv, G·n, m)`` float scores with ``-inf`` where masked; it may work in place
on ``s``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .common import BLOCK_ELEMENTS, compute_dtype
from .dense import mask_future_


class SigmoidRows:
    """``W = sigmoid(S)`` (masked entries: sigmoid(-inf) = 0, and their derivative 0)."""

    @staticmethod
    def forward(s):
        w = s.sigmoid_()
        return w, w

    @staticmethod
    def backward(dw, w):
        return torch.ops.aten.sigmoid_backward(dw, w)


class ClippedSoftmaxRows:
    """``W = clip((ζ - γ_i) softmax(S) + γ_i, 0, 1)``; ``gamma``: a ``(1, G·n, 1)`` tensor
    (per row) made by ``gamma_of(qs, qe)``."""

    def __init__(self, zeta: float, gamma_of: Callable):
        self.zeta, self.gamma_of = zeta, gamma_of

    def forward(self, s, gamma):
        p = torch.softmax(s, dim=-1)
        w = torch.addcmul(gamma, p, self.zeta - gamma)
        inside = (w >= 0) & (w <= 1)  # where the clamp passes gradients (bounds included): 1 byte a score
        return w.clamp_(0.0, 1.0), (p, inside, gamma)

    def forward_only(self, s, gamma):
        """The forward without what the backward needs: one (rows, keys) tensor, in place."""
        w = torch.softmax(s, dim=-1)
        return w.mul_(self.zeta - gamma).add_(gamma).clamp_(0.0, 1.0), None

    def backward(self, dw, saved):
        p, inside, gamma = saved
        dp = dw.mul_(inside).mul_(self.zeta - gamma)  # the clamp's gradient, then the stretch's
        return torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)


def rows_per_chunk(batch_heads: int, kv_len: int, block_q: Optional[int]) -> int:
    if block_q is not None:
        return max(1, int(block_q))
    return max(16, min(1024, BLOCK_ELEMENTS // max(1, batch_heads * kv_len)))


class _RowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, transform, scale, causal, bias_of, extra_of, rows):
        ctx.save_for_backward(q, k, v)
        ctx.args = (transform, scale, causal, bias_of, extra_of, rows)
        with torch.no_grad():
            return _run(q, k, v, transform, scale, causal, bias_of, extra_of, rows, None)[0]

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        transform, scale, causal, bias_of, extra_of, rows = ctx.args
        _, grads = _run(q, k, v, transform, scale, causal, bias_of, extra_of, rows, dout)
        dq, dk, dv = grads
        needs = ctx.needs_input_grad
        return (dq.to(q.dtype) if needs[0] else None, dk.to(k.dtype) if needs[1] else None,
                dv.to(v.dtype) if needs[2] else None, None, None, None, None, None, None)


def _run(q, k, v, transform, scale, causal, bias_of, extra_of, rows, dout):
    """The forward (``dout`` None: returns the output) or the backward (returns dq, dk, dv)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    ct = compute_dtype(q.dtype)
    offset = Nk - Nq
    out = None if dout is not None else torch.empty(B, Hq, Nq, Dv, dtype=q.dtype, device=q.device)
    if dout is not None:
        dq = torch.empty(B, Hq, Nq, D, dtype=ct, device=q.device)
        dk = torch.zeros(B, Hkv, Nk, D, dtype=ct, device=q.device)
        dv = torch.zeros(B, Hkv, Nk, Dv, dtype=ct, device=q.device)
        dkf, dvf = dk.view(B * Hkv, Nk, D), dv.view(B * Hkv, Nk, Dv)
    # (B·H, N, D) views, sliced per chunk: slicing the 4-D tensors first and reshaping
    # copied every chunk's key and value prefix (O(N²/rows) copies, a quarter of the forward)
    kf = k.to(ct).reshape(B * Hkv, Nk, D)
    vf = v.to(ct).reshape(B * Hkv, Nk, Dv)
    qf = q.to(ct).reshape(B * Hkv, Nq, D) if G == 1 else None
    # the forward alone needs nothing saved for a backward: the transform's lighter form if it has one
    forward = transform.forward_only if dout is None and hasattr(transform, "forward_only") else transform.forward
    for qs in range(0, Nq, rows):
        qe = min(Nq, qs + rows)
        n = qe - qs
        m = max(1, min(Nk, qe + offset)) if causal else Nk  # the keys any row of the chunk may see
        qc = qf[:, qs:qe] if qf is not None else q[:, :, qs:qe].to(ct).reshape(B * Hkv, G * n, D)
        kc, vc = kf[:, :m], vf[:, :m]
        bias = bias_of(qs, qe)
        s = (torch.baddbmm(bias, qc, kc.transpose(-1, -2), alpha=scale) if bias is not None
             else torch.bmm(qc, kc.transpose(-1, -2)).mul_(scale))
        if causal:
            mask_future_(s.view(B * Hkv, G, n, m), qs, offset)
        extra = extra_of(qs, qe) if extra_of is not None else None
        w, saved = forward(s, extra) if extra is not None else forward(s)
        if dout is None:
            out[:, :, qs:qe] = (w @ vc).view(B, Hkv * G, n, Dv)
            continue
        do = dout[:, :, qs:qe].to(ct).reshape(B * Hkv, G * n, Dv)
        dw = do @ vc.transpose(-1, -2)
        ds = transform.backward(dw, saved)
        dq[:, :, qs:qe] = (ds @ kc).mul_(scale).view(B, Hq, n, D)
        # accumulated in place (into a strided prefix baddbmm_ runs one addmm_ per batch
        # entry: measured 505 against 607 ms self CPU for the temporary-and-add at N = 4,096)
        dkf[:, :m].baddbmm_(ds.transpose(-1, -2), qc, alpha=scale)
        dvf[:, :m].baddbmm_(w.transpose(-1, -2), do)
    return out, (None if dout is None else (dq, dk, dv))


def row_attention(q, k, v, transform, *, scale: float, causal: bool, bias_of: Callable = lambda qs, qe: None,
                  extra_of: Optional[Callable] = None, block_q: Optional[int] = None) -> torch.Tensor:
    """``O = f(scale · Q Kᵀ + bias) V`` over row chunks with the hand-written backward.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    ``bias_of(qs, qe)``: the additive bias of the rows ``[qs, qe)`` broadcastable to
    ``(B·Hkv, G·n, m)`` (e.g. ``(1, G·n, 1)`` per row), or None. ``extra_of(qs, qe)``: a
    per-chunk argument of the transform's forward, or None. ``causal``: lower-right.
    Every row must see at least one key unless ``f`` maps ``-inf`` to 0 (sigmoid does).
    """
    B, Hq = q.shape[0], q.shape[1]
    rows = rows_per_chunk(B * Hq, k.shape[2], block_q)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _RowAttention.apply(q, k, v, transform, scale, causal, bias_of, extra_of, rows)
    return _run(q, k, v, transform, scale, causal, bias_of, extra_of, rows, None)[0]
