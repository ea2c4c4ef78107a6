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
blocks O(N·(topk+2)·block·D) via the block-sparse kernel. The reference runs the same
search (the shared :func:`select`) and then dense masked softmax over the kept blocks.

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
  end); the user ``mask`` does not steer the search (it is applied at element level).
  The search is not differentiated.
- Noncausal cross has no diagonal and is not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import stats
from ..errors import AttentionInputError
from ..registry import Impl, MethodSpec, register
from . import softmax
from ._blocksparse import block_indices, block_sparse_attention

_REPRESENTATIVES = ("middle", "first", "max_norm")


def _check(block_size, topk, representative):
    if int(block_size) < 1 or int(topk) < 1:
        raise AttentionInputError(f"block_size and topk must be >= 1, got block_size={block_size}, topk={topk}")
    if representative not in _REPRESENTATIVES:
        raise AttentionInputError(f"representative must be one of {_REPRESENTATIVES}, got {representative!r}")


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


def select(q, k, *, causal, key_padding_mask, scale, block_size, topk, representative="middle"):
    """The block layout ``(B, Hq, nqb, nkb)`` bool: the tree search's ``topk`` blocks plus
    each query block's own blocks. Computed without gradient."""
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        B, Hq, Nq, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        G = Hq // Hkv
        bs = int(block_size)
        nqb, nkb = -(-Nq // bs), -(-Nk // bs)
        off = Nk - Nq
        dev = q.device
        # select in float32 whatever the input dtype, so a float64 reference and a float32
        # fast path on the same (rounded) values choose the same blocks
        ct = torch.float32
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

        real = None if key_padding_mask is None else key_padding_mask
        qb = F.pad(q.to(ct), (0, 0, 0, nqb * bs - Nq)).view(B, Hq, nqb, bs, D)
        q_ok = (torch.arange(nqb * bs, device=dev) < Nq).view(1, 1, nqb, bs, 1)
        kc = k.to(ct)
        if representative == "max_norm":
            norms = kc.norm(dim=-1)
            if real is not None:
                norms = norms.masked_fill(~real.view(B, 1, Nk), float("-inf"))
            table = _sparse_table(norms)
        m = 2 * int(topk)
        s_ar = torch.arange(m, device=dev)
        start = ((s_ar.view(1, -1) * h.view(-1, 1)) // m).view(1, 1, nqb, m).expand(B, Hq, nqb, m)
        end = (((s_ar.view(1, -1) + 1) * h.view(-1, 1)) // m).view(1, 1, nqb, m).expand(B, Hq, nqb, m)
        bi = torch.arange(B, device=dev).view(-1, 1, 1, 1)
        hk = (torch.arange(Hq, device=dev) // G).view(1, -1, 1, 1)
        neg = float("-inf")
        while True:
            ka = start * bs
            kb = torch.clamp(end * bs, max=Nk)
            nonempty = kb > ka
            if representative == "middle":
                rep = torch.div(ka + kb - 1, 2, rounding_mode="floor")
            elif representative == "first":
                rep = ka
            else:
                a_kv = ka.reshape(B, Hkv, G * nqb * ka.shape[-1])
                b_kv = torch.maximum(kb, ka + 1).reshape(B, Hkv, G * nqb * ka.shape[-1])
                rep = _range_argmax(table, norms, a_kv, b_kv).reshape(ka.shape)
            rep = rep.clamp(0, Nk - 1)
            krep = kc[bi, hk, rep]  # (B, Hq, nqb, S, D)
            sc = (qb @ krep.transpose(-1, -2)) * scale  # (B, Hq, nqb, bs, S)
            sc = sc.masked_fill(~q_ok, neg).amax(dim=-2)
            ok = nonempty
            if real is not None:
                ok = ok & real[bi, rep]
            sc = sc.masked_fill(~ok, neg)
            order = torch.sort(sc, dim=-1, descending=True, stable=True).indices[..., : int(topk)]
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


def _dense(layout, Nq, Nk, bs):
    return layout.repeat_interleave(bs, dim=2)[:, :, :Nq].repeat_interleave(bs, dim=3)[..., :Nk]


def reference(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
              return_weights=False, block_size: int = 64, topk: int = 4, representative: str = "middle"):
    """Dense masked softmax over the blocks the tree search kept.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    _check(block_size, topk, representative)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    layout = select(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale, block_size=block_size,
                    topk=topk, representative=representative)
    allowed = _dense(layout, q.shape[2], k.shape[2], int(block_size))
    if mask is not None:
        allowed = allowed & mask
    return softmax.reference(q, k, v, causal=causal, mask=allowed, key_padding_mask=key_padding_mask, scale=scale,
                             return_weights=return_weights)


def _report_density(layout, *, Nq, Nk, bs, causal, key_padding_mask):
    """Mean over queries of (visible keys in the kept blocks) / (visible keys), under
    causality and padding (the user mask is not counted)."""
    B, nkb = layout.shape[0], layout.shape[3]
    dev = layout.device
    real = torch.ones(B, Nk, device=dev) if key_padding_mask is None else key_padding_mask.to(torch.float64)
    cum = F.pad(real.to(torch.float64).cumsum(-1), (1, 0))  # (B, Nk+1)
    p = torch.arange(Nq, device=dev) + (Nk - Nq)
    end_q = (p + 1).clamp(0, Nk) if causal else torch.full_like(p, Nk)
    lo = (torch.arange(nkb, device=dev) * bs).clamp(max=Nk)
    hi = torch.minimum(lo.view(1, -1) + bs, end_q.view(-1, 1)).clamp(max=Nk)  # (Nq, nkb)
    hi = torch.maximum(hi, lo.view(1, -1))
    per_block = cum[:, hi] - cum[:, lo.view(1, -1).expand_as(hi)]  # (B, Nq, nkb)
    lay_q = layout.repeat_interleave(bs, dim=2)[:, :, :Nq].to(torch.float64)  # (B, H, Nq, nkb)
    got = (lay_q * per_block.unsqueeze(1)).sum(-1)
    vis = cum[:, end_q].view(B, 1, Nq)
    rows = (vis > 0).expand_as(got)
    if bool(rows.any()):
        stats.report("density", float((got / vis.clamp(min=1))[rows].mean()))


def block_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                    return_weights=False, block_size: int = 64, topk: int = 4, representative: str = "middle"):
    """The tree search, then the block-sparse kernel over the kept blocks."""
    _check(block_size, topk, representative)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    Nq, Nk = q.shape[2], k.shape[2]
    bs = int(block_size)
    layout = select(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale, block_size=bs, topk=topk,
                    representative=representative)
    if stats.active():
        _report_density(layout, Nq=Nq, Nk=Nk, bs=bs, causal=causal, key_padding_mask=key_padding_mask)
    idx, valid = block_indices(layout)
    return block_sparse_attention(q, k, v, idx=idx, valid=valid, block=bs, scale=scale, causal=causal, mask=mask,
                                  key_padding_mask=key_padding_mask)


register(
    MethodSpec(
        name="hip",
        family="sparse",
        summary="per query block, a tree search keeps the topk key blocks by representative scores",
        paper="HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning",
        reference=reference,
        impls=[Impl("block", block_attention, mask_mod=True,  # a mask_mod is evaluated per kept tile
                    description="hierarchical search then the block-sparse kernel, O(N log N + N·k·block)")],
        patterns=("noncausal_self", "causal_self", "causal_cross"),
        exact=False,
        time="O(N k D log N + N k b D)",
        memory="O(N k b)",
        decoding=False,
        rows_independent=False,  # a query's blocks are chosen with the other queries of its block
        test_options={"block_size": 16, "topk": 2},
        causal_leak=("the key blocks of a query block are chosen by the block's pooled queries, which include "
                     "queries after it"),
    )
)
