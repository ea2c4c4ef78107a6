"""Block-sparse attention over a block layout.

    query block i attends to key block j  iff  layout[h, i, j]        (then element-level
    causal / mask / padding inside the kept tiles)

The layout is a boolean ``(H or 1, ceil(Nq/block), ceil(Nk/block))`` matrix, given by
the user (``layout=``, a tensor or a function ``(heads, nqb, nkb) -> tensor``, e.g.
:class:`FixedLayout` or :func:`random_layout`) or built from a mask_mod passed as
``mask`` (:func:`attnzoo.masks.block_layout`, evaluated one row of tiles at a time).
Fixed block patterns are the core of the Sparse Transformer ("Generating Long Sequences
with Sparse Transformers", Child et al., 2019) and of BigBird; FlexAttention's
``BlockMask`` is the same object. The reference is dense masked softmax with the layout
expanded to elements; the fast form ``block`` computes only the kept tiles
(:mod:`attnzoo.kernels.blocksparse`, the kernel the routed methods reuse): time
O(N·K·block·D), memory O(N·K·block) for K kept blocks per row.

No decoding form: a layout is fixed to a block grid of the full length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ...errors import AttentionInputError, fmt_shape
from ...kernels.block_select import expand_layout
from ...kernels.flex import flex_unsupported
from ...kernels.masking import block_layout
from ...kernels.windows import pattern_blocks, pattern_flex, pattern_reference
from ...registry import MethodOptions, method


@dataclass(frozen=True)
class RandomLayout:
    """A layout function ``(heads, nqb, nkb) -> bool`` keeping each tile with probability
    ``density`` (deterministic in ``seed``), with the diagonal tiles always kept. A
    picklable object, so benchmark workers can receive it."""

    density: float
    seed: int = 0

    def __call__(self, heads: int, nqb: int, nkb: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(self.seed))
        lay = torch.rand(heads, nqb, nkb, generator=g) < self.density
        d = torch.arange(min(nqb, nkb))
        lay[:, d, d] = True
        return lay

    @property
    def cache_key(self) -> tuple:
        return ("random_layout", float(self.density), int(self.seed))


def random_layout(density: float, seed: int = 0) -> RandomLayout:
    """See :class:`RandomLayout`."""
    return RandomLayout(float(density), int(seed))


@dataclass(frozen=True)
class FixedLayout:
    """A Sparse-Transformer "fixed" block layout ("Generating Long Sequences with Sparse
    Transformers", Child et al., 2019) at tile level: query tile ``i`` keeps key tile
    ``j`` iff ``|i - j| < local`` (its own and neighbouring tiles) or ``j % stride ==
    stride - 1`` (the summary tiles, one per ``stride`` tiles, seen by every query).
    A picklable ``(heads, nqb, nkb) -> bool`` layout function for ``block_sparse``."""

    local: int = 1
    stride: int = 4

    def __call__(self, heads: int, nqb: int, nkb: int) -> torch.Tensor:
        i = torch.arange(nqb)[:, None]
        j = torch.arange(nkb)[None, :]
        lay = ((i - j).abs() < self.local) | (j % self.stride == self.stride - 1)
        return lay.unsqueeze(0)

    @property
    def cache_key(self) -> tuple:
        return ("fixed_layout", int(self.local), int(self.stride))


@dataclass(frozen=True)
class BlockSparseOptions(MethodOptions):
    """Options of ``block_sparse``.

    Attributes:
        layout: bool ``(heads or 1, ceil(Nq/block), ceil(Nk/block))``, or a function
            ``(heads, nqb, nkb) -> bool tensor`` (:class:`FixedLayout`,
            :func:`random_layout`); None builds it from a mask_mod passed as ``mask``.
        block_size: the tile size of the layout.
    """

    layout: Union[torch.Tensor, Callable, None] = None
    block_size: int = 64

    def validate(self) -> None:
        if self.block_size < 1:
            raise AttentionInputError(f"block_sparse: block_size must be a positive int, got {self.block_size!r}")

    @classmethod
    def for_length(cls, n: int) -> dict:
        # 8 tiles of N/8 at short lengths: each query tile keeps its own and every 4th
        return {"layout": FixedLayout(local=1, stride=4), "block_size": min(64, max(2, n // 8))}


def resolve_layout(layout, mask, B, Hq, Nq, Nk, block, device) -> torch.Tensor:
    """The layout as a bool tensor ``(1 or Hq, nqb, nkb)``."""
    nqb, nkb = -(-Nq // block), -(-Nk // block)
    if layout is None:
        if mask is None or isinstance(mask, torch.Tensor):
            raise AttentionInputError(
                "block_sparse needs layout= (bool (heads, Nq/block, Nk/block) or a function of (heads, nqb, nkb)) "
                "or a mask_mod as mask= to build it from"
            )
        lay = block_layout(mask, B, Hq, Nq, Nk, block, device).any(dim=0)
    else:
        lay = layout(Hq, nqb, nkb) if callable(layout) else layout
    if not isinstance(lay, torch.Tensor) or lay.dtype != torch.bool:
        raise AttentionInputError(f"layout must be a bool tensor, got {getattr(lay, 'dtype', type(lay).__name__)}")
    if lay.dim() == 2:
        lay = lay.unsqueeze(0)
    if lay.dim() != 3 or lay.shape[0] not in (1, Hq) or tuple(lay.shape[1:]) != (nqb, nkb):
        raise AttentionInputError(
            f"layout must have shape (1 or Hq, ceil(Nq/block), ceil(Nk/block)) = (1 or {Hq}, {nqb}, {nkb}) "
            f"for block_size={block}, got {fmt_shape(lay)}"
        )
    return lay.to(device)


def _layout(call, device) -> torch.Tensor:
    o = call.options
    return resolve_layout(o.layout, call.mask, call.batch, call.q_heads, call.q_len, call.kv_len, o.block_size,
                          device)


@method("block_sparse", options=BlockSparseOptions, paper="Generating Long Sequences with Sparse Transformers",
        summary="softmax over the kept tiles of a block layout (given, or built from a mask_mod)",
        time="O(N K b D)", memory="O(N K b)", score_mods=True,
        rows_independent=False)  # a row's tiles depend on its query block, i.e. on its position among the queries
def block_sparse(q, k, v, call):
    """Dense softmax masked by the layout expanded to elements.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    bs = call.options.block_size
    dense = expand_layout(_layout(call, q.device), call.q_len, call.kv_len, bs, bs).unsqueeze(0)
    return pattern_reference(q, k, v, call, dense)


@block_sparse.impl("block", description="only the kept tiles, O(N·K·block)")
def block_attention(q, k, v, call):
    """Only the kept tiles, via the block-sparse kernel."""
    return pattern_blocks(q, k, v, call, _layout(call, q.device), call.options.block_size)


def _layout_key(call) -> Optional[tuple]:
    """What determines the layout, when it is not a tensor's contents (else None)."""
    o = call.options
    if o.layout is None:
        source = getattr(call.mask, "cache_key", None)
        return None if source is None else ("block_sparse", "mask", source, o.block_size)
    source = getattr(o.layout, "cache_key", None) if not isinstance(o.layout, torch.Tensor) else None
    return None if source is None else ("block_sparse", source, o.block_size)


@block_sparse.impl("flex", supports=flex_unsupported,
                   description="FlexAttention with the layout as a mask_mod (CPU: inference only)")
def flex(q, k, v, call):
    """FlexAttention with the layout as a mask_mod (inference on CPU)."""
    lay = _layout(call, q.device)
    bs = int(call.options.block_size)

    def in_layout(b, h, q_idx, kv_idx):
        return lay[h if lay.shape[0] > 1 else 0, q_idx // bs, kv_idx // bs]

    key = _layout_key(call)
    if key is not None:
        in_layout.cache_key = key
    return pattern_flex(q, k, v, call, in_layout)
