"""Block-sparse attention over a block layout.

    query block i attends to key block j  iff  layout[h, i, j]        (then element-level
    causal / mask / padding inside the kept tiles)

The layout is a boolean ``(H or 1, ceil(Nq/block), ceil(Nk/block))`` matrix, given by
the user (``layout=``, a tensor or a function ``(heads, nqb, nkb) -> tensor``) or built
from a mask_mod passed as ``mask`` (:func:`attnzoo.masks.block_layout`, evaluated one row
of tiles at a time). Fixed block patterns are the core of the Sparse Transformer
("Generating Long Sequences with Sparse Transformers", Child et al., 2019) and of
BigBird; FlexAttention's ``BlockMask`` is the same object. The reference is dense masked
softmax with the layout expanded to elements; the fast form ``block`` computes only the
kept tiles (:mod:`attnzoo.methods._blocksparse`, the kernel the routed methods reuse):
time O(N·K·block·D), memory O(N·K·block) for K kept blocks per row.

No decoding form: a layout is fixed to a block grid of the full length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

from ..errors import AttentionInputError, fmt_shape
from ..masks import block_layout
from ..registry import Impl, MethodSpec, register
from . import softmax
from ._blocksparse import block_indices, block_sparse_attention


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


def random_layout(density: float, seed: int = 0) -> RandomLayout:
    """See :class:`RandomLayout`."""
    return RandomLayout(float(density), int(seed))


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


def _dense(lay, Nq, Nk, block):
    return lay.repeat_interleave(block, dim=1)[:, :Nq].repeat_interleave(block, dim=2)[:, :, :Nk].unsqueeze(0)


def reference(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
              return_weights=False, layout: Union[torch.Tensor, Callable, None] = None, block_size: int = 64):
    """Dense softmax masked by the layout expanded to elements.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    lay = resolve_layout(layout, mask, B, Hq, Nq, Nk, block_size, q.device)
    allowed = _dense(lay, Nq, Nk, block_size)
    if mask is not None:
        from ..masks import dense_mask

        allowed = allowed & (mask if isinstance(mask, torch.Tensor) else dense_mask(mask, B, Hq, Nq, Nk, q.device))
    return softmax.reference(q, k, v, causal=causal, mask=allowed, key_padding_mask=key_padding_mask, scale=scale,
                             dropout_p=dropout_p, return_weights=return_weights)


def block_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                    return_weights=False, layout=None, block_size: int = 64):
    """Only the kept tiles, via the block-sparse kernel."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lay = resolve_layout(layout, mask, B, Hq, Nq, Nk, block_size, q.device)
    idx, valid = block_indices(lay)
    return block_sparse_attention(q, k, v, idx=idx, valid=valid, block=block_size, scale=scale, causal=causal,
                                  mask=mask, key_padding_mask=key_padding_mask)


def flex_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                   return_weights=False, layout=None, block_size: int = 64):
    """FlexAttention with the layout as a mask_mod (inference on CPU)."""
    B, Hq, Nq, _ = q.shape
    lay = resolve_layout(layout, mask, B, Hq, Nq, k.shape[2], block_size, q.device)
    bs = int(block_size)

    def in_layout(b, h, q_idx, kv_idx):
        return lay[h if lay.shape[0] > 1 else 0, q_idx // bs, kv_idx // bs]

    return softmax.flex_with_pattern(q, k, v, in_layout, causal=causal, mask=mask,
                                     key_padding_mask=key_padding_mask, scale=scale)


register(
    MethodSpec(
        name="block_sparse",
        family="sparse",
        summary="softmax over the kept tiles of a block layout (given, or built from a mask_mod)",
        paper="Generating Long Sequences with Sparse Transformers",
        reference=reference,
        impls=[Impl("block", block_attention, mask_mod=True, description="only the kept tiles, O(N·K·block)"),
               Impl("flex", flex_attention, supports=softmax._flex_supports, mask_mod=True,
                    description="FlexAttention with the layout as a mask_mod (CPU: inference only)")],
        exact=False,
        time="O(N K b D)",
        memory="O(N K b)",
        decoding=False,
        test_options={"layout": random_layout(0.5, seed=0), "block_size": 16},
        bench_options={"layout": random_layout(0.1, seed=0)},
    )
)
