"""Bi-level routing attention (BiFormer).

"BiFormer: Vision Transformer with Bi-Level Routing Attention" (Zhu, Wang, Ke, Li,
Lau; CVPR 2023). Tokens are split into regions; region-level queries and keys are the
means of q and k over each region, the region affinity is ``A = Q_r K_rᵀ``, and each
query region keeps its ``topk`` most affine key regions:

    R_i = topk_j A[i, j]                                   (coarse, region-to-region routing)
    query t in region i attends key s  iff  region(s) ∈ R_i  (fine, token-to-token softmax)

1-D: regions are consecutive runs of ``region_size`` tokens (the last one may be
shorter). 2-D (``grid=(H, W)``, tokens row-major): ``regions=(rh, rw)`` is the number
of regions along each axis (BiFormer's S×S partition), each region a window of
``(H/rh) × (W/rw)`` tokens.

Implementations:

* ``reference`` — the routing written per region: each region's mean query and mean
  key from its own tokens (by region id, in the original token order, 1-D or 2-D), then
  for each query region its affinity to every key region and its ``topk`` eligible
  regions by a directly counted rank; the explicit ``Nq × Nk`` mask of the selected
  regions' tokens, then dense masked softmax.
* ``block`` — the selection vectorised (:func:`route`: padded region sums, one matrix
  product, a stable sort); the regions are contiguous token blocks (1-D) — for 2-D the
  tokens are permuted so that each window is contiguous and permuted back — and the
  block-sparse kernel runs over the per-sequence selected blocks
  ``(B, Hq, n_regions, topk)``: time O(N·topk·R·D), memory O(N·topk·R) plus the
  ``n_regions²`` affinity, never N×N.

The two compute the selection with different programs (shared only: the tie rule and
the rounding of the scores, :mod:`attnzoo.kernels.routing_select`).

Judgement calls:

* [J] Region means average the real tokens of a region only: a shorter last region
  averages its own tokens; padded keys are left out of the key
  means and a key region with no real key is never selected.
* [J] Selection ties are broken by region index (the lower index wins), in both
  programs; the affinity is computed in float64 from the detached inputs rounded to
  float32, then rounded to float32 (:mod:`attnzoo.kernels.routing_select`), under
  ``torch.no_grad()``; the routing is not differentiated (the paper's top-k is not
  either). ``topk`` larger than the number of key regions keeps them all.
* [J] Causal (1-D only): a key region is eligible for query region ``i`` only if its
  first key is visible to the last query of region ``i`` (lower-right alignment), then
  the token-level causal mask applies inside the selected regions. A query region with
  fewer eligible regions than ``topk`` keeps only those.
* [J] GQA: region queries and keys per query head (the keys of a k/v head are shared
  by its query heads).
* [J] Cross-attention: 1-D noncausal and causal (lower-right), query and key regions of
  the same ``region_size``. 2-D grids: noncausal self-attention only.
* [J] No decoding: a region's mean depends on all its tokens (``rows_independent=False``).
* [J] Sized for short sequences (``for_length``): regions of N/8 tokens (at most the
  default 64) and ``topk`` a quarter of the regions (at least 2, at most the default 4).
* [J] Density reported (``block``): real keys of the selected regions visible under
  causality over the real keys visible under causality, averaged over queries (the user
  ``mask`` is not counted; it is applied inside the kept tiles).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ... import stats
from ...errors import AttentionInputError, UnsupportedPattern, fmt_shape
from ...kernels.block_select import SELECT_DTYPE, block_means, selection_rounded
from ...kernels.blocksparse import block_sparse_attention
from ...kernels.common import int_pair, mean_density, real_visible_counts, repeat_kv
from ...kernels.routing_select import (rank_by_count, routed_softmax, selection_input, selection_scores,
                                       top_by_sort)
from ...registry import MethodOptions, method

DEFAULT_REGION, DEFAULT_TOPK = 64, 4


@dataclass(frozen=True)
class BilevelOptions(MethodOptions):
    """Options of ``bilevel_routing``.

    Attributes:
        region_size: tokens per region (1-D).
        topk: key regions kept per query region.
        grid: ``(H, W)`` of 2-D inputs (tokens row-major), or None for 1-D.
        regions: ``(rh, rw)``, regions per axis of the grid (2-D).
    """

    region_size: int = DEFAULT_REGION
    topk: int = DEFAULT_TOPK
    grid: Optional[tuple] = None
    regions: Optional[tuple] = None

    def validate(self) -> None:
        if self.topk < 1:
            raise AttentionInputError(f"topk must be a positive int, got {self.topk!r}")
        if self.region_size < 1:
            raise AttentionInputError(f"region_size must be a positive int, got {self.region_size!r}")
        if self.grid is not None:
            int_pair("grid", self.grid)
        if self.regions is not None:
            int_pair("regions", self.regions)

    @classmethod
    def for_length(cls, n: int) -> dict:
        region = min(DEFAULT_REGION, max(2, n // 8))
        topk = min(DEFAULT_TOPK, max(2, -(-n // region) // 4))
        if (region, topk) == (DEFAULT_REGION, DEFAULT_TOPK):
            return {}
        return {"region_size": region, "topk": topk}


# ------------------------------------------------------------------------- geometry


def _geometry(Nq, Nk, causal, options):
    """``(R, perm)``: the region length in tokens and, for 2-D, the permutation (a
    LongTensor) that makes every window contiguous (None for 1-D). Raises on a grid
    that does not fit the call."""
    grid, regions = options.grid, options.regions
    if grid is None:
        return options.region_size, None
    H, W = int_pair("grid", grid)
    if causal or Nq != Nk:
        raise UnsupportedPattern(
            "2-D bi-level routing (grid=...) supports noncausal self-attention only; "
            "use 1-D regions (region_size=...) for causal or cross-attention"
        )
    if H * W != Nq:
        raise AttentionInputError(f"grid={grid} has {H * W} cells but there are Nq={Nq} tokens")
    if regions is None:
        raise AttentionInputError("2-D bi-level routing needs regions=(rh, rw), the number of regions per axis")
    rh, rw = int_pair("regions", regions)
    if H % rh or W % rw:
        raise AttentionInputError(f"grid={(H, W)} must be divisible by regions={(rh, rw)}")
    wh, ww = H // rh, W // rw
    pos = torch.arange(H * W).view(rh, wh, rw, ww).permute(0, 2, 1, 3).reshape(-1)  # window-major order
    return wh * ww, pos


def _check_k_for_grid(k, perm):
    if perm is not None and k.shape[2] != perm.numel():
        raise AttentionInputError(f"k has Nk={k.shape[2]} tokens, the grid {perm.numel()} ({fmt_shape(k)})")


def _region_ids(N: int, options, device) -> torch.Tensor:
    """The region of every token, in the original (row-major) order: ``t // region_size``
    in 1-D; in 2-D the window ``(y // wh) · rw + x // ww`` of cell ``(y, x) = divmod(t, W)``."""
    t = torch.arange(N, device=device)
    if options.grid is None:
        return t // options.region_size
    H, W = int_pair("grid", options.grid)
    rh, rw = int_pair("regions", options.regions)
    y, x = t // W, t % W
    return (y // (H // rh)) * rw + x // (W // rw)


# ------------------------------------------------------------------------ reference


@method("bilevel_routing", options=BilevelOptions,
        summary="BiFormer: region-level top-k routing by mean q/k affinity, token softmax inside the kept regions",
        paper="BiFormer: Vision Transformer with Bi-Level Routing Attention",
        time="O(N topk R D + (N/R)^2 D)", memory="O(N topk R + (N/R)^2)", grid=True, rows_independent=False,
        causal_leak=("regions are routed by pooled region queries and keys, which include tokens after the query "
                     "within its region"))
def bilevel_routing(q, k, v, call):
    """Dense masked softmax over the keys of each query's selected regions, the routing
    written per region.

    Region means from each region's own tokens; for each query region ``i``: its affinity
    to every key region, the eligible ones (a real key; under causality a first key
    visible to the region's last query), and the ``topk`` best of them, a region's rank
    counted directly (higher affinity, or equal affinity and a lower index, beats it).
    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    o = call.options
    _, perm = _geometry(Nq, Nk, call.causal, o)  # the checks only: the regions are taken by id here
    _check_k_for_grid(k, perm)
    region_q, region_k = _region_ids(Nq, o, q.device), _region_ids(Nk, o, q.device)
    nqr, nkr = int(region_q.max()) + 1, int(region_k.max()) + 1
    K = min(o.topk, nkr)
    offset = Nk - Nq
    real = torch.ones(B, Nk, dtype=torch.bool, device=q.device) if call.key_mask is None else call.key_mask
    with torch.no_grad():
        qs, ks = selection_input(q), selection_input(repeat_kv(k, Hq))
        # the region-level queries and keys: means over each region's (real) tokens
        q_regions = torch.stack([qs.index_select(2, (region_q == r).nonzero().flatten()).mean(2)
                                 for r in range(nqr)], dim=2)  # (B, Hq, nqr, D)
        k_regions, has_real, first_key = [], [], []
        for r in range(nkr):
            members = (region_k == r).nonzero().flatten()  # the region's key positions
            w = real.index_select(1, members).to(torch.float64)  # (B, n_r): 1 real, 0 padded
            count = w.sum(-1)
            k_sum = (ks.index_select(2, members) * w.view(B, 1, -1, 1)).sum(2)
            k_regions.append(k_sum / count.clamp_min(1.0).view(B, 1, 1))
            has_real.append(count > 0)
            first_key.append(int(members[0]))
        k_regions = torch.stack(k_regions, dim=2)  # (B, Hq, nkr, D)
        has_real = torch.stack(has_real, dim=-1).view(B, 1, nkr)
        first_key = torch.tensor(first_key, device=q.device)
        # region-to-region routing, one query region at a time
        selected = torch.zeros(B, Hq, nqr, nkr, dtype=torch.bool, device=q.device)
        for i in range(nqr):
            affinity = selection_scores((q_regions[:, :, i:i + 1] * k_regions).sum(-1))  # (B, Hq, nkr)
            eligible = has_real
            if call.causal:
                last_query = int((region_q == i).nonzero()[-1, 0]) + offset
                eligible = eligible & (first_key <= last_query).view(1, 1, nkr)
            selected[:, :, i] = eligible & (rank_by_count(affinity, eligible) < K)
    allowed = selected[:, :, region_q][:, :, :, region_k]  # (B, Hq, Nq, Nk): token t sees token s
    return routed_softmax(q, k, v, call, allowed)


# ----------------------------------------------------------------------------- fast


def route(q, k, *, causal, key_mask, R, perm, topk):
    """The fast form's selection: ``(idx, valid)`` of shape ``(B, Hq, nq_regions, K)``, the
    selected key regions of each query region (best first), K = min(topk, nk_regions).
    ``key_mask``: ``(B, Nk)`` bool, True = real key, or None. ``perm`` (2-D) reorders the
    tokens first."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    with torch.no_grad():
        # the inputs as the selection reads them (detached, rounded to float32); block_means
        # sums them in float64 without a float64 copy (a float64 copy of q and of k
        # repeated to the query heads was 4 x 268 MiB of fresh memory at N = 65,536)
        qf, kf = selection_rounded(q), selection_rounded(k)
        kpm = key_mask
        if perm is not None:
            qf, kf = qf[:, :, perm], kf[:, :, perm]
            kpm = None if kpm is None else kpm[:, perm]
        qr, _ = block_means(qf, None, R, SELECT_DTYPE)
        kr, count = block_means(kf, kpm, R, SELECT_DTYPE)
        kr, real = repeat_kv(kr, Hq), count > 0  # the key heads' region means, read by their query heads
        A = selection_scores(qr @ kr.transpose(-1, -2))  # (B, Hq, nqr, nkr)
        nqr, nkr = A.shape[2], A.shape[3]
        eligible = real.view(real.shape[0], 1, 1, nkr)
        if causal:
            last_q = torch.clamp(torch.arange(1, nqr + 1, device=q.device) * R, max=Nq) - 1 + (Nk - Nq)
            first_k = torch.arange(nkr, device=q.device) * R
            eligible = eligible & (first_k.view(1, -1) <= last_q.view(-1, 1))
        A = A.masked_fill(~eligible, float("-inf"))
        order = top_by_sort(A, min(topk, nkr))
        valid = torch.gather(eligible.expand(B, Hq, nqr, nkr), -1, order)
    return order, valid


@bilevel_routing.impl("block",  # a mask_mod is evaluated per kept tile
                      description="selected regions as per-sequence blocks of the block-sparse kernel: O(N·topk·R)")
def block_attention(q, k, v, call):
    """The selected regions as per-sequence blocks of the block-sparse kernel."""
    Nq, Nk = q.shape[2], k.shape[2]
    causal, mask, key_mask = call.causal, call.mask, call.key_mask
    R, perm = _geometry(Nq, Nk, causal, call.options)
    _check_k_for_grid(k, perm)
    idx, valid = route(q, k, causal=causal, key_mask=key_mask, R=R, perm=perm, topk=call.options.topk)
    if perm is not None:
        p = perm.to(q.device)
        q, k, v = q[:, :, p], k[:, :, p], v[:, :, p]
        if key_mask is not None:
            key_mask = key_mask[:, p]
        if isinstance(mask, torch.Tensor):
            m = mask
            m = m[:, :, p] if m.shape[2] > 1 else m
            mask = m[..., p] if m.shape[3] > 1 else m
        elif mask is not None:  # a mask_mod: evaluate it at the original (un-permuted) positions
            mod = mask

            def mask(b, h, q_idx, kv_idx):
                return mod(b, h, p[q_idx], p[kv_idx])

    out = block_sparse_attention(q, k, v, idx=idx, valid=valid, block=R, scale=call.scale, causal=causal, mask=mask,
                                 key_mask=key_mask)
    if stats.active():
        with torch.no_grad():
            pos = (torch.arange(Nq, device=q.device) + (Nk - Nq)).view(1, 1, Nq, 1)
            start = (idx * R).repeat_interleave(R, dim=2)[:, :, :Nq]  # (B, Hq, Nq, K)
            end = torch.clamp(start + R, max=Nk)
            if causal:
                end = torch.minimum(end, pos + 1)
            end = torch.maximum(end, start)
            if key_mask is not None:  # count only real keys in [start, end)
                nb = key_mask.shape[0]
                prefix = torch.cat([key_mask.new_zeros(nb, 1, dtype=torch.long),
                                    key_mask.long().cumsum(-1)], dim=-1).view(nb, 1, 1, Nk + 1)
                prefix = prefix.expand(nb, start.shape[1], Nq, Nk + 1)
                span = torch.gather(prefix, 3, end.expand(nb, -1, -1, -1)) - torch.gather(
                    prefix, 3, start.expand(nb, -1, -1, -1))
            else:
                span = end - start
            cnt = (span * valid.repeat_interleave(R, dim=2)[:, :, :Nq]).sum(-1)
            stats.report("density", mean_density(cnt, real_visible_counts(causal, Nq, Nk, key_mask, q.device)))
    if perm is not None:
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        out = out[:, :, inv.to(q.device)]
    return out
