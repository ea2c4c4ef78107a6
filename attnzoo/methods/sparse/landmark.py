"""Landmark attention: blocks of keys represented by a landmark, retrieved by content.

"Landmark Attention: Random-Access Infinite Context Length for Transformers"
(Mohtashami & Jaggi, NeurIPS 2023). The keys are cut into blocks of ``block_size``
tokens; block ``b`` has a landmark key ``L_b``. Query ``i`` (aligned position
``p = i + Nk - Nq``) has its own block ``o = p // block_size``.

mode="topk" (inference, the default): query ``i`` attends with ordinary softmax to the
keys of the ``topk`` candidate blocks with the highest ``q_i · L_b`` plus its own block
(candidates: causal ``b < o``, noncausal ``b != o``), then causal / padding / mask at
element level. Work O(N·(N/block)·D) for the landmark scores (as in the paper: every
token scores every landmark) plus O(N·(topk+1)·block·D) for the attention itself
(each segment of queries also copies the union of its blocks, at most Nk keys).

mode="grouped" (training, the paper's grouped softmax): one softmax over the own
block's visible keys and the landmark scores of the candidate blocks; the mass of
landmark ``b`` is then spread over block ``b``'s keys by a softmax inside the block:

    w_ij = exp(s_ij) / Z                           j in the own block
    w_ij = exp(q_i·L_b) / Z * softmax_{j' in b}(s_ij')_j   j in candidate block b
    Z    = sum_{own j} exp(s_ij) + sum_b exp(q_i·L_b)    (all scores times ``scale``)

Judgement calls:
- [J] The landmark of a block is the mean of its (real, non-padded) keys — the paper
  trains a landmark token instead; a tensor ``landmarks (B, Hkv, nblocks, D)`` can be
  given. A block with no real key has no landmark and is never a candidate.
- [J] Grouped mode: a candidate block takes part in the group only when the query may
  see one of its keys (causal, padding, user mask), so masked blocks get no mass.
- [J] Own block "with gate 1" is read as the paper has it: the current block's keys are
  in the same softmax group as the landmarks (so the weights sum to one).
- [J] Selection is per query (per token, as the paper retrieves at inference), not per
  query block: decoding must equal the causal forward, and a decoded token cannot see
  the later queries of its block. So the fast path ``gather`` does not run the
  block-sparse kernel (whose tiles are per query block): it groups the (query, retrieved
  block) pairs by key block and scores each key block against a tile of the queries
  that chose it (:func:`block_pairs_attention`), O(N·(topk+1)·block) work and memory.
- [J] Selection arithmetic (:mod:`attnzoo.kernels.block_select`): q and the keys are
  rounded to float32, a landmark is the mean of its block's real keys accumulated in
  float64 and rounded to float32, and the score ``scale · q·L_b`` is formed in float64.
  Ties go to the lower block index. Selection ignores the user ``mask`` (applied at
  element level afterwards) and is not differentiated (topk mode); in grouped mode the
  landmark gates are differentiable (mean of keys in the accumulation dtype, as in
  training).
- [J] Noncausal self: the own block is fully visible and every other block is a
  candidate. Noncausal cross has no "own block" and is not supported.
- [J] The fast impl serves mode="topk"; mode="grouped" (dense by nature: every visible
  key gets weight) runs on the reference.

The reference is a second program for the retrieval: for each own block ``o`` (one
loop step per key block holding query positions) it pools the landmarks block by block,
scores its queries against the candidate landmarks and keeps a block when fewer than
``topk`` candidates beat it (a higher score, or an equal one at a lower index); then
dense masked softmax over the kept blocks. The fast form selects with one vectorised
stable sort (:func:`select`).

Decoding (topk mode): a KV cache plus a landmark cache (one mean per completed block,
computed once when the block fills). Each step scores the new tokens against the cached
landmarks (O(N/block)) and attends to the topk blocks plus its own block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ... import stats
from ...errors import AttentionInputError, fmt_shape
from ...kernels.block_select import (SELECT_DTYPE, aligned_positions, block_means, expand_layout, kept_density,
                                     num_blocks, selection_rounded, selection_scores, selection_values, stable_topk)
from ...kernels.caches import Decoder, KVCache
from ...kernels.common import compute_dtype, needs_graph, repeat_kv
from ...kernels.dense import masked_softmax, softmax_attention
from ...registry import MethodOptions, method


@dataclass(frozen=True)
class LandmarkOptions(MethodOptions):
    """Options of ``landmark``.

    Attributes:
        block_size: tokens per block (one landmark each).
        topk: retrieved blocks per query besides its own (mode="topk").
        mode: ``"topk"`` (retrieval, the default) or ``"grouped"`` (the paper's grouped
            softmax, training).
        landmarks: given landmark keys ``(B, Hkv, ceil(Nk/block_size), D)`` instead of the
            blocks' mean keys.
    """

    block_size: int = 64
    topk: int = 4
    mode: str = "topk"
    landmarks: Optional[torch.Tensor] = None

    def validate(self) -> None:
        if self.block_size < 1 or self.topk < 0:
            raise AttentionInputError(
                f"block_size must be >= 1 and topk >= 0, got block_size={self.block_size}, topk={self.topk}")
        if self.mode not in ("topk", "grouped"):
            raise AttentionInputError(f"mode must be 'topk' or 'grouped', got {self.mode!r}")

    @classmethod
    def for_length(cls, n: int) -> dict:
        # 8 blocks of N/8, two retrieved plus the own one, up to the defaults (64, 4)
        return {"block_size": min(64, max(2, n // 8)), "topk": max(2, min(4, n // 256 - 1))}


def compute_landmarks(k: torch.Tensor, key_mask: Optional[torch.Tensor], block_size: int):
    """Mean of the real keys of each block: ``(B, Hkv, nkb, D)`` in the accumulation dtype,
    and ``has (B, 1, nkb)`` (the block has a real key). Differentiable in k."""
    lm, count = block_means(k, key_mask, block_size, compute_dtype(k.dtype))
    return lm, (count > 0).unsqueeze(1)


def _check_landmarks(landmarks, k, block_size):
    if landmarks is None:
        return
    B, Hkv, Nk, D = k.shape
    nkb = num_blocks(Nk, block_size)
    if not isinstance(landmarks, torch.Tensor) or tuple(landmarks.shape) != (B, Hkv, nkb, D):
        raise AttentionInputError(
            f"landmarks must be a tensor (B, Hkv, ceil(Nk/block_size), D) = {(B, Hkv, nkb, D)}, "
            f"got {fmt_shape(landmarks) if isinstance(landmarks, torch.Tensor) else type(landmarks).__name__}"
        )


# ----------------------------------------------------------------------------- reference


def reference_select(q, k, *, causal, key_mask, scale, block_size, topk, landmarks=None) -> torch.Tensor:
    """The retrieval written plainly, one own block at a time: ``(B, Hq, Nq, nkb)`` bool,
    the blocks each query attends (its own and the ``topk`` best candidates).

    The landmarks are pooled block by block (float64 sums of the float32-rounded real
    keys, rounded to float32); a candidate is kept when fewer than ``topk`` candidates
    beat it: a higher score ``scale · q·L_b``, or the same score at a lower index."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    bs = int(block_size)
    nkb = num_blocks(Nk, bs)
    real = torch.ones(B, Nk, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    k64 = selection_values(k)
    lms, has = [], []
    for blk in range(nkb):
        sl = slice(blk * bs, min(Nk, (blk + 1) * bs))
        w = real[:, sl].to(torch.float64)  # (B, m)
        n = w.sum(-1)
        mean = (k64[:, :, sl] * w.view(B, 1, -1, 1)).sum(2) / n.clamp(min=1).view(B, 1, 1)
        lms.append(mean.to(torch.float32))
        has.append(n > 0)
    lm = torch.stack(lms, dim=2) if landmarks is None else landmarks.detach().to(torch.float32)
    lm = repeat_kv(lm, Hq)  # (B, Hq, nkb, D): query head h reads k/v head h // G
    has = torch.stack(has, dim=1)  # (B, nkb)
    sel = torch.zeros(B, Hq, Nq, nkb, dtype=torch.bool, device=q.device)
    pos = aligned_positions(Nq, Nk, q.device)
    for o in range(nkb):
        rows = torch.nonzero((pos >= 0) & (torch.div(pos, bs, rounding_mode="floor") == o)).flatten()
        if rows.numel() == 0:
            continue
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        sel[:, :, r0:r1, o] = True  # the own block
        cands = [b for b in range(nkb) if (b < o if causal else b != o)]
        if not cands or topk == 0:
            continue
        c = torch.tensor(cands, device=q.device)
        sc = selection_scores(q[:, :, r0:r1], lm[:, :, c], scale)  # (B, Hq, R, C)
        live = has[:, c].view(B, 1, 1, -1)
        sc = sc.masked_fill(~live, float("-inf"))
        for x in range(len(cands)):
            mine = sc[..., x:x + 1]
            beaten = (sc > mine).sum(-1) + (sc[..., :x] == mine).sum(-1)
            sel[:, :, r0:r1, cands[x]] = (beaten < topk) & live[..., x]
    return sel


def _grouped(q, k, v, call):
    """The paper's grouped softmax, one own block at a time: one softmax over the own
    block's visible keys and the candidate blocks' landmark scores, each landmark's mass
    spread over its block by a softmax inside the block."""
    opts = call.options
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    bs = int(opts.block_size)
    nkb = num_blocks(Nk, bs)
    scale, causal = call.scale, call.causal
    ct = compute_dtype(q.dtype)
    lm, has = compute_landmarks(k, call.key_mask, bs)
    if opts.landmarks is not None:
        lm = opts.landmarks.to(ct)
    kr, vr, lr = repeat_kv(k, Hq).to(ct), repeat_kv(v, Hq).to(ct), repeat_kv(lm, Hq).to(ct)
    allowed = call.masker.full()
    if allowed is None:
        allowed = torch.ones(1, 1, Nq, Nk, dtype=torch.bool, device=q.device)
    allowed = allowed.expand(B, Hq, Nq, Nk)
    pos = aligned_positions(Nq, Nk, q.device)
    neg = float("-inf")
    pieces = [q.new_zeros(B, Hq, int((pos < 0).sum()), Nk, dtype=ct)]  # rows before the keys see nothing
    for o in range(nkb):  # the queries whose own block is o: consecutive rows
        rows = torch.nonzero((pos >= 0) & (torch.div(pos, bs, rounding_mode="floor") == o)).flatten()
        if rows.numel() == 0:
            continue
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        qo, ok = q[:, :, r0:r1].to(ct), allowed[:, :, r0:r1]
        own = slice(o * bs, min(Nk, (o + 1) * bs))
        s_own = ((qo @ kr[:, :, own].transpose(-1, -2)) * scale).masked_fill(~ok[..., own], neg)
        terms, blocks = [s_own], []
        for b in range(nkb):  # the candidate blocks, each gated by its landmark
            if not (b < o if causal else b != o):
                continue
            blk = slice(b * bs, min(Nk, (b + 1) * bs))
            gate_ok = has[:, 0, b].view(B, 1, 1, 1) & ok[..., blk].any(-1, keepdim=True)
            terms.append(((qo @ lr[:, :, b:b + 1].transpose(-1, -2)) * scale).masked_fill(~gate_ok, neg))
            blocks.append(blk)
        logits = torch.cat(terms, dim=-1)
        m = logits.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
        e = torch.exp(logits - m)
        Z = e.sum(-1, keepdim=True)
        e = e / torch.where(Z > 0, Z, torch.ones_like(Z))  # one group: own keys and landmarks
        n_own = own.stop - own.start
        wo = q.new_zeros(B, Hq, r1 - r0, Nk, dtype=ct)
        wo[..., own] = e[..., :n_own]
        for x, blk in enumerate(blocks):  # a landmark's mass, spread by a softmax inside its block
            s_in = (qo @ kr[:, :, blk].transpose(-1, -2)) * scale
            wo[..., blk] = e[..., n_own + x:n_own + x + 1] * masked_softmax(s_in, ok[..., blk])
        pieces.append(wo)
    w = torch.cat(pieces, dim=2)
    out = (w @ vr).to(q.dtype)
    return (out, w.to(q.dtype)) if call.return_weights else out


@method("landmark", short_impl="gather", options=LandmarkOptions,
        summary="each query retrieves the topk key blocks by landmark score, plus its own block",
        paper="Landmark Attention: Random-Access Infinite Context Length for Transformers",
        patterns=("noncausal_self", "causal_self", "causal_cross"), exact=False,
        time="O(N^2/b D + N k b D)", memory="O(N^2/b + N k b)")
def landmark(q, k, v, call):
    """Dense masked softmax over the blocks :func:`reference_select` retrieves (topk),
    or the grouped softmax.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    o = call.options
    _check_landmarks(o.landmarks, k, o.block_size)
    if o.mode == "grouped":
        return _grouped(q, k, v, call)
    sel = reference_select(q, k, causal=call.causal, key_mask=call.key_mask, scale=call.scale,
                           block_size=o.block_size, topk=o.topk, landmarks=o.landmarks)
    allowed = expand_layout(sel, q.shape[2], k.shape[2], 1, int(o.block_size))
    user = call.masker.full()  # causal, the user's mask, key padding
    if user is not None:
        allowed = allowed & user
    return softmax_attention(q, k, v, scale=call.scale, mask=allowed, return_weights=call.return_weights)


# ----------------------------------------------------------------------------- gather


def select(q, k, *, causal, key_mask, scale, block_size, topk, landmarks=None):
    """The fast form's selection, vectorised: ``idx (B, Hq, Nq, topk+1)`` long and
    ``valid`` bool; slot 0 is the query's own block, then its ``topk`` best candidates,
    best first (ties: lower index; :func:`~attnzoo.kernels.block_select.stable_topk`).

    Queries are scored in chunks of rows (the ``(rows, nkb)`` float64 scores of a chunk
    stay small); under causality a chunk scores only the landmarks before its last own
    block, so the scoring is O(N·(N/block)·D / 2). Computed without gradient."""
    with torch.no_grad():
        B, Hq, Nq, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        G = Hq // Hkv
        bs, kk = int(block_size), int(topk)
        nkb = num_blocks(Nk, bs)
        dev = q.device
        lm, count = block_means(selection_rounded(k), key_mask, bs, SELECT_DTYPE)  # sums in float64, no float64 copy of k
        lm = lm.to(torch.float32) if landmarks is None else landmarks.detach().to(torch.float32)
        lm = lm.to(SELECT_DTYPE)  # the float32 landmarks, held in float64
        has = count > 0  # (B, nkb)
        p = aligned_positions(Nq, Nk, dev)
        own = torch.div(p.clamp(min=0), bs, rounding_mode="floor")  # (Nq,)
        idx = own.view(1, 1, Nq, 1).expand(B, Hq, Nq, kk + 1).clone()  # unused slots: any block
        valid = torch.zeros(B, Hq, Nq, kk + 1, dtype=torch.bool, device=dev)
        valid[..., 0] = (p >= 0).view(1, 1, Nq)
        if kk == 0 or nkb < 2:
            return idx, valid
        padded = key_mask is not None and not bool(has.all())
        rows = max(1, (1 << 21) // max(1, B * Hq * nkb))
        for r0 in range(0, Nq, rows):
            r1 = min(Nq, r0 + rows)
            R, own_c, p_c = r1 - r0, own[r0:r1], p[r0:r1]
            cols = int(own_c.max()) if causal else nkb  # candidates: b < own (causal), b != own
            if cols == 0:
                continue
            # the chunk's queries in the selection arithmetic, converted chunk by chunk (a
            # float64 copy of all of q is as large as q twice over, and fresh memory is slow)
            qc = selection_values(q[:, :, r0:r1]).reshape(B, Hkv, G * R, D)
            sc = (qc @ lm[:, :, :cols].transpose(-1, -2)).mul_(float(scale)).view(B, Hq, R, cols)
            if causal:  # b >= own(i) (and rows before the keys) are no candidates: the last columns only
                lo = int(own_c.min())
                out = (torch.arange(lo, cols, device=dev).view(1, -1) >= own_c.view(-1, 1)) | (p_c < 0).view(-1, 1)
                sc[..., lo:].masked_fill_(out, float("-inf"))
            else:
                sc.scatter_(-1, own_c.view(1, 1, R, 1).expand(B, Hq, R, 1), float("-inf"))
                if bool((p_c < 0).any()):
                    sc.masked_fill_((p_c < 0).view(1, 1, R, 1), float("-inf"))
            if padded:
                sc.masked_fill_(~has[:, :cols].view(B, 1, 1, cols), float("-inf"))
            top_s, top = stable_topk(sc, kk)
            n = top.shape[-1]
            idx[:, :, r0:r1, 1:1 + n] = top
            valid[:, :, r0:r1, 1:1 + n] = top_s > float("-inf")
    return idx, valid


#: Query rows per tile of the block-granular kernel: a tile is up to ``TILE_ROWS``
#: (query, block) pairs that retrieved the same key block, scored by one
#: ``(rows, D) @ (D, block)`` product.
TILE_ROWS = 128


def _tiles(idx, valid, *, kv_heads, nkb, tile):
    """Sort the valid (query, key block) pairs of ``idx/valid (B, Hq, Nq, K)`` by key block
    (batch, k/v head, block) and cut each block's list into tiles of at most ``tile``
    rows. Returns ``rows (T, tile)``: the flat query row ``(b·Hq + h)·Nq + i`` of each
    tile row (-1: empty), and ``blocks (T,)``: the flat key block ``(b·Hkv + hkv)·nkb + j``
    of each tile. Pairs keep their (head, query) order inside a block (deterministic)."""
    B, Hq, Nq, K = idx.shape
    dev = idx.device
    G = Hq // kv_heads
    pair = valid.reshape(-1).nonzero().squeeze(1)  # flat (b, h, i, slot) of every pair
    row = torch.div(pair, K, rounding_mode="floor")
    bh = torch.div(row, Nq, rounding_mode="floor")  # b·Hq + h
    b, h = torch.div(bh, Hq, rounding_mode="floor"), bh % Hq
    key = (b * kv_heads + torch.div(h, G, rounding_mode="floor")) * nkb + idx.reshape(-1)[pair]
    key, order = torch.sort(key, stable=True)
    row = row[order]
    counts = torch.bincount(key, minlength=B * kv_heads * nkb)
    tile = max(1, min(int(tile), int(counts.max()) if key.numel() else 1))
    per = torch.div(counts + tile - 1, tile, rounding_mode="floor")  # tiles of each key block
    tile0 = torch.cumsum(per, 0) - per
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(key.numel(), device=dev) - first[key]
    at = (tile0[key] + torch.div(rank, tile, rounding_mode="floor")) * tile + rank % tile
    T = int(per.sum())
    rows = torch.full((T * tile,), -1, dtype=torch.long, device=dev)
    rows[at] = row
    blocks = torch.repeat_interleave(torch.arange(per.numel(), device=dev), per)
    return rows.view(T, tile), blocks


def _mask_at(mask, b, h, i, j):
    """A bool mask tensor (broadcastable to (B, Hq, Nq, Nk)) or a mask_mod at index grids."""
    if isinstance(mask, torch.Tensor):
        return mask[b if mask.shape[0] > 1 else 0, h if mask.shape[1] > 1 else 0,
                    i if mask.shape[2] > 1 else 0, j if mask.shape[3] > 1 else 0]
    return mask(b, h, i, j)


def _partial(s, vb, graph=True):
    """A partial softmax over the last axis of ``s`` (``-inf`` = masked): the row maxima
    ``m`` (detached; ``-inf`` where nothing is visible), ``Σ e·v`` and ``Σ e`` with
    ``e = exp(s - m)``; without ``graph``, ``e`` overwrites ``s``."""
    with torch.no_grad():
        m = s.amax(-1)
        m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    if graph:
        e = torch.exp(s - m_safe.unsqueeze(-1))
    else:  # no graph to keep: in place, no second (pairs x block) tensor
        e = s.sub_(m_safe.unsqueeze(-1)).exp_()
    return m, e @ vb, e.sum(-1)


def block_pairs_attention(q, k, v, *, idx, valid, block, scale, causal, mask=None, key_mask=None, own=False,
                          tile=TILE_ROWS):
    """Softmax of each query over its selected key blocks ``idx/valid (B, Hq, Nq, K)`` (and,
    with ``own``, its own block: the one holding its aligned position), block-granular.

    * own blocks: the queries whose own block is ``j`` are scored against block ``j`` in
      one ``(block, D) @ (D, block)`` product (causal: the triangle);
    * selected blocks: every (query, block) pair is one row of a tile; pairs are grouped
      by key block and cut into tiles of ``tile`` rows, so a key block is read once per
      tile (not once per query) and scored by one ``(tile, D) @ (D, block)`` product.

    Each piece gives a partial softmax (its maximum, ``Σ e``, ``Σ e·v``); a query's pieces
    are merged exactly (``out = Σ w·num / Σ w·den``, ``w = exp(m - max m)``, the maxima
    detached). Causality (lower-right), key padding and the user mask (bool tensor or
    mask_mod) are applied per element where they can exclude a key; a query with
    nothing visible gets zeros. Under causality the selected blocks are expected before
    the own block (then they need no causal mask; others are masked). Time and memory
    O(N·(K+1)·block·D), differentiable in q, k, v.
    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv)."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    bs = int(block)
    nkb = num_blocks(Nk, bs)
    pad = nkb * bs - Nk
    ct = compute_dtype(q.dtype)
    dev = q.device
    off = Nk - Nq
    K = idx.shape[-1]
    BHN = B * Hq * Nq
    graph = needs_graph(q, k, v)  # without one, the score tiles and the merge are updated in place
    neg = float("-inf")
    qs = q.to(ct) * scale
    kp_all = F.pad(k, (0, 0, 0, pad)).to(ct) if pad else k.to(ct)
    vp_all = F.pad(v, (0, 0, 0, pad)).to(ct) if pad else v.to(ct)
    bi = torch.arange(B, device=dev)
    hi = torch.arange(Hq, device=dev)
    pieces = []  # (m, num, den) per query row, each (BHN,) / (BHN, Dv), for the own blocks
    if own:
        o0 = max(off, 0) // bs  # the first key block holding a query position
        nob = nkb - o0
        lead = off - o0 * bs  # aligned row a holds query a - lead (negative: queries before the keys cropped)
        qa = F.pad(qs, (0, 0, lead, pad)).view(B, Hkv, G, nob, bs, D)
        ka = kp_all[:, :, o0 * bs:].reshape(B, Hkv, 1, nob, bs, D)
        va = vp_all[:, :, o0 * bs:].reshape(B, Hkv, 1, nob, bs, Dv)
        so = (qa @ ka.transpose(-1, -2)).view(B, Hq, nob, bs, bs)
        with torch.no_grad():
            r = torch.arange(bs, device=dev)
            ok = None
            if causal:
                ok = (r.view(1, -1) <= r.view(-1, 1)).view(1, 1, 1, bs, bs)
            elif pad:
                ok = (torch.arange(nob * bs, device=dev) < Nk - o0 * bs).view(1, 1, nob, 1, bs)
            if key_mask is not None or mask is not None:
                kpos = (o0 * bs + torch.arange(nob * bs, device=dev)).view(1, 1, nob, 1, bs)
                ipos = (o0 * bs + torch.arange(nob * bs, device=dev) - off).view(1, 1, nob, bs, 1)
                kc, ic = kpos.clamp(max=Nk - 1), ipos.clamp(0, Nq - 1)
                extra = kpos < Nk
                if key_mask is not None:
                    extra = extra & key_mask[bi.view(-1, 1, 1, 1, 1), kc]
                if mask is not None:
                    extra = extra & _mask_at(mask, bi.view(-1, 1, 1, 1, 1), hi.view(1, -1, 1, 1, 1), ic, kc)
                ok = extra if ok is None else ok & extra
        if ok is not None:
            so = so.masked_fill(~ok, neg)
        m, num, den = _partial(so.view(B, Hkv, G, nob, bs, bs), va, graph)
        back = (0, 0, -lead, -pad)  # aligned rows -> query rows (rows before the keys: nothing)
        if lead or pad:
            m = F.pad(m.reshape(B, Hq, nob * bs, 1), back, value=neg).reshape(BHN)
            num = F.pad(num.reshape(B, Hq, nob * bs, Dv), back).reshape(BHN, Dv)
            den = F.pad(den.reshape(B, Hq, nob * bs, 1), back).reshape(BHN)
        else:  # the aligned rows are the query rows
            m, num, den = m.reshape(BHN), num.reshape(BHN, Dv), den.reshape(BHN)
        pieces.append((m, num, den))
    with torch.no_grad():
        idx, valid = idx.expand(B, Hq, Nq, K), valid.expand(B, Hq, Nq, K)
        rows, blocks = _tiles(idx, valid, kv_heads=Hkv, nkb=nkb, tile=tile)
        T, tile = rows.shape
        filled = rows >= 0
        flat = torch.where(filled, rows, torch.full_like(rows, BHN))  # empty rows: a spare row
        kpos = ((blocks % nkb) * bs).view(T, 1, 1) + torch.arange(bs, device=dev)  # (T, 1, bs)
        ok = None
        if pad and not causal:
            ok = kpos < Nk
        late = causal and bool(((idx >= (torch.div(aligned_positions(Nq, Nk, dev).clamp(min=0), bs,
                                                      rounding_mode="floor")).view(1, 1, Nq, 1)) & valid).any())
        if key_mask is not None or mask is not None or late:
            rc = rows.clamp(min=0)
            bq = torch.div(rc, Hq * Nq, rounding_mode="floor").unsqueeze(-1)  # (T, tile, 1)
            hq = (torch.div(rc, Nq, rounding_mode="floor") % Hq).unsqueeze(-1)
            iq = (rc % Nq).unsqueeze(-1)
            kc = kpos.clamp(max=Nk - 1)
            extra = kpos < Nk
            if late:
                extra = extra & (kpos <= iq + off)
            if key_mask is not None:
                extra = extra & key_mask[torch.div(blocks, Hkv * nkb, rounding_mode="floor").view(T, 1, 1), kc]
            if mask is not None:
                extra = extra & _mask_at(mask, bq, hq, iq, kc)
            ok = extra if ok is None else ok & extra
    qrows = torch.cat([qs.reshape(BHN, D), qs.new_zeros(1, D)])  # the spare row: a zero query
    qt = qrows.index_select(0, flat.view(-1)).view(T, tile, D)
    kt = kp_all.reshape(B * Hkv * nkb, bs, D).index_select(0, blocks)
    vt = vp_all.reshape(B * Hkv * nkb, bs, Dv).index_select(0, blocks)
    st = torch.bmm(qt, kt.transpose(1, 2))
    if ok is not None:
        st = st.masked_fill(~ok, neg) if graph else st.masked_fill_(~ok, neg)
    m_t, num_t, den_t = _partial(st, vt, graph)
    with torch.no_grad():
        m_t = m_t.masked_fill(~filled, neg).view(-1)
        flat = flat.view(-1)
        top = torch.full((BHN + 1,), neg, dtype=ct, device=dev).scatter_reduce(0, flat, m_t, reduce="amax")
        for m, _, _ in pieces:
            top[:BHN] = torch.maximum(top[:BHN], m)
        top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
        w_t = torch.exp(m_t - top[flat])  # 0 for empty rows and pairs with nothing visible
        w_own = [torch.exp(m - top[:BHN]) for m, _, _ in pieces]
    if graph:
        out = torch.zeros(BHN + 1, Dv, dtype=ct, device=dev).index_add(0, flat, num_t.view(-1, Dv) * w_t.unsqueeze(-1))
        tot = torch.zeros(BHN + 1, dtype=ct, device=dev).index_add(0, flat, den_t.view(-1) * w_t)
        out, tot = out[:BHN], tot[:BHN]
        for (_, num, den), w in zip(pieces, w_own):
            out = out + num * w.unsqueeze(-1)
            tot = tot + den * w
    else:  # no graph: the same sums in place (each pairs-sized temporary is another fresh 100+ MiB at 16K)
        out = torch.zeros(BHN + 1, Dv, dtype=ct, device=dev).index_add_(0, flat, num_t.view(-1, Dv).mul_(w_t.unsqueeze(-1)))
        tot = torch.zeros(BHN + 1, dtype=ct, device=dev).index_add_(0, flat, den_t.view(-1).mul_(w_t))
        out, tot = out[:BHN], tot[:BHN]
        for (_, num, den), w in zip(pieces, w_own):
            out.addcmul_(num, w.unsqueeze(-1))
            tot.addcmul_(den, w)
    tot = tot.unsqueeze(-1)
    empty = tot == 0  # nothing visible: zeros
    out = torch.where(empty, torch.zeros_like(out), out / torch.where(empty, torch.ones_like(tot), tot))
    return out.view(B, Hq, Nq, Dv).to(q.dtype)


def _gather_supports(call) -> Optional[str]:
    if call.options.mode != "topk":
        return "the gather path serves mode='topk' (grouped softmax weighs every visible key: use the reference)"
    return None


@landmark.impl("gather", supports=_gather_supports,
               description="per-query retrieval of the topk blocks + own block, scored block-granular (tiles of "
                           "the queries that chose a key block), O(N·(k+1)·block)")
def gather_attention(q, k, v, call):
    """Per-query retrieval of the topk blocks plus the own block, scored by
    :func:`block_pairs_attention` (a key block read once per tile of its queries)."""
    o = call.options
    _check_landmarks(o.landmarks, k, o.block_size)
    bs = int(o.block_size)
    idx, valid = select(q, k, causal=call.causal, key_mask=call.key_mask, scale=call.scale, block_size=bs,
                        topk=o.topk, landmarks=o.landmarks)
    if stats.active():
        density = kept_density(idx, valid, q_len=q.shape[2], kv_len=k.shape[2], block=bs, causal=call.causal,
                               key_mask=call.key_mask)
        if density is not None:
            stats.report("density", density)
    return block_pairs_attention(q, k, v, idx=idx[..., 1:], valid=valid[..., 1:], own=True, block=bs,
                                 scale=call.scale, causal=call.causal, mask=call.mask, key_mask=call.key_mask)


# ------------------------------------------------------------------------------ decoding


class LandmarkCache:
    """KV cache plus one landmark (mean key, float32) per completed block."""

    def __init__(self, batch, kv_heads, head_dim, v_dim, block_size, dtype, device):
        self.kv = KVCache(batch, kv_heads, head_dim, v_dim, dtype=dtype, device=device)
        self.block_size = int(block_size)
        self.landmarks = torch.zeros(batch, kv_heads, 0, head_dim, dtype=torch.float32, device=device)

    @property
    def length(self) -> int:
        return self.kv.length

    def nbytes(self) -> int:
        return self.kv.nbytes() + self.landmarks.numel() * self.landmarks.element_size()


@landmark.decodes
class LandmarkDecoder(Decoder):
    """Append the new tokens, complete the landmarks of filled blocks, and attend each new
    query to its topk retrieved blocks plus its own block (the fast form's selection)."""

    state_size = "KV cache plus one landmark per block: (2 + 1/b)·N·Hkv·D per sequence"

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, options):
        if options.mode != "topk":
            raise AttentionInputError("landmark decoding retrieves blocks (mode='topk'); grouped mode has no step")
        if options.landmarks is not None:
            raise AttentionInputError("landmark decoding pools its landmarks from the cache; drop landmarks=")
        return LandmarkCache(batch_size, kv_heads, head_dim, v_dim, options.block_size, dtype, device)

    def step(self, run, cache, q, k, v, *, scale, impl, options):
        bs = cache.block_size
        cache.kv.append(k, v)
        L = cache.kv.length
        keys, values = cache.kv.keys, cache.kv.values
        done = L // bs
        have = cache.landmarks.shape[2]
        if done > have:  # landmarks of the newly completed blocks, computed once (as select() does)
            new, _ = block_means(selection_values(keys[:, :, have * bs: done * bs]), None, bs)
            cache.landmarks = torch.cat([cache.landmarks, new.to(torch.float32)], dim=2)
        nkb = num_blocks(L, bs)
        lm = cache.landmarks
        if nkb > done:  # the partial block is never a causal candidate: a placeholder
            lm = torch.cat([lm, lm.new_zeros(lm.shape[0], lm.shape[1], nkb - done, lm.shape[3])], dim=2)
        idx, valid = select(q, keys, causal=True, key_mask=None, scale=scale, block_size=bs, topk=options.topk,
                            landmarks=lm)
        return block_pairs_attention(q, keys, values, idx=idx[..., 1:], valid=valid[..., 1:], own=True, block=bs,
                                     scale=scale, causal=True)
