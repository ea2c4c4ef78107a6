"""What the content-routed methods (``routing``, ``bilevel_routing``, ``seer``) share: the
scores a selection ranks, independent top-k programs with one tie rule, and the
references' dense softmax over the selected (query, key) pairs.

Each of these methods makes a discrete choice (clusters, regions, key blocks) that its
reference and its fast form compute with *different programs* — the reference plainly,
one cluster / region / query block at a time, the fast form vectorised — so that a bug
in either search shows up as a mismatch in the contract tests. Two programs agree on a
discrete choice only if they rank the same numbers the same way:

* **Scores** are computed in float64 from the inputs detached and rounded to float32
  (:func:`selection_input`; a float64 call and a float32 call on the same rounded
  values choose alike, which the fp64 three-way test rule needs), then rounded to
  float32 (:func:`selection_scores`). The two programs' float64 results differ by a few
  float64 ulps (another summation order); after rounding to float32 they are equal
  unless a value falls within those few ulps of a float32 rounding boundary
  (about 1e-8 per value), so exact and near ties resolve alike.
* **Ties**: among equal scores the lower index wins (the earlier token, region or block).
  The fast forms' program, :func:`top_by_sort` / :func:`rank_by_sort` (a stable
  descending sort), and the references' two, :func:`rank_by_count` (a rank counted
  directly, for the short rows of regions and blocks) and :func:`top_by_threshold` (the
  ``k``-th largest value, then the ties at it in index order, for a cluster's tokens),
  all follow it.

The selection is not differentiated (computed under ``torch.no_grad()``); gradients
reach q, k, v through the softmax over the selected pairs.
"""

from __future__ import annotations

from typing import Optional

import torch

from .block_select import selection_values as selection_input  # noqa: F401 (x detached, rounded to float32, in float64)
from .block_select import stable_topk
from .dense import softmax_attention
from .masking import dense_mask


def selection_scores(s: torch.Tensor) -> torch.Tensor:
    """Selection scores as float32 values (see the module docstring)."""
    return s.to(torch.float32)


# -------------------------------------------------------------- the fast forms' top-k


def sort_order(scores: torch.Tensor) -> torch.Tensor:
    """Indices of the last dimension by descending score, ties to the lower index
    (a stable sort)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def top_by_sort(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best indices of the last dimension, best first (ties to the lower index):
    the first ``k`` of the stable sort, by :func:`~attnzoo.kernels.block_select.stable_topk`
    in O(n) a row (bilevel_routing's region-to-region sort was 8 % of its forward at N = 65,536)."""
    return stable_topk(scores, k)[1]


def rank_by_sort(scores: torch.Tensor) -> torch.Tensor:
    """Each entry's rank in its row (0 = best; ties to the lower index), by a stable sort."""
    order = sort_order(scores)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks


# --------------------------------------------------------------- the references' top-k


def rank_by_count(scores: torch.Tensor, eligible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each entry's rank among the eligible entries of its row, counted directly:
    ``rank[j] = #{j' eligible: s[j'] > s[j]} + #{j' eligible, j' < j: s[j'] == s[j]}``.

    ``scores (..., n)``; ``eligible``: bool broadcastable to it (None = all). An entry
    is among the ``k`` best eligible ones iff it is eligible and its rank is below
    ``k``. Builds ``(..., n, n)`` comparisons (the references' explicit form)."""
    n = scores.shape[-1]
    a = scores.unsqueeze(-1)  # [..., j, 1]: the entry ranked
    b = scores.unsqueeze(-2)  # [..., 1, j']: the entries it is compared with
    j = torch.arange(n, device=scores.device)
    earlier = j.view(1, n) < j.view(n, 1)  # [j, j'] = j' < j
    beats = (b > a) | ((b == a) & earlier)
    if eligible is not None:
        beats = beats & eligible.unsqueeze(-2)
    return beats.sum(-1)


def top_by_threshold(scores: torch.Tensor, k: int, eligible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``k`` best eligible entries of each row as a bool mask, found by value: ``t``, the
    ``k``-th largest eligible score; every eligible entry above ``t``, then the entries
    equal to ``t`` in index order until ``k`` are kept (fewer than ``k`` eligible: all of
    them). O(n) per row, for long rows (a cluster's tokens)."""
    s = scores if eligible is None else scores.masked_fill(~eligible, float("-inf"))
    k = min(int(k), s.shape[-1])
    if k < 1:
        return torch.zeros_like(s, dtype=torch.bool)
    t = s.topk(k, dim=-1).values[..., -1:]  # the k-th largest value of each row
    above, at = s > t, s == t
    if eligible is not None:
        above, at = above & eligible, at & eligible
    room = k - above.sum(-1, keepdim=True)  # places left for the entries tied at t
    return above | (at & (at.cumsum(-1) <= room))


# ------------------------------------------------------------------ the references' softmax


def routed_softmax(q, k, v, call, allowed: torch.Tensor):
    """The references' attention: dense softmax over the ``allowed`` (query, key) pairs
    (bool, broadcastable to ``(B, Hq, Nq, Nk)``) and the call's mask, causality (lower-right)
    and key padding; a row with nothing visible gives zeros. Returns what
    :func:`~attnzoo.kernels.dense.softmax_attention` does (the weights with ``return_weights``)."""
    mask = call.mask
    if mask is not None:
        if not isinstance(mask, torch.Tensor):  # a mask_mod, evaluated densely (the reference is N×N anyway)
            mask = dense_mask(mask, call.batch, call.q_heads, call.q_len, call.kv_len, q.device)
        allowed = allowed & mask
    return softmax_attention(q, k, v, scale=call.scale, causal=call.causal, mask=allowed, key_mask=call.key_mask,
                             dropout_p=call.dropout_p, return_weights=call.return_weights)
