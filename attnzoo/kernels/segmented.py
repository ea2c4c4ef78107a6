"""The segmented executor: attention computed segment by segment, with a backward pass
that recomputes one segment at a time.

Blocked fast paths (row chunks of a dense method, the block-sparse kernel, gathers)
describe their work as a *plan* of segments — query rows and the keys they need — and
a segment function; :func:`segmented` runs it so that under autograd only q, k, v are
kept and no segment's intermediate outlives it: memory O(segment), never O(Nq x Nk).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .common import BLOCK_ELEMENTS, compute_dtype, needs_graph
from .masking import Masker


def rows_per_chunk(batch: int, heads: int, kv_len: int, block_q: Optional[int]) -> int:
    """Query rows per chunk so that one ``(B, H, rows, Nk)`` score block stays under
    :data:`BLOCK_ELEMENTS`."""
    if block_q is not None:
        return max(1, int(block_q))
    return max(16, min(1024, BLOCK_ELEMENTS // max(1, batch * heads * kv_len)))


class _Segmented(torch.autograd.Function):
    """Attention computed segment by segment with no graph kept, and a backward that
    recomputes one segment at a time and accumulates its gradients into preallocated
    buffers.

    Each plan item is ``(qs, qe, keys)``: the query rows ``[qs, qe)`` and the keys they
    need — an int ``end`` (the prefix ``[0, end)``), a ``slice`` (a contiguous range) or a
    LongTensor of key positions (gathered compactly). ``seg_fn(q_seg, k_seg, v_seg, item)`` computes the rows.

    (Slicing or gathering the inputs under plain autograd would make every segment's
    backward allocate and add a zero gradient the size of the whole of q, k and v:
    O(N) work per segment, O(N²) and worse in all.)"""

    @staticmethod
    def forward(ctx, seg_fn, plan, q, k, v):
        with torch.no_grad():
            outs = [seg_fn(q[:, :, qs:qe], *_select(k, v, keys), (qs, qe, keys)) for qs, qe, keys in plan]
        ctx.save_for_backward(q, k, v)
        ctx.seg_fn, ctx.plan = seg_fn, plan
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        acc = compute_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        for qs, qe, keys in ctx.plan:
            with torch.enable_grad():
                qb = q[:, :, qs:qe].detach().requires_grad_(True)
                kb, vb = (t.detach().requires_grad_(True) for t in _select(k, v, keys))
                out = ctx.seg_fn(qb, kb, vb, (qs, qe, keys))
                gq, gk, gv = torch.autograd.grad(out, (qb, kb, vb), dout[:, :, qs:qe], allow_unused=True)
            if gq is not None:
                dq[:, :, qs:qe] += gq
            for buf, g in ((dk, gk), (dv, gv)):
                if g is None:
                    continue
                if isinstance(keys, int):
                    buf[:, :, :keys] += g
                elif isinstance(keys, slice):
                    buf[:, :, keys] += g
                else:
                    buf.index_add_(2, keys, g.to(acc))
        grads = [g.to(t.dtype) if need else None
                 for g, t, need in zip((dq, dk, dv), (q, k, v), ctx.needs_input_grad[2:])]
        return (None, None, *grads)


def _select(k, v, keys):
    if isinstance(keys, int):
        return k[:, :, :keys], v[:, :, :keys]
    if isinstance(keys, slice):
        return k[:, :, keys], v[:, :, keys]
    return k.index_select(2, keys), v.index_select(2, keys)


def segmented(seg_fn: Callable, plan: list, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Run ``seg_fn`` over the plan's segments (see :class:`_Segmented`); under autograd
    only q, k, v are kept and each segment is recomputed in the backward pass."""
    if needs_graph(q, k, v):
        return _Segmented.apply(seg_fn, plan, q, k, v)
    outs = [seg_fn(q[:, :, qs:qe], *_select(k, v, keys), (qs, qe, keys)) for qs, qe, keys in plan]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def chunked_rows(
    row_fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, masker: Masker, block_q: Optional[int] = None
) -> torch.Tensor:
    """Run ``row_fn(q_chunk, k, v, qs, qe)`` over chunks of query rows and concatenate.

    Each chunk sees all the keys it may attend to (``k[:, :, :key_end]``), so any
    row-wise maths (a normalisation, a clip) stays exact. ``row_fn`` must be
    differentiable in its three tensors only (no parameters of its own). Under autograd
    only q, k, v are kept and each chunk's ``rows x Nk`` scores are recomputed in the
    backward pass, so memory is O(rows * Nk), never O(Nq * Nk).
    """
    B, H, Nq, _ = q.shape
    rows = rows_per_chunk(B, H, k.shape[2], block_q)
    plan = []
    for qs in range(0, Nq, rows):
        qe = min(Nq, qs + rows)
        plan.append((qs, qe, max(1, masker.key_end(qs, qe))))  # >= 1 key: fully masked rows give zeros
    return segmented(lambda qb, kb, vb, item: row_fn(qb, kb, vb, item[0], item[1]), plan, q, k, v)
