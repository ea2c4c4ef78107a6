"""Key blocks and their selection: what the block-summarising and block-retrieving sparse
methods (``combiner``, ``landmark``, ``hip``) share.

The keys are cut into blocks of ``s`` positions (the last one may be short). Query ``i``
of ``Nq`` sits at the aligned key position ``i + Nk - Nq`` (lower-right, DESIGN.md).

* :func:`block_means` — per-block means of the real (unpadded) rows and their counts,
  vectorised (the fast forms' summaries and landmarks);
* :func:`selection_values` and :func:`selection_scores` — the arithmetic every selection
  is made in, so that two different programs rank the same candidates alike;
* :func:`stable_topk` / :func:`topk_lowest_index` — top-k with the lowest index winning
  among equal scores, O(n) per row (a stable sort's first ``k``);
* :func:`expand_layout` — a block layout as the dense element mask (references only);
* :func:`kept_density` — the ``density`` statistic of a block selection.

Selection arithmetic: q and k are rounded to float32 (so a float64 and a float32 run on
the same rounded values choose the same blocks), then scores are formed in float64.
Products of two float32 numbers are exact in float64; only the sums are rounded, so two
programs that sum in different orders differ by a few float64 ulps (about 1e-16
relative). A vectorised selection and a loop written differently therefore order the
candidates identically except when two scores lie within those few ulps of each other;
exact ties every selection breaks the same documented way (lower index first).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .common import BLOCK_ELEMENTS

SELECT_DTYPE = torch.float64


def num_blocks(n: int, s: int) -> int:
    """``ceil(n / s)``."""
    return -(-int(n) // int(s))


def aligned_positions(q_len: int, kv_len: int, device=None) -> torch.Tensor:
    """Key position of each query, ``i + Nk - Nq``: ``(Nq,)`` long (negative when Nq > Nk)."""
    return torch.arange(q_len, device=device) + (kv_len - q_len)


def selection_rounded(x: torch.Tensor) -> torch.Tensor:
    """``x`` detached and rounded to float32: the values a selection reads, before its
    float64 arithmetic (for sums that accumulate in float64 without a float64 copy)."""
    return x.detach().to(torch.float32)


def selection_values(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a selection reads it: detached, rounded to float32, held in float64."""
    return selection_rounded(x).to(SELECT_DTYPE)


def selection_scores(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · q·key`` in the selection arithmetic: ``q (..., n, D)``, ``keys (..., m, D)``
    -> ``(..., n, m)`` float64 (no gradient)."""
    with torch.no_grad():
        return (selection_values(q) @ selection_values(keys).transpose(-1, -2)) * float(scale)


def block_means(x: torch.Tensor, key_mask: Optional[torch.Tensor], s: int, dtype: Optional[torch.dtype] = None):
    """Mean of the real rows of each block of ``s`` positions.

    ``x (B, H, N, D)``; ``key_mask`` ``(B, N)`` bool (True = real) or None. Returns
    ``means (B, H, nb, D)`` in ``dtype`` (default x's; a block without real rows has
    mean 0) and ``count (B, nb)`` (its real rows, in the same dtype). The sums accumulate
    in ``dtype`` from x's own values, in runs of blocks: a whole float64 copy of a long x
    (268 MiB at N = 65,536, H = 8) would be fresh, page-faulted memory on every call.
    Differentiable in x.
    """
    B, H, N, D = x.shape
    nb = num_blocks(N, s)
    pad = nb * s - N
    dtype = x.dtype if dtype is None else dtype
    real = torch.ones(B, N, dtype=dtype, device=x.device) if key_mask is None else key_mask.to(dtype)
    real = F.pad(real, (0, pad))
    xs = (F.pad(x, (0, 0, 0, pad)) if pad else x).view(B, H, nb, s, D)
    w = None if key_mask is None else real.view(B, 1, nb, s, 1).to(x.dtype)  # 0 / 1: exact in x's dtype
    step = max(1, BLOCK_ELEMENTS // max(1, B * H * s * D))  # blocks per run
    sums = [(xs[:, :, a:a + step] if w is None else xs[:, :, a:a + step] * w[:, :, a:a + step]).sum(3, dtype=dtype)
            for a in range(0, nb, step)]
    count = real.view(B, nb, s).sum(-1)
    means = (sums[0] if len(sums) == 1 else torch.cat(sums, dim=2)) / count.clamp(min=1).view(B, 1, nb, 1)
    return means, count


def stable_topk(scores: torch.Tensor, k: int, ordered: bool = True):
    """``(values, indices)`` of the ``k`` largest entries of the last axis, the lower index
    first among equal scores: exactly the first ``k`` of a stable descending sort (NaN
    counts as the largest, as in :func:`torch.sort`); with ``ordered=False`` the same
    entries in an unspecified order.

    O(n) per row instead of a sort's O(n log n): :func:`torch.topk` picks the ``k + 1``
    best (its choice among equal scores is unspecified). The ``k`` best are then
    determined unless the ``k``-th and the ``(k+1)``-th values are equal (``-inf``
    included) or a NaN is among them; only those rows are redone by the stable sort.
    With ``ordered`` the ``k`` are put in sort order by ranking them among themselves
    (value, then index)."""
    n = scores.shape[-1]
    kk = min(int(k), n)
    if kk == n or kk == 0 or scores.numel() == 0:
        order = torch.sort(scores, dim=-1, descending=True, stable=True)
        return order.values[..., :kk], order.indices[..., :kk]
    vals, idx = torch.topk(scores, kk + 1, dim=-1, sorted=True)
    ambiguous = (vals[..., kk - 1] == vals[..., kk]) | torch.isnan(vals).any(-1)
    vals, idx = vals[..., :kk], idx[..., :kk]
    if ordered and kk > 1:  # ties inside the k: the lower index first
        if kk <= 16:
            a_v, a_i = vals.unsqueeze(-1), idx.unsqueeze(-1)  # [..., j, 1]: the entry ranked
            b_v, b_i = vals.unsqueeze(-2), idx.unsqueeze(-2)  # [..., 1, j']: the others
            rank = ((b_v > a_v) | ((b_v == a_v) & (b_i < a_i))).sum(-1)
            vals = torch.empty_like(vals).scatter_(-1, rank, vals)
            idx = torch.empty_like(idx).scatter_(-1, rank, idx)
        else:
            idx, pos = torch.sort(idx, dim=-1)
            vals, pos = torch.sort(torch.gather(vals, -1, pos), dim=-1, descending=True, stable=True)
            idx = torch.gather(idx, -1, pos)
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero(as_tuple=True)
        order = torch.sort(scores[rows], dim=-1, descending=True, stable=True)
        vals, idx = vals.clone(), idx.clone()
        vals[rows], idx[rows] = order.values[..., :kk], order.indices[..., :kk]
    return vals, idx


def topk_lowest_index(scores: torch.Tensor, k: int):
    """The ``k`` largest entries of the last axis, the lowest index first among equal
    scores: ``idx (..., k')`` long and ``ok (..., k')`` bool (False where the score is
    ``-inf``: not a candidate), ``k' = min(k, size)``."""
    top_s, top = stable_topk(scores, k)
    return top, top_s > float("-inf")


def expand_layout(layout: torch.Tensor, q_len: int, kv_len: int, q_block: int, k_block: int) -> torch.Tensor:
    """A block layout ``(..., nqb, nkb)`` as the dense element mask ``(..., Nq, Nk)``
    (``q_block = 1`` for a layout per query)."""
    dense = layout.repeat_interleave(q_block, dim=-2) if q_block != 1 else layout
    return dense[..., :q_len, :].repeat_interleave(k_block, dim=-1)[..., :kv_len]


def kept_density(idx: torch.Tensor, valid: torch.Tensor, *, q_len: int, kv_len: int, block: int, causal: bool,
                 key_mask: Optional[torch.Tensor], q_block: int = 1) -> Optional[float]:
    """Mean over the queries that may see a real key of (real keys they may see in their
    kept blocks) / (real keys they may see), under causality and padding only.

    ``idx``/``valid`` ``(B', H, R, K)``: the kept key blocks of each query (``q_block=1``)
    or of each block of ``q_block`` queries. None when no query sees a real key."""
    B = idx.shape[0] if key_mask is None else key_mask.shape[0]
    dev = idx.device
    if q_block != 1:
        idx = idx.repeat_interleave(q_block, dim=2)[:, :, :q_len]
        valid = valid.repeat_interleave(q_block, dim=2)[:, :, :q_len]
    real = torch.ones(B, kv_len, device=dev, dtype=torch.float64) if key_mask is None else key_mask.to(torch.float64)
    cum = F.pad(real.cumsum(-1), (1, 0))  # (B, Nk + 1): real keys before each position
    p = aligned_positions(q_len, kv_len, dev)
    end_q = (p + 1).clamp(0, kv_len) if causal else torch.full_like(p, kv_len)
    idx = idx.expand(B, *idx.shape[1:])
    valid = valid.expand(B, *valid.shape[1:])
    lo = (idx * block).clamp(max=kv_len)
    hi = torch.minimum((idx + 1) * block, end_q.view(1, 1, -1, 1)).clamp(max=kv_len)
    hi = torch.maximum(hi, lo)
    bix = torch.arange(B, device=dev).view(-1, 1, 1, 1)
    got = ((cum[bix, hi] - cum[bix, lo]) * valid).sum(-1)  # (B, H, Nq)
    vis = cum[:, end_q].view(B, 1, q_len)
    rows = (vis > 0).expand_as(got)
    if not bool(rows.any()):
        return None
    return float((got / vis.clamp(min=1))[rows].mean())
