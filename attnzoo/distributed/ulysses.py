"""Ulysses sequence parallelism: all-to-all from sequence shards to head shards, any
attnzoo method in the middle, all-to-all back.

"DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long Sequence
Transformer Models" (Jacobs et al., 2023); yunchang pairs it with ring attention. Each of
the ``P`` ranks holds ``n_r`` tokens of every head; one all-to-all per tensor gives each
rank ``H / P`` whole heads over the whole sequence (``N`` tokens), where any registered
method runs unchanged — softmax, linear, windows, routed, with its options — because
heads are independent. One all-to-all brings the output back to sequence shards. The
backward is the same two exchanges in reverse (an all-to-all's adjoint is the inverse
all-to-all), so autograd works through the method as usual.

Requirements: ``Hq % P == 0``. [J] GQA with ``Hkv % P != 0`` repeats each K/V head to
the smallest count that ``P`` divides and that divides ``Hq`` (yunchang's approach),
which costs that much more traffic; ``Hkv % P == 0`` sends K/V as they are. Options with
one value per query head (ALiBi slopes, lightning's decays, MoA's spans) are sliced to
the rank's heads, their defaults made explicit first (:func:`head_options`). The zig-zag
layout is reordered into sequence order after the exchange and back before it, so
Ulysses layers can sit in a model whose ring layers use zig-zag shards.

Per rank: bytes sent forward ``(P-1)/P · n_r·B·(Hq·D + Hkv'·(D+Dv))`` for q, k, v plus
``B·Hq/P·(N - n_r)·Dv`` for the output (:func:`ulysses_bytes`), i.e. O(N/P) each — it
grows with N, like the ring; compute is the method's own on ``(B, H/P, N)``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import registry
from ..api import attention
from ..errors import AttentionInputError
from ..kernels.common import repeat_kv
from ..kernels.score_mods import alibi_slopes
from . import comm
from .lasp2 import lightning_decays
from .layout import SequenceLayout, resolve_layout
from .ring import check_local


def seq_to_head(x: torch.Tensor, layout: SequenceLayout, group=None, op: str = "ulysses") -> torch.Tensor:
    """``(B, H, n_r, D)`` sequence shard -> ``(B, H/P, N, D)`` head shard (tokens in rank
    order). Heads ``[p·H/P, (p+1)·H/P)`` go to rank ``p``."""
    world, rank = comm.world_and_rank(group)
    B, H, n, D = x.shape
    h = H // world
    sizes = layout.lengths()
    chunks = x.reshape(B, world, h, n, D).transpose(0, 1)  # (P, B, h, n, D)
    out = comm.all_to_all_flat(chunks.reshape(-1), [B * h * n * D] * world, [B * h * s * D for s in sizes], group, op)
    parts = [p.view(B, h, s, D) for p, s in zip(out.split([B * h * s * D for s in sizes]), sizes)]
    return torch.cat(parts, dim=2)


def head_to_seq(y: torch.Tensor, layout: SequenceLayout, group=None, op: str = "ulysses") -> torch.Tensor:
    """``(B, H/P, N, D)`` head shard (rank order) -> ``(B, H, n_r, D)`` sequence shard: the
    inverse (and the adjoint) of :func:`seq_to_head`."""
    world, rank = comm.world_and_rank(group)
    B, h, N, D = y.shape
    sizes = layout.lengths()
    n = sizes[rank]
    flat = torch.cat([p.reshape(-1) for p in y.split(sizes, dim=2)])
    out = comm.all_to_all_flat(flat, [B * h * s * D for s in sizes], [B * h * n * D] * world, group, op)
    return out.view(world, B, h, n, D).transpose(0, 1).reshape(B, world * h, n, D)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, layout, group):
        ctx.args = (layout, group)
        return seq_to_head(x, layout, group)

    @staticmethod
    def backward(ctx, g):
        layout, group = ctx.args
        return head_to_seq(g, layout, group, op="ulysses_bwd"), None, None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, layout, group):
        ctx.args = (layout, group)
        return head_to_seq(y, layout, group)

    @staticmethod
    def backward(ctx, g):
        layout, group = ctx.args
        return seq_to_head(g, layout, group, op="ulysses_bwd"), None, None


#: Options that hold one value per query head: Ulysses gives each rank its heads' slice.
PER_HEAD_OPTIONS = ("alibi", "decay", "alpha", "beta")


def head_options(method: str, options: dict, q_heads: int, rank: int, world: int, device=None) -> dict:
    """``options`` for this rank's ``Hq / P`` heads. [J] A method that sees fewer heads
    would derive other per-head values (ALiBi's slopes, lightning's decays), so those
    defaults are made explicit for all ``Hq`` heads first; then every option of
    :data:`PER_HEAD_OPTIONS` with one value per query head is sliced. A method whose
    maths depends on the head index in another way is not head-parallel."""
    h = q_heads // world
    out = dict(options)
    if method == "lightning":
        out["decay"] = lightning_decays(q_heads, options, torch.float64, device)
    if out.get("alibi") is True:
        out["alibi"] = alibi_slopes(q_heads, device, torch.float64)
    for name in PER_HEAD_OPTIONS:
        val = out.get(name)
        if isinstance(val, torch.Tensor) and val.dim() == 1 and val.numel() == q_heads:
            out[name] = val[rank * h:(rank + 1) * h]
        elif isinstance(val, (tuple, list)) and len(val) == q_heads:
            out[name] = tuple(val[rank * h:(rank + 1) * h])
    return out


def kv_heads_for(q_heads: int, kv_heads: int, world: int) -> int:
    """K/V heads Ulysses sends: ``Hkv`` when ``P`` divides it, else the smallest multiple
    of ``Hkv`` that ``P`` divides and that divides ``Hq``."""
    if kv_heads % world == 0:
        return kv_heads
    for m in range(kv_heads, q_heads + 1, kv_heads):
        if m % world == 0 and q_heads % m == 0:
            return m
    raise AttentionInputError(f"ulysses_attention: no K/V head count serves Hq={q_heads}, Hkv={kv_heads} over "
                              f"{world} ranks")


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None, *, method: str = "softmax",
                      causal: bool = False, scale: Optional[float] = None,
                      layout: Union[str, SequenceLayout] = "contiguous", impl: str = "auto",
                      **options) -> torch.Tensor:
    """Any attnzoo method over the sequence sharded across ``group``, by head-parallelism.

    Args:
        q: ``(B, Hq, n_r, D)``, k ``(B, Hkv, n_r, D)``, v ``(B, Hkv, n_r, Dv)``: this rank's
            tokens (self-attention). ``Hq`` must be divisible by the group size.
        method, impl, **options: the method run on ``(B, Hq/P, N, ·)`` (see
            :func:`attnzoo.attention`); ``causal`` and ``scale`` as there.
        layout: ``"contiguous"``, ``"zigzag"`` or a :class:`SequenceLayout`.

    Returns this rank's ``(B, Hq, n_r, Dv)``; differentiable in q, k, v (and in the
    method's tensor options, e.g. learnable ALiBi slopes).
    """
    check_local(q, k, v, "ulysses_attention")
    spec = registry.get(method)
    if spec.module is not None:
        raise AttentionInputError(f"ulysses_attention: method {method!r} has parameters (its module "
                                  f"{spec.module.__name__}); call the module on head shards yourself, with "
                                  "seq_to_head / head_to_seq")
    world, _ = comm.world_and_rank(group)
    lay = resolve_layout(layout, q.shape[2], group)
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % world:
        raise AttentionInputError(f"ulysses_attention: Hq={Hq} query heads cannot be split over {world} ranks "
                                  "(Hq % P must be 0); use ring_attention or fewer ranks")
    m = kv_heads_for(Hq, Hkv, world)
    if m != Hkv:
        k, v = repeat_kv(k, m), repeat_kv(v, m)
    qh, kh, vh = (_SeqToHead.apply(t, lay, group) for t in (q, k, v))
    order = None if lay.is_rank_ordered() else lay.rank_order(q.device)
    if order is not None:  # into sequence order for the method, back afterwards
        inv = torch.argsort(order)
        qh, kh, vh = (t.index_select(2, inv) for t in (qh, kh, vh))
    options = head_options(method, options, Hq, comm.world_and_rank(group)[1], world, q.device)
    out = attention(qh, kh, vh, method=method, impl=impl, causal=causal, scale=scale, **options)
    if order is not None:
        out = out.index_select(2, order)
    return _HeadToSeq.apply(out, lay, group)


def ulysses_bytes(layout: SequenceLayout, rank: int, *, batch: int, q_heads: int, kv_heads: int, head_dim: int,
                  v_dim: int, itemsize: int, backward: bool = False) -> int:
    """Bytes rank ``rank`` sends in :func:`ulysses_attention`: q, k, v to head shards,
    ``(P-1)/P · n_r·B·(Hq·D + Hkv'·(D+Dv))`` (``Hkv'`` from :func:`kv_heads_for`), and the
    output back, ``B·Hq/P·(N - n_r)·Dv``; the backward sends the same amounts the other
    way (dO as the output did in reverse, dQ/dK/dV as q/k/v did)."""
    P = layout.world_size
    n, N = layout.local_len(rank), layout.seq_len
    m = kv_heads_for(q_heads, kv_heads, P)
    to_heads = (P - 1) * n * batch * (q_heads * head_dim + m * (head_dim + v_dim)) // P
    to_seq = batch * q_heads // P * (N - n) * v_dim
    fwd = (to_heads + to_seq) * itemsize
    if not backward:
        return fwd
    # backward: dO sequence -> heads ((P-1)/P n_r B Hq Dv), dQ/dK/dV heads -> sequence
    bwd = ((P - 1) * n * batch * q_heads * v_dim // P
           + batch * (q_heads * head_dim + m * (head_dim + v_dim)) // P * (N - n)) * itemsize
    return fwd + bwd
