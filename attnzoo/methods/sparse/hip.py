"""HiP attention: hierarchical pruning of key blocks by a tree search, training-free.

"HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning"
(Lee et al., 2024). Queries are taken in blocks of ``block_size``. For query block
``t`` the searched key range (in key blocks) is ``[0, h_t)``: causal, the blocks before
the block's own (diagonal) key blocks; noncausal, all blocks. The tree search:

    segments <- [0, h_t) cut into 2·topk near-equal segments (block units)
    repeat:   score(segment) = max over the query block of scale · q·k_rep
              keep the topk best segments (ties: lower position first)
              stop when every kept segment is one block long; else cut each in two

O(log(N / block)) levels of O(topk) representative keys per query block: the search is
O(N·topk·D·log N) and the attention over the kept ``topk`` blocks plus the diagonal
blocks O(N·(topk+2)·block·D) via the block-sparse kernel.

Judgement calls:
- [J] One ``block_size`` is both the query block and the final key block (the
  block-sparse kernel tiles both by one size).
- [J] The representative key of a segment ``[a, b)`` (key positions, clipped to
  ``Nk``): ``representative="middle"`` (default) the key ``(a + b - 1) // 2``;
  ``"first"`` key ``a``; ``"max_norm"`` the segment's key of largest norm (ties: lower
  position), found in O(1) per segment from a sparse table built once in O(N log N).
  The paper's single-key representative assumes attention locality (neighbouring keys
  score alike); an isolated needle at a random position is found reliably only with
  ``"max_norm"`` when the needle key stands out in norm.
- [J] The query block's own key blocks (those containing its queries' aligned positions
  ``i + Nk - Nq``; for noncausal self the diagonal block) are always attended; causal
  searches only the blocks strictly before them, noncausal searches all blocks (the own
  block may then be found again).
- [J] A segment whose representative is a padded key scores -inf (never kept in the
  end, though while fewer than ``topk`` segments score above -inf it is still cut);
  the user ``mask`` does not steer the search (it is applied at element level). The
  search is not differentiated.
- [J] Ranking: by score, then (among equal scores, -inf included) the lower segment
  start, then the lower end (an empty segment before a non-empty one). Selection
  arithmetic (:mod:`attnzoo.kernels.block_select`): q and k rounded to float32, scores
  and squared norms formed in float64, so every program ranks the segments alike.
- Noncausal cross has no diagonal and is not supported.

The reference is a second program for the search: the paper's iterative top-k
branch-and-prune with Python lists of segments, one query block (and head) at a time,
the representatives found by a plain argmax over the segment; then dense masked softmax
over the kept blocks. The fast form ``block`` runs every query block's search at once
on tensors of segments (:func:`select`), with a range-argmax sparse table for
``"max_norm"``, then the block-sparse kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ... import stats
from ...errors import AttentionInputError
from ...kernels.block_select import expand_layout, kept_density, num_blocks, selection_values
from ...kernels.blocksparse import block_indices, block_sparse_attention
from ...kernels.dense import softmax_attention
from ...registry import MethodOptions, method

_REPRESENTATIVES = ("middle", "first", "max_norm")
NEG = float("-inf")


@dataclass(frozen=True)
class HipOptions(MethodOptions):
    """Options of ``hip``.

    Attributes:
        block_size: the query block and the final key block.
        topk: key blocks the search keeps per query block (besides its own blocks).
        representative: the key that scores a segment: ``"middle"``, ``"first"`` or
            ``"max_norm"``.
    """

    block_size: int = 64
    topk: int = 4
    representative: str = "middle"

    def validate(self) -> None:
        if self.block_size < 1 or self.topk < 1:
            raise AttentionInputError(
                f"block_size and topk must be >= 1, got block_size={self.block_size}, topk={self.topk}")
        if self.representative not in _REPRESENTATIVES:
            raise AttentionInputError(
                f"representative must be one of {_REPRESENTATIVES}, got {self.representative!r}")

    @classmethod
    def for_length(cls, n: int) -> dict:
        # 8 blocks of N/8, two kept plus the own ones, up to the defaults (64, 4)
        return {"block_size": min(64, max(2, n // 8)), "topk": max(2, min(4, n // 256 - 1))}


def _own_blocks(t: int, bs: int, Nq: int, Nk: int, causal: bool):
    """Query block ``t``'s own key blocks ``range(lo, hi + 1)`` and its searched range
    ``[0, h)``, or None when causal and no query of the block sees a key."""
    off = Nk - Nq
    p0, p1 = t * bs + off, min((t + 1) * bs, Nq) - 1 + off
    if causal:
        if p1 < 0:
            return None
        lo, hi = max(p0, 0) // bs, p1 // bs
        return range(lo, hi + 1), lo
    lo, hi = min(max(p0, 0), Nk - 1) // bs, min(max(p1, 0), Nk - 1) // bs
    return range(lo, hi + 1), num_blocks(Nk, bs)


# ----------------------------------------------------------------------------- reference


def reference_layout(q, k, *, causal, key_mask, scale, block_size, topk, representative="middle"):
    """The tree search written plainly: ``(B, Hq, nqb, nkb)`` bool, each query block's
    own blocks and the blocks its search kept. Python lists of segments, one query
    block and head at a time."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    bs, topk = int(block_size), int(topk)
    nqb, nkb = num_blocks(Nq, bs), num_blocks(Nk, bs)
    q64, k64 = selection_values(q), selection_values(k)
    real = torch.ones(B, Nk, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    sq_norm = (k64 * k64).sum(-1).masked_fill(~real.view(B, 1, Nk), NEG)  # (B, Hkv, Nk)
    layout = torch.zeros(B, Hq, nqb, nkb, dtype=torch.bool, device=q.device)
    for t in range(nqb):
        blocks = _own_blocks(t, bs, Nq, Nk, causal)
        if blocks is None:
            continue
        own, h_t = blocks
        layout[:, :, t, own.start:own.stop] = True
        rows = slice(t * bs, min((t + 1) * bs, Nq))
        m = 2 * topk
        for b in range(B):
            for h in range(Hq):
                kh, qt, norms = k64[b, h // G], q64[b, h, rows], sq_norm[b, h // G]

                def representative_of(seg):
                    a, e = seg[0] * bs, min(seg[1] * bs, Nk)
                    if e <= a:
                        return None  # an empty segment
                    if representative == "middle":
                        return (a + e - 1) // 2
                    if representative == "first":
                        return a
                    return a + int(torch.argmax(norms[a:e]))  # the first of equal norms

                def scores(segs):
                    reps = [representative_of(s) for s in segs]
                    live = [r is not None and bool(real[b, r]) for r in reps]
                    at = torch.tensor([r if r is not None else 0 for r in reps], device=q.device)
                    sc = ((qt @ kh[at].transpose(0, 1)) * scale).amax(0)  # best query of the block
                    return [float(x) if ok else NEG for x, ok in zip(sc, live)]

                segs = [((x * h_t) // m, ((x + 1) * h_t) // m) for x in range(m)]
                while True:
                    sc = scores(segs)
                    best = sorted(range(len(segs)), key=lambda x: (-sc[x], segs[x][0], segs[x][1]))[:topk]
                    segs, kept = [segs[x] for x in best], [sc[x] for x in best]
                    if all(e - s <= 1 for s, e in segs):
                        break
                    halves = []
                    for s, e in segs:  # branch: cut each kept segment in two
                        mid = s + (e - s) // 2 if e - s >= 2 else e
                        halves += [(s, mid), (mid, e)]
                    segs = halves
                for (s, e), score in zip(segs, kept):
                    if e - s == 1 and score > NEG:
                        layout[b, h, t, s] = True
    return layout


@method("hip", short_impl="block", options=HipOptions,
        summary="per query block, a tree search keeps the topk key blocks by representative scores",
        paper="HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning",
        patterns=("noncausal_self", "causal_self", "causal_cross"), exact=False,
        time="O(N k D log N + N k b D)", memory="O(N k b)",
        rows_independent=False,  # a query's blocks are chosen with the other queries of its block
        causal_leak=("the key blocks of a query block are chosen by the block's pooled queries, which include "
                     "queries after it"))
def hip(q, k, v, call):
    """Dense masked softmax over the blocks :func:`reference_layout` kept.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    o = call.options
    bs = int(o.block_size)
    layout = reference_layout(q, k, causal=call.causal, key_mask=call.key_mask, scale=call.scale, block_size=bs,
                              topk=o.topk, representative=o.representative)
    allowed = expand_layout(layout, q.shape[2], k.shape[2], bs, bs)
    user = call.masker.full()  # causal, the user's mask, key padding
    if user is not None:
        allowed = allowed & user
    return softmax_attention(q, k, v, scale=call.scale, mask=allowed, return_weights=call.return_weights)


# ----------------------------------------------------------------------------- block


def _sparse_table(norms: torch.Tensor) -> torch.Tensor:
    """Range-argmax table ``(L, B, H, Nk)``: entry ``[j, ..., i]`` is the position of the
    largest norm in ``[i, i + 2^j)`` (ties: lower position; positions past the end are
    clipped)."""
    Nk = norms.shape[-1]
    pos = torch.arange(Nk, device=norms.device).expand_as(norms).contiguous()
    levels = [pos]
    j = 1
    while (1 << j) <= Nk:
        prev = levels[-1]
        half = 1 << (j - 1)
        right = torch.cat([prev[..., half:], prev[..., -1:].expand(*prev.shape[:-1], half)], dim=-1)
        nl, nr = torch.gather(norms, -1, prev), torch.gather(norms, -1, right)
        levels.append(torch.where(nr > nl, right, prev))
        j += 1
    return torch.stack(levels)


def _range_argmax(table, norms, a, b):
    """Position of the largest norm in ``[a, b)`` (``b > a``); ``a``, ``b``: (B, H, ...)."""
    B, H = norms.shape[:2]
    length = (b - a).clamp(min=1)
    j = torch.floor(torch.log2(length.to(torch.float64))).long()
    j = torch.minimum(j, torch.full_like(j, table.shape[0] - 1))
    # exactness of floor(log2) for integers: correct off-by-one from rounding
    j = torch.where((1 << (j + 1)) <= length, j + 1, j)
    j = torch.where((1 << j) > length, j - 1, j)
    shp = a.shape
    tj, a2, b2 = (t.reshape(B, H, -1) for t in (j, a, b - (1 << j)))
    bi = torch.arange(B, device=a.device).view(-1, 1, 1)
    hi = torch.arange(H, device=a.device).view(1, -1, 1)
    c1 = table[tj, bi, hi, a2.clamp(min=0)]
    c2 = table[tj, bi, hi, b2.clamp(min=0)]
    n1, n2 = norms[bi, hi, c1], norms[bi, hi, c2]
    return torch.where(n2 > n1, c2, c1).reshape(shp)


def select(q, k, *, causal, key_mask, scale, block_size, topk, representative="middle"):
    """The fast form's selection, vectorised: the block layout ``(B, Hq, nqb, nkb)`` bool,
    the tree search's ``topk`` blocks plus each query block's own blocks, every query
    block's search run at once on tensors of segments. Computed without gradient."""
    with torch.no_grad():
        B, Hq, Nq, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        G = Hq // Hkv
        bs = int(block_size)
        nqb, nkb = num_blocks(Nq, bs), num_blocks(Nk, bs)
        off = Nk - Nq
        dev = q.device
        t = torch.arange(nqb, device=dev)
        p0 = t * bs + off
        p1 = torch.clamp((t + 1) * bs, max=Nq) - 1 + off
        if causal:
            live = p1 >= 0
            own_lo = torch.div(p0.clamp(min=0), bs, rounding_mode="floor")
            own_hi = torch.div(p1.clamp(min=0), bs, rounding_mode="floor")
            h = torch.where(live, own_lo, torch.zeros_like(own_lo))  # searched blocks [0, h)
        else:
            live = torch.ones_like(t, dtype=torch.bool)
            own_lo = torch.div(p0.clamp(0, Nk - 1), bs, rounding_mode="floor")
            own_hi = torch.div(p1.clamp(0, Nk - 1), bs, rounding_mode="floor")
            h = torch.full_like(t, nkb)
        kb_ar = torch.arange(nkb, device=dev)
        layout = (kb_ar.view(1, -1) >= own_lo.view(-1, 1)) & (kb_ar.view(1, -1) <= own_hi.view(-1, 1))
        layout = (layout & live.view(-1, 1)).view(1, 1, nqb, nkb).expand(B, Hq, nqb, nkb).clone()

        real = key_mask
        q64 = selection_values(q)
        qb = (F.pad(q64, (0, 0, 0, nqb * bs - Nq)) if nqb * bs != Nq else q64).view(B, Hq, nqb, bs, D)
        q_ok = (torch.arange(nqb * bs, device=dev) < Nq).view(1, 1, nqb, bs, 1)
        # the representatives are gathered from k and only then put in the selection
        # arithmetic (the same values): a float64 copy of all of k was another 268 MiB of
        # fresh memory per call at N = 65,536
        kc = k.detach()
        if representative == "max_norm":
            k64 = selection_values(k)
            norms = (k64 * k64).sum(-1)  # squared norms: the same order
            if real is not None:
                norms = norms.masked_fill(~real.view(B, 1, Nk), NEG)
            table = _sparse_table(norms)
        m = 2 * int(topk)
        s_ar = torch.arange(m, device=dev)
        start = ((s_ar.view(1, -1) * h.view(-1, 1)) // m).view(1, 1, nqb, m).expand(B, Hq, nqb, m)
        end = (((s_ar.view(1, -1) + 1) * h.view(-1, 1)) // m).view(1, 1, nqb, m).expand(B, Hq, nqb, m)
        bi = torch.arange(B, device=dev).view(-1, 1, 1, 1)
        hk = (torch.arange(Hq, device=dev) // G).view(1, -1, 1, 1)
        while True:
            ka = start * bs
            kb = torch.clamp(end * bs, max=Nk)
            nonempty = kb > ka
            if representative == "middle":
                rep = torch.div(ka + kb - 1, 2, rounding_mode="floor")
            elif representative == "first":
                rep = ka
            else:
                a = ka.clamp(max=Nk - 1)  # an empty segment past the end: any representative
                a_kv = a.reshape(B, Hkv, G * nqb * ka.shape[-1])
                b_kv = torch.maximum(kb, a + 1).reshape(B, Hkv, G * nqb * ka.shape[-1])
                rep = _range_argmax(table, norms, a_kv, b_kv).reshape(ka.shape)
            rep = rep.clamp(0, Nk - 1)
            krep = selection_values(kc[bi, hk, rep])  # (B, Hq, nqb, S, D)
            sc = (qb @ krep.transpose(-1, -2)) * scale  # (B, Hq, nqb, bs, S)
            sc = sc.masked_fill(~q_ok, NEG).amax(dim=-2)
            ok = nonempty
            if real is not None:
                ok = ok & real[bi, rep]
            sc = sc.masked_fill(~ok, NEG)
            # rank by score, ties by (start, end): sort by position first, then stably by score
            by_pos = torch.argsort(start * (nkb + 1) + end, dim=-1, stable=True)
            by_score = torch.sort(torch.gather(sc, -1, by_pos), dim=-1, descending=True, stable=True).indices
            order = torch.gather(by_pos, -1, by_score[..., : int(topk)])
            start, end = torch.gather(start, -1, order), torch.gather(end, -1, order)
            kept_sc = torch.gather(sc, -1, order)
            length = torch.where(end > start, end - start, torch.zeros_like(end))
            if int(length.max()) <= 1 if length.numel() else True:
                break
            mid = start + torch.div(length, 2, rounding_mode="floor")
            mid = torch.where(length >= 2, mid, end)
            start = torch.cat([start, mid], dim=-1)
            end = torch.cat([mid, end], dim=-1)
        chosen = (end - start == 1) & torch.isfinite(kept_sc)
        sel = torch.where(chosen, start, torch.full_like(start, nkb))
        extra = torch.zeros(B, Hq, nqb, nkb + 1, dtype=torch.bool, device=dev)
        extra.scatter_(-1, sel, True)
        layout |= extra[..., :nkb] & live.view(1, 1, -1, 1)
    return layout


@hip.impl("block", description="hierarchical search then the block-sparse kernel, O(N log N + N·k·block)")
def block_attention(q, k, v, call):
    """The tree search, then the block-sparse kernel over the kept blocks (a mask_mod is
    evaluated per kept tile)."""
    o = call.options
    Nq, Nk = q.shape[2], k.shape[2]
    bs = int(o.block_size)
    layout = select(q, k, causal=call.causal, key_mask=call.key_mask, scale=call.scale, block_size=bs, topk=o.topk,
                    representative=o.representative)
    idx, valid = block_indices(layout)
    if stats.active():
        density = kept_density(idx, valid, q_len=Nq, kv_len=Nk, block=bs, causal=call.causal,
                               key_mask=call.key_mask, q_block=bs)
        if density is not None:
            stats.report("density", density)
    return block_sparse_attention(q, k, v, idx=idx, valid=valid, block=bs, scale=call.scale, causal=call.causal,
                                  mask=call.mask, key_mask=call.key_mask)
