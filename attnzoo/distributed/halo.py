"""Window methods on a sharded sequence: a halo exchange, then the method on each shard.

A query of ``sliding_window`` or 1-D ``neighborhood`` sees keys within a bounded
distance, so a rank needs, besides its own tokens, only the keys and values of a *halo*:
the last ``w - 1`` tokens before its shard (causal window ``w``), ``w // 2`` on each side
(noncausal), ``(k - 1)·d`` before it (causal neighbourhood of ``k`` with dilation ``d``),
about ``(k // 2 + 1)·d`` on each side (noncausal; more at the two ends of the sequence,
where NATTEN's window shifts inwards), plus the first ``sinks`` tokens (attention sinks)
for every rank that does not already hold them. The owners send those slices by
point-to-point messages (``batch_isend_irecv``; a halo wider than a neighbouring shard
reaches the shards beyond it), the halo's gradients travel back the same way in the
backward pass (a custom ``autograd.Function``).

Each shard piece ``[a, b)`` then runs the registered method *itself* (its fast path:
``band``/``block``/``gather``) as self-attention on the extended block ``[lo, hi)`` (the
sinks prepended when they are not in it), with zero queries at the halo positions whose
output rows are dropped. The result is exact, not approximate: relative positions inside
the block are the global ones, the window at a block border is clipped only where the
global window is (the block reaches the sequence's ends there), and NATTEN's border
shift happens exactly where it does globally (the block is the union of the shard's
global windows, widened by ``d`` so every dilated sub-sequence holds a full window).

Bytes per rank (:func:`halo_bytes`): the halo, independent of N — e.g. causal
``sliding_window`` with even contiguous shards sends ``min(w - 1, n_r)`` tokens of K and
V to the next rank, ``B·Hkv·(w-1)·(D+Dv)`` elements, and the backward sends the halo's
gradient back. Compute per rank O(n_r·w·D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch

from .. import registry
from ..api import attention
from ..errors import AttentionInputError, UnsupportedPattern
from . import comm
from .layout import SequenceLayout, resolve_layout
from .ring import check_local

HALO_METHODS = ("sliding_window", "neighborhood")

Segment = Tuple[int, int, int, int]  # (owner rank, owner's local start, length, offset in the fetched tensor)


@dataclass(frozen=True)
class Block:
    """How one shard piece ``[a, b)`` runs: the fetched key ranges (global, in order), the
    extended block's length and where the piece's queries sit in it."""

    piece: Tuple[int, int]
    ranges: Tuple[Tuple[int, int], ...]
    rows: Tuple[int, int]

    @property
    def length(self) -> int:
        return sum(b - a for a, b in self.ranges)


# ------------------------------------------------------------------ the windows


def _window_block(a: int, b: int, N: int, causal: bool, o) -> Block:
    """``sliding_window``: the window ``w`` (causal: ``(i - w, i]``; noncausal ``|j - i| <=
    w // 2``) and the ``sinks``."""
    w, S = int(o.window), int(o.sinks)
    lo, hi = (max(0, a - w + 1), b) if causal else (max(0, a - w // 2), min(N, b + w // 2))
    if S and lo > S:  # the sinks are prepended: the window never reaches them from the piece's rows
        return Block((a, b), ((0, S), (lo, hi)), (S + a - lo, S + b - lo))
    if S:
        lo = 0
    return Block((a, b), ((lo, hi),), (a - lo, b - lo))


def _neighborhood_block(a: int, b: int, N: int, causal: bool, o) -> Block:
    """1-D ``neighborhood`` (NATTEN): ``kernel_size`` k, ``dilation`` d; the union of the
    piece's windows, widened by d (bounded by the sequence)."""
    if o.grid is not None:
        raise UnsupportedPattern("sequence-parallel neighborhood attention is 1-D only (grid=None): a 2-D grid "
                                 "sharded by rows needs a 2-D halo; use ulysses_attention for 2-D")
    k, d = (int(x[0]) if isinstance(x, (tuple, list)) else int(x) for x in (o.kernel_size, o.dilation))
    if causal:
        lo = max(0, a - (k - 1) * d)
        return Block((a, b), ((lo, b),), (a - lo, b - lo))
    kk = min(k, N)
    if N // d < kk:
        raise AttentionInputError(f"neighborhood: with dilation={d} every dilated sub-sequence of the N={N} tokens "
                                  f"needs a full window of {kk}: N // dilation >= kernel_size is required")
    i = torch.arange(a, b)
    g, p = i % d, i // d
    L = (N - g + d - 1) // d
    start = torch.minimum(torch.clamp(p - kk // 2, min=0), L - kk)
    first, last = int((g + d * start).min()), int((g + d * (start + kk - 1)).max())
    lo, hi = max(0, first - d), min(N, last + 1 + d)
    return Block((a, b), ((lo, hi),), (a - lo, b - lo))


_BLOCKS = {"sliding_window": _window_block, "neighborhood": _neighborhood_block}


def plan_blocks(method: str, layout: SequenceLayout, causal: bool, options) -> List[List[Block]]:
    """Per rank, per piece: the :class:`Block` it runs."""
    fn = _BLOCKS[method]
    N = layout.seq_len
    return [[fn(a, b, N, causal, options) for a, b in layout.pieces[r] if b > a] for r in range(layout.world_size)]


def plan_segments(layout: SequenceLayout, needs: List[List[Tuple[int, int]]]) -> List[List[Segment]]:
    """For each rank, the segments of its needed global ranges (in order), each with the
    rank that owns it and where it starts in that rank's local tensor."""
    owned = []  # (global start, global end, owner, owner local start)
    for r in range(layout.world_size):
        for a, b, ls, _ in layout.local_ranges(r):
            if b > a:
                owned.append((a, b, r, ls))
    owned.sort()
    plans = []
    for ranges in needs:
        segs, off = [], 0
        for a, b in ranges:
            for pa, pb, owner, ls in owned:
                s, e = max(a, pa), min(b, pb)
                if s < e:
                    segs.append((owner, ls + s - pa, e - s, off + s - a))
            off += b - a
        plans.append(segs)
    return plans


# ------------------------------------------------------------------ the exchange


def _cat(parts, like, width):
    if not parts:
        return like.new_zeros(like.shape[0], like.shape[1], 0, width)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


class _FetchRanges(torch.autograd.Function):
    """``x (B, H, n_r, E)`` -> ``(B, H, L, E)``: this rank's needed segments, fetched
    from their owners; the backward returns each segment's gradient to its owner."""

    @staticmethod
    def forward(ctx, x, segments, group):
        world, rank = comm.world_and_rank(group)
        B, H, _, E = x.shape
        mine = segments[rank]
        total = sum(s[2] for s in mine)
        sends = []
        for dst in range(world):
            if dst != rank:
                parts = [x[:, :, ls:ls + n] for owner, ls, n, _ in segments[dst] if owner == rank]
                if parts:
                    sends.append((dst, _cat(parts, x, E).contiguous()))
        recvs, bufs = [], {}
        for src in range(world):
            n = sum(s[2] for s in mine if s[0] == src)
            if src != rank and n:
                bufs[src] = x.new_empty(B, H, n, E)
                recvs.append((src, bufs[src]))
        reqs = comm.exchange(sends, recvs, group, op="halo", tag=2)
        out = x.new_empty(B, H, total, E)
        for owner, ls, n, off in mine:
            if owner == rank:
                out[:, :, off:off + n] = x[:, :, ls:ls + n]
        comm.wait_all(reqs)
        pos = {src: 0 for src in bufs}
        for owner, ls, n, off in mine:
            if owner != rank:
                out[:, :, off:off + n] = bufs[owner][:, :, pos[owner]:pos[owner] + n]
                pos[owner] += n
        ctx.args = (segments, group, x.shape)
        return out

    @staticmethod
    def backward(ctx, g):
        segments, group, shape = ctx.args
        world, rank = comm.world_and_rank(group)
        B, H, n_local, E = shape
        g = g.contiguous()
        mine = segments[rank]
        sends = []
        for src in range(world):
            if src != rank:
                parts = [g[:, :, off:off + n] for owner, ls, n, off in mine if owner == src]
                if parts:
                    sends.append((src, _cat(parts, g, E).contiguous()))
        recvs, bufs = [], {}
        for dst in range(world):
            n = sum(s[2] for s in segments[dst] if s[0] == rank)
            if dst != rank and n:
                bufs[dst] = g.new_empty(B, H, n, E)
                recvs.append((dst, bufs[dst]))
        reqs = comm.exchange(sends, recvs, group, op="halo_bwd", tag=3)
        dx = g.new_zeros(B, H, n_local, E)
        for owner, ls, n, off in mine:
            if owner == rank:
                dx[:, :, ls:ls + n] += g[:, :, off:off + n]
        comm.wait_all(reqs)
        for dst, buf in bufs.items():
            pos = 0
            for owner, ls, n, _ in segments[dst]:
                if owner == rank:
                    dx[:, :, ls:ls + n] += buf[:, :, pos:pos + n]
                    pos += n
        return dx, None, None


# ------------------------------------------------------------------ the entry point


def halo_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *,
                   method: str = "sliding_window", causal: bool = False, scale: Optional[float] = None,
                   layout: Union[str, SequenceLayout] = "contiguous", impl: str = "auto",
                   **options) -> torch.Tensor:
    """A window method (``sliding_window``, 1-D ``neighborhood``) over the sequence
    sharded across ``group``, with a halo exchange of K/V.

    Args:
        q: ``(B, Hq, n_r, D)``, k ``(B, Hkv, n_r, D)``, v ``(B, Hkv, n_r, Dv)``: this rank's
            tokens (self-attention).
        method, impl, **options: the window method and its options (``window``, ``sinks``;
            ``kernel_size``, ``dilation``), run on each extended block.
        layout: any layout (zig-zag pieces get a halo each).

    Returns this rank's ``(B, Hq, n_r, Dv)``; differentiable in q, k, v.
    """
    check_local(q, k, v, "halo_attention")
    if method not in HALO_METHODS:
        raise AttentionInputError(f"halo_attention runs the window methods {', '.join(HALO_METHODS)}, got "
                                  f"{method!r}; use ulysses_attention for any other method")
    spec = registry.get(method)
    if not spec.supports_pattern(causal, False):
        raise UnsupportedPattern(f"method {method!r} has no {'causal' if causal else 'noncausal'} self form")
    opts = spec.resolve_options(options)
    world, rank = comm.world_and_rank(group)
    lay = resolve_layout(layout, q.shape[2], group)
    blocks = plan_blocks(method, lay, causal, opts)
    segments = plan_segments(lay, [[r for blk in rank_blocks for r in blk.ranges] for rank_blocks in blocks])
    D = k.shape[-1]
    kv = _FetchRanges.apply(torch.cat([k, v], dim=-1), segments, group)
    outs, off = [], 0
    pieces = [(a, b, ls, le) for a, b, ls, le in lay.local_ranges(rank) if b > a]
    for blk, (a, b, ls, le) in zip(blocks[rank], pieces):
        kb, vb = kv[:, :, off:off + blk.length, :D], kv[:, :, off:off + blk.length, D:]
        off += blk.length
        r0, r1 = blk.rows
        qp = q[:, :, ls:le]
        qb = torch.cat([qp.new_zeros(*qp.shape[:2], r0, qp.shape[3]), qp,
                        qp.new_zeros(*qp.shape[:2], blk.length - r1, qp.shape[3])], dim=2)
        out = attention(qb, kb, vb, method=method, impl=impl, causal=causal, scale=scale, **options)
        outs.append(out[:, :, r0:r1])
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def halo_bytes(method: str, layout: SequenceLayout, rank: int, *, causal: bool, batch: int, kv_heads: int,
               head_dim: int, v_dim: int, itemsize: int, backward: bool = False, **options) -> int:
    """Bytes rank ``rank`` sends in :func:`halo_attention`: the K/V segments other ranks
    need from it (``B·Hkv·(D+Dv)·itemsize`` per token), and in the backward the gradient of
    every segment it received."""
    opts = registry.get(method).resolve_options(options)
    blocks = plan_blocks(method, layout, causal, opts)
    segments = plan_segments(layout, [[r for blk in rb for r in blk.ranges] for rb in blocks])
    per_token = batch * kv_heads * (head_dim + v_dim) * itemsize
    sent = sum(n for dst, segs in enumerate(segments) if dst != rank for owner, _, n, _ in segs if owner == rank)
    if not backward:
        return sent * per_token
    received = sum(n for owner, _, n, _ in segments[rank] if owner != rank)
    return (sent + received) * per_token
