"""The collectives the sequence-parallel paths use, each counting the bytes it sends.

Every message goes through ``torch.distributed`` (gloo on CPU, NCCL on GPU); this
module only wraps the calls so that :func:`count_bytes` can report how many bytes this
rank sent, by operation:

    with count_bytes() as c:
        out = ring_attention(q, k, v, causal=True)
    c.payload          # bytes this rank sent (tensor data)
    c.by_op            # {"ring_kv": ..., "ring_dkv": ...}

What is counted is the payload a rank must send under the standard algorithms, not
wire bytes (transport framing is excluded):

* point-to-point (the ring, the halo exchange): the bytes of every tensor sent;
* all-gather of ``x``: ``(P - 1)·|x|`` (ring or direct algorithm alike: every other
  rank must receive ``x`` once, and with a ring each rank forwards ``P - 1`` pieces);
* all-to-all: the chunks addressed to the other ranks (its own chunk is not sent);
* the one-integer all-reduce that resolves a string layout is counted as ``meta``,
  apart from the payload.

The formulas the counts are compared with live next to each algorithm
(``ring_bytes``, ``ulysses_bytes``, ``lasp2_bytes``, ``allgather_bytes``, ``halo_bytes``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

_COUNTERS: list = []


class CommCounter:
    """Bytes sent by this rank while it is active (see :func:`count_bytes`)."""

    def __init__(self):
        self.by_op: Dict[str, int] = defaultdict(int)
        self.calls: Dict[str, int] = defaultdict(int)
        self.meta = 0

    @property
    def payload(self) -> int:
        return sum(self.by_op.values())

    def as_dict(self) -> dict:
        return {"payload": self.payload, "meta": self.meta, "by_op": dict(self.by_op), "calls": dict(self.calls)}


@contextmanager
def count_bytes():
    """Count the bytes this rank sends inside the block (nested counters all count)."""
    c = CommCounter()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


def _record(op: str, nbytes: int, meta: bool = False) -> None:
    for c in _COUNTERS:
        if meta:
            c.meta += int(nbytes)
        else:
            c.by_op[op] += int(nbytes)
        c.calls[op] += 1


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ------------------------------------------------------------------ group helpers


def world_and_rank(group=None) -> Tuple[int, int]:
    """``(world size, rank)`` in ``group`` (``(1, 0)`` when torch.distributed is not initialised)."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise RuntimeError("a process group was given but torch.distributed is not initialised")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def global_rank(group, rank: int) -> int:
    """The global rank of ``rank`` in ``group`` (P2P ops address global ranks)."""
    if group is None or group is dist.group.WORLD:
        return rank
    return dist.get_global_rank(group, rank)


def all_reduce_int(value: int, group=None) -> int:
    t = torch.tensor([int(value)], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":  # NCCL needs a device tensor
        t = t.cuda()
    world, _ = world_and_rank(group)
    _record("layout", 2 * (world - 1) * nbytes(t) // max(1, world), meta=True)
    dist.all_reduce(t, group=group)
    return int(t.item())


# ------------------------------------------------------------------ point to point


def exchange(sends: Sequence[Tuple[int, torch.Tensor]], recvs: Sequence[Tuple[int, torch.Tensor]], group=None,
             op: str = "p2p", tag: int = 0) -> List:
    """Post ``isend``/``irecv`` for ``(group_rank, tensor)`` pairs at once
    (``batch_isend_irecv``) and return the requests, to ``wait()`` on later: the caller
    overlaps its compute with the transfer. Sends are posted before receives, in the
    given order, on every rank (NCCL needs the same order on both ends)."""
    ops = []
    for peer, t in sends:
        _record(op, nbytes(t))
        ops.append(dist.P2POp(dist.isend, t.contiguous(), global_rank(group, peer), group, tag))
    for peer, t in recvs:
        ops.append(dist.P2POp(dist.irecv, t, global_rank(group, peer), group, tag))
    if not ops:
        return []
    return dist.batch_isend_irecv(ops)


def wait_all(requests) -> None:
    for r in requests:
        r.wait()


# ------------------------------------------------------------------- collectives


class _Done:
    """The work handle of a collective over one rank (nothing to wait for)."""

    def wait(self):
        return True


def all_gather_equal(x: torch.Tensor, group=None, op: str = "all_gather", async_op: bool = False):
    """All-gather of same-shape tensors: ``(P, *x.shape)`` (and the work handle with
    ``async_op``, to ``wait()`` before reading the output)."""
    world, _ = world_and_rank(group)
    x = x.contiguous()
    if world == 1:  # also without torch.distributed initialised
        out = x.unsqueeze(0).clone()
        return (out, _Done()) if async_op else out
    out = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
    _record(op, (world - 1) * nbytes(x))
    work = dist.all_gather(list(out.unbind(0)), x, group=group, async_op=async_op)
    return (out, work) if async_op else out


def all_to_all_flat(x: torch.Tensor, in_splits: Sequence[int], out_splits: Sequence[int], group=None,
                    op: str = "all_to_all") -> torch.Tensor:
    """``all_to_all_single`` on a 1-D tensor: chunk ``p`` of ``x`` (``in_splits[p]``
    elements) goes to rank ``p``; the output holds what each rank sent here, in rank
    order (``out_splits``). Chunks may differ in size (uneven shards)."""
    world, rank = world_and_rank(group)
    x = x.contiguous().view(-1)
    if world == 1:
        return x.clone()
    out = torch.empty(int(sum(out_splits)), dtype=x.dtype, device=x.device)
    _record(op, (sum(in_splits) - in_splits[rank]) * x.element_size())
    dist.all_to_all_single(out, x, list(map(int, out_splits)), list(map(int, in_splits)), group=group)
    return out


def all_gather_any(x: torch.Tensor, sizes: Sequence[int], dim: int, group=None, op: str = "all_gather"):
    """All-gather along ``dim`` of tensors whose ``dim`` sizes differ per rank
    (``sizes``): the concatenation in rank order. Equal sizes use ``all_gather``; uneven
    ones ``all_to_all_single`` with this rank's tensor as every chunk (the same bytes:
    ``(P - 1)·|x|``; gloo's all-gather needs equal shapes)."""
    world, rank = world_and_rank(group)
    if len(set(sizes)) == 1:
        out = all_gather_equal(x.movedim(dim, 0), group, op)  # (P, n, ...)
        return out.flatten(0, 1).movedim(0, dim)
    xm = x.movedim(dim, 0).contiguous()
    row = math.prod(xm.shape[1:])
    flat = xm.reshape(-1)
    out = all_to_all_flat(flat.repeat(world), [flat.numel()] * world, [s * row for s in sizes], group, op)
    return out.view(sum(sizes), *xm.shape[1:]).movedim(0, dim)


def reduce_scatter_any(full: torch.Tensor, sizes: Sequence[int], dim: int, group=None,
                       op: str = "reduce_scatter") -> torch.Tensor:
    """The adjoint of :func:`all_gather_any`: ``full`` (this rank's contribution to the
    whole sequence along ``dim``, rank order) is cut by ``sizes``; piece ``p`` goes to rank
    ``p``, and each rank sums what it receives: its own piece of ``Σ_ranks full``. An
    all-to-all, so uneven pieces work; bytes ``Σ_{p != r} |piece_p|``."""
    world, rank = world_and_rank(group)
    fm = full.movedim(dim, 0).contiguous()
    row = math.prod(fm.shape[1:])
    out = all_to_all_flat(fm.reshape(-1), [s * row for s in sizes], [sizes[rank] * row] * world, group, op)
    return out.view(world, sizes[rank], *fm.shape[1:]).sum(0).movedim(0, dim)
