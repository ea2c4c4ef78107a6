"""Which tokens of the sequence each rank holds: contiguous or zig-zag shards.

A :class:`SequenceLayout` gives, for each of ``P`` ranks, its *pieces*: half-open global
ranges ``[start, end)`` of the sequence, in the order the rank stores them (its local
tensor is the concatenation of its pieces along the sequence dim).

* ``contiguous``: rank ``r`` holds one piece; the pieces split ``N`` as evenly as
  possible (the first ``N mod P`` ranks hold one token more).
* ``zigzag``: the load-balanced causal layout of ring attention (the sharding of
  ring-flash-attn's ``zigzag_ring_flash_attn`` and Striped/"zig-zag" Ring Attention):
  ``N`` is cut into ``2P`` chunks as evenly as possible and rank ``r`` holds chunks
  ``r`` and ``2P - 1 - r``, so under a causal mask every rank has about the same number
  of visible (query, key) pairs.

Uneven shards (``N`` not divisible by ``P`` or ``2P``) are part of the definition, and
every rank can compute every other rank's pieces from ``(N, P, kind)`` alone, so the
P2P buffers of the ring and of the halo exchange are sized without extra messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import torch

from ..errors import AttentionInputError

KINDS = ("contiguous", "zigzag")


def even_split(n: int, parts: int) -> List[int]:
    """``n`` cut into ``parts`` sizes differing by at most one, the larger ones first."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


@dataclass(frozen=True)
class SequenceLayout:
    """The global ranges held by each rank.

    Attributes:
        seq_len: the total length N.
        pieces: per rank, a tuple of ``(start, end)`` ranges in local order (a piece may be
            empty, ``start == end``, when ``N < 2P`` in the zig-zag layout).
        kind: ``"contiguous"``, ``"zigzag"`` or ``"custom"``.
    """

    seq_len: int
    pieces: Tuple[Tuple[Tuple[int, int], ...], ...]
    kind: str = "custom"

    def __post_init__(self):
        covered = sorted(p for rank in self.pieces for p in rank if p[1] > p[0])
        pos = 0
        for a, b in covered:
            if a != pos:
                break
            pos = b
        if pos != self.seq_len or any(a > b for rank in self.pieces for a, b in rank):
            raise AttentionInputError(f"a sequence layout's pieces must tile [0, {self.seq_len}) exactly, got "
                                      f"{self.pieces}")

    # ----------------------------------------------------------------- builders
    @classmethod
    def contiguous(cls, seq_len: int, world_size: int) -> "SequenceLayout":
        _check_sizes(seq_len, world_size)
        sizes, start, pieces = even_split(seq_len, world_size), 0, []
        for s in sizes:
            pieces.append(((start, start + s),))
            start += s
        return cls(seq_len, tuple(pieces), "contiguous")

    @classmethod
    def zigzag(cls, seq_len: int, world_size: int) -> "SequenceLayout":
        _check_sizes(seq_len, world_size)
        sizes = even_split(seq_len, 2 * world_size)
        bounds = [0]
        for s in sizes:
            bounds.append(bounds[-1] + s)
        chunk = [(bounds[i], bounds[i + 1]) for i in range(2 * world_size)]
        return cls(seq_len, tuple((chunk[r], chunk[2 * world_size - 1 - r]) for r in range(world_size)), "zigzag")

    @classmethod
    def build(cls, kind: str, seq_len: int, world_size: int) -> "SequenceLayout":
        if kind not in KINDS:
            raise AttentionInputError(f"layout must be one of {', '.join(KINDS)} or a SequenceLayout, got {kind!r}")
        return getattr(cls, kind)(seq_len, world_size)

    # ------------------------------------------------------------------ queries
    @property
    def world_size(self) -> int:
        return len(self.pieces)

    @property
    def pieces_per_rank(self) -> int:
        return max(len(p) for p in self.pieces)

    def local_len(self, rank: int) -> int:
        return sum(b - a for a, b in self.pieces[rank])

    def lengths(self) -> List[int]:
        return [self.local_len(r) for r in range(self.world_size)]

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """Global position of each local token of ``rank``: ``(local_len,)`` int64."""
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.pieces[rank]])

    def local_ranges(self, rank: int) -> List[Tuple[int, int, int, int]]:
        """``(global_start, global_end, local_start, local_end)`` of each piece of ``rank``."""
        out, off = [], 0
        for a, b in self.pieces[rank]:
            out.append((a, b, off, off + b - a))
            off += b - a
        return out

    def rank_order(self, device=None) -> torch.Tensor:
        """Global positions in rank-concatenation order (rank 0's tokens, then rank 1's, ...)."""
        return torch.cat([self.positions(r, device) for r in range(self.world_size)])

    def is_rank_ordered(self) -> bool:
        """True when concatenating the ranks' tensors gives the sequence in order."""
        flat = [p for rank in self.pieces for p in rank if p[1] > p[0]]
        return all(flat[i][1] == flat[i + 1][0] for i in range(len(flat) - 1))

    # --------------------------------------------------------- sharding helpers
    def shard(self, x: torch.Tensor, rank: int, dim: int = 2) -> torch.Tensor:
        """The local tensor of ``rank`` from the full ``x`` (its pieces along ``dim``, concatenated)."""
        if x.shape[dim] != self.seq_len:
            raise AttentionInputError(f"shard: x has {x.shape[dim]} positions along dim {dim}, the layout "
                                      f"{self.seq_len}")
        parts = [x.narrow(dim, a, b - a) for a, b in self.pieces[rank]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def unshard(self, locals_: Sequence[torch.Tensor], dim: int = 2) -> torch.Tensor:
        """The full tensor from every rank's local tensor (the inverse of :meth:`shard`)."""
        if len(locals_) != self.world_size:
            raise AttentionInputError(f"unshard: got {len(locals_)} local tensors for {self.world_size} ranks")
        cat = torch.cat(list(locals_), dim=dim)
        inv = torch.argsort(self.rank_order(cat.device))
        return cat.index_select(dim, inv)


def _check_sizes(seq_len: int, world_size: int) -> None:
    if world_size < 1:
        raise AttentionInputError(f"world_size must be >= 1, got {world_size}")
    if seq_len < world_size:
        raise AttentionInputError(f"a sequence of {seq_len} tokens cannot be sharded over {world_size} ranks "
                                  "(each rank needs at least one token)")


def resolve_layout(layout: Union[str, SequenceLayout], local_len: int, group=None) -> SequenceLayout:
    """A :class:`SequenceLayout` for this call. A string builds one from the total length,
    which costs one all-reduce of a single integer (counted as metadata, not payload); pass
    a :class:`SequenceLayout` to avoid it. Checks that this rank's local length matches."""
    from . import comm

    world, rank = comm.world_and_rank(group)
    if isinstance(layout, SequenceLayout):
        resolved = layout
    else:
        if layout not in KINDS:
            raise AttentionInputError(f"layout must be one of {', '.join(KINDS)} or a SequenceLayout, got {layout!r}")
        total = comm.all_reduce_int(local_len, group) if world > 1 else local_len
        resolved = SequenceLayout.build(layout, total, world)
    if resolved.world_size != world:
        raise AttentionInputError(f"the layout is for {resolved.world_size} ranks but the group has {world}")
    if resolved.local_len(rank) != local_len:
        raise AttentionInputError(
            f"rank {rank} holds {local_len} tokens but the {resolved.kind} layout of N={resolved.seq_len} over "
            f"{world} ranks gives it {resolved.local_len(rank)} (per rank: {resolved.lengths()}); shard with "
            "SequenceLayout.shard or pass the layout you used")
    return resolved
