"""Building blocks shared by the method files: masks evaluated per block, GQA
helpers, ALiBi, and the row-chunked executor used by blocked fast paths."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..masks import dense_mask

#: Largest score block (elements) a blocked path materialises at once: 4 Mi
#: float32 = 16 MiB, below glibc's 32 MiB mmap threshold, so the block buffers are
#: recycled from the heap instead of being freshly mapped (and first-touched) each time.
BLOCK_ELEMENTS = 1 << 22


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half inputs, else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def repeat_kv(x: torch.Tensor, q_heads: int) -> torch.Tensor:
    """``(B, Hkv, N, D) -> (B, Hq, N, D)``: each k/v head serves ``Hq // Hkv`` query heads."""
    groups = q_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def alibi_slopes(heads: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """ALiBi's per-head slopes (Press et al., "Train Short, Test Long"): a geometric
    sequence ``2^(-8/n), 2^(-16/n), ...`` for ``n`` a power of two; other head counts
    take the slopes of the next power of two at odd positions, as in the paper's code."""

    def power_of_two(n: int) -> list:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(heads).is_integer():
        slopes = power_of_two(heads)
    else:
        closest = 2 ** math.floor(math.log2(heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=dtype, device=device)


def resolve_alibi(alibi, heads: int, device, dtype=torch.float32) -> Optional[torch.Tensor]:
    """``alibi`` option -> per-head slopes ``(Hq,)`` in ``dtype``, or None."""
    if alibi is None or alibi is False:
        return None
    if alibi is True:
        return alibi_slopes(heads, device, dtype)
    slopes = torch.as_tensor(alibi, device=device).to(dtype).flatten()
    if slopes.numel() != heads:
        from ..errors import AttentionInputError

        raise AttentionInputError(f"alibi slopes must have one value per query head ({heads}), got {slopes.numel()}")
    return slopes


def alibi_bias(slopes: torch.Tensor, qs: int, qe: int, ks: int, ke: int, offset: int) -> torch.Tensor:
    """ALiBi bias block ``(1, H, qe-qs, ke-ks)``: ``-slope * |pos_i - j|`` with query
    positions aligned lower-right (``pos_i = i + Nk - Nq``)."""
    pos = torch.arange(qs, qe, device=slopes.device, dtype=slopes.dtype) + offset
    key = torch.arange(ks, ke, device=slopes.device, dtype=slopes.dtype)
    dist = (pos[:, None] - key[None, :]).abs()
    return -slopes.view(1, -1, 1, 1) * dist


class Masker:
    """The combined mask of a call — causal (lower-right), a dense mask or a mask_mod,
    and key padding — evaluated on any ``[qs:qe] x [ks:ke]`` block, so blocked paths
    never build the ``Nq x Nk`` mask.

    ``block`` returns a bool tensor broadcastable to ``(B, Hq, qe-qs, ke-ks)`` or None
    when everything is visible.
    """

    def __init__(self, *, causal, mask, key_padding_mask, batch, heads, q_len, kv_len, device):
        self.causal = causal
        self.mask = mask
        self.kpm = key_padding_mask
        self.batch, self.heads = batch, heads
        self.q_len, self.kv_len = q_len, kv_len
        self.offset = kv_len - q_len
        self.device = device

    @property
    def trivial(self) -> bool:
        return not self.causal and self.mask is None and self.kpm is None

    def key_end(self, qs: int, qe: int) -> int:
        """One past the last key any query in ``[qs, qe)`` may see under causality."""
        if not self.causal:
            return self.kv_len
        return max(0, min(self.kv_len, qe - 1 + self.offset + 1))

    def block(self, qs: int, qe: int, ks: int, ke: int) -> Optional[torch.Tensor]:
        out = None
        if self.causal and ke - 1 > qs + self.offset:  # some key in the block is in the future
            qi = torch.arange(qs, qe, device=self.device).view(-1, 1) + self.offset
            ki = torch.arange(ks, ke, device=self.device).view(1, -1)
            out = (ki <= qi).view(1, 1, qe - qs, ke - ks)
        if self.mask is not None:
            if isinstance(self.mask, torch.Tensor):
                m = self.mask
                m = m[..., qs:qe, :] if m.shape[-2] != 1 else m
                m = m[..., ks:ke] if m.shape[-1] != 1 else m
            else:
                m = dense_mask(self.mask, self.batch, self.heads, qe - qs, ke - ks, self.device, q_start=qs, kv_start=ks)
            out = m if out is None else out & m
        if self.kpm is not None:
            m = self.kpm[:, ks:ke].view(self.batch, 1, 1, ke - ks)
            out = m if out is None else out & m
        return out

    def full(self) -> Optional[torch.Tensor]:
        return self.block(0, self.q_len, 0, self.kv_len)


def make_masker(q, k, causal, mask, key_padding_mask) -> Masker:
    return Masker(
        causal=causal,
        mask=mask,
        key_padding_mask=key_padding_mask,
        batch=q.shape[0],
        heads=q.shape[1],
        q_len=q.shape[2],
        kv_len=k.shape[2],
        device=q.device,
    )


def masked_softmax(s: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
    """Row softmax of ``s`` over the allowed entries; a row with nothing allowed gives
    zeros (plain softmax would give NaN there)."""
    if allowed is None:
        return torch.softmax(s, dim=-1)
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return p.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)


def group_mask(allowed: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """A mask broadcastable to ``(B, Hq, n, m)`` in the grouped layout ``(B, Hkv, G, n, m)``."""
    if allowed.shape[1] == 1:
        return allowed.unsqueeze(1)
    return allowed.reshape(allowed.shape[0], kv_heads, groups, allowed.shape[2], allowed.shape[3])


def visible_counts(causal: bool, q_len: int, kv_len: int, device, qs: int = 0, qe: Optional[int] = None,
                   dtype=torch.float32) -> torch.Tensor:
    """Number of keys each query ``[qs, qe)`` sees under the causal structure alone,
    shape ``(qe-qs, 1)`` (``Nk`` for noncausal, ``i + Nk - Nq + 1`` causal)."""
    qe = q_len if qe is None else qe
    if not causal:
        return torch.full((qe - qs, 1), float(kv_len), device=device, dtype=dtype)
    pos = torch.arange(qs, qe, device=device, dtype=dtype) + (kv_len - q_len)
    return (pos + 1).clamp(min=1).view(-1, 1)


def real_visible_counts(causal: bool, q_len: int, kv_len: int, key_padding_mask: Optional[torch.Tensor], device):
    """Real (unpadded) keys each query may see under causality: ``(B or 1, 1, Nq)`` float32."""
    pos = torch.arange(q_len, device=device) + (kv_len - q_len)
    if key_padding_mask is None:
        vis = (pos + 1).clamp(min=0, max=kv_len) if causal else torch.full_like(pos, kv_len)
        return vis.to(torch.float32).view(1, 1, q_len)
    prefix = torch.cat([key_padding_mask.new_zeros(key_padding_mask.shape[0], 1, dtype=torch.long),
                        key_padding_mask.long().cumsum(-1)], dim=-1)  # (B, Nk + 1)
    end = (pos + 1).clamp(min=0, max=kv_len) if causal else torch.full_like(pos, kv_len)
    return prefix[:, end].to(torch.float32).unsqueeze(1)


def mean_density(used: torch.Tensor, visible: torch.Tensor) -> float:
    """Mean over the rows that can see anything of ``used / visible`` (keys actually
    attended over real keys visible): the ``density`` sparse methods report."""
    used, visible = torch.broadcast_tensors(used.to(torch.float32), visible.to(torch.float32))
    rows = visible > 0
    if not bool(rows.any()):
        return 0.0
    return float((used[rows] / visible[rows]).mean())


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
    need — an int ``end`` (the prefix ``[0, end)``) or a LongTensor of key positions
    (gathered compactly). ``seg_fn(q_seg, k_seg, v_seg, item)`` computes the rows.

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
                else:
                    buf.index_add_(2, keys, g.to(acc))
        grads = [g.to(t.dtype) if need else None
                 for g, t, need in zip((dq, dk, dv), (q, k, v), ctx.needs_input_grad[2:])]
        return (None, None, *grads)


def _select(k, v, keys):
    if isinstance(keys, int):
        return k[:, :, :keys], v[:, :, :keys]
    return k.index_select(2, keys), v.index_select(2, keys)


def segmented(seg_fn: Callable, plan: list, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Run ``seg_fn`` over the plan's segments (see :class:`_Segmented`); under autograd
    only q, k, v are kept and each segment is recomputed in the backward pass."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
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
