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
  the later queries of its block. So the fast path ``gather`` gathers, for a segment of
  queries, each query's ``topk + 1`` blocks (O(N·(topk+1)·block) memory and work)
  instead of running the block-sparse kernel (whose tiles are per query block).
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
from ...kernels.block_select import (aligned_positions, block_means, expand_layout, kept_density, num_blocks,
                                     selection_scores, selection_values, topk_lowest_index)
from ...kernels.caches import Decoder, KVCache
from ...kernels.common import BLOCK_ELEMENTS, compute_dtype, repeat_kv
from ...kernels.dense import masked_softmax, softmax_attention
from ...kernels.segmented import segmented
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


@method("landmark", options=LandmarkOptions,
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
    ``valid`` bool; slot 0 is the query's own block, then the candidates by one stable
    sort of the scores (ties: lower index). Computed without gradient."""
    with torch.no_grad():
        B, Hq, Nq, _ = q.shape
        Nk = k.shape[2]
        bs = int(block_size)
        nkb = num_blocks(Nk, bs)
        lm, count = block_means(selection_values(k), key_mask, bs)
        lm = lm.to(torch.float32) if landmarks is None else landmarks.detach().to(torch.float32)
        has = count > 0  # (B, nkb)
        p = aligned_positions(Nq, Nk, q.device)
        own = torch.div(p.clamp(min=0), bs, rounding_mode="floor")  # (Nq,)
        blocks = torch.arange(nkb, device=q.device)
        cand = (blocks.view(1, -1) < own.view(-1, 1)) if causal else (blocks.view(1, -1) != own.view(-1, 1))
        cand = cand & (p.view(-1, 1) >= 0)
        cand = cand.view(1, 1, Nq, nkb) & has.view(B, 1, 1, nkb)
        s = selection_scores(q, repeat_kv(lm, Hq), scale).masked_fill(~cand, float("-inf"))
        top, top_ok = topk_lowest_index(s, topk)
        own_ok = (p >= 0).view(1, 1, Nq, 1).expand(B, Hq, Nq, 1)
        idx = torch.cat([own.view(1, 1, Nq, 1).expand(B, Hq, Nq, 1), top], dim=-1)
        valid = torch.cat([own_ok, top_ok], dim=-1)
    return idx, valid


def gather_attention_per_query(q, k, v, *, idx, valid, block, scale, causal, mask=None, key_mask=None):
    """Softmax of each query over its own selected key blocks ``idx (B, Hq, Nq, K)``:
    segments of queries gather their blocks (no N×N), autograd via recomputation."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    K = idx.shape[-1]
    bs = int(block)
    nkb = num_blocks(Nk, bs)
    ct = compute_dtype(q.dtype)
    off = Nk - Nq
    kpad = F.pad(k, (0, 0, 0, nkb * bs - Nk)) if nkb * bs != Nk else k
    vpad = F.pad(v, (0, 0, 0, nkb * bs - Nk)) if nkb * bs != Nk else v
    rows = max(1, BLOCK_ELEMENTS // max(1, B * Hq * K * bs * max(D, Dv, 1)))
    ar = torch.arange(bs, device=q.device)
    kpm = None if key_mask is None else F.pad(key_mask, (0, nkb * bs - Nk))
    infos, plan = {}, []
    for qs in range(0, Nq, rows):
        qe = min(Nq, qs + rows)
        si, sv = idx[:, :, qs:qe], valid[:, :, qs:qe]
        needed = torch.unique(si[sv]) if bool(sv.any()) else si.new_zeros(1)
        local = torch.searchsorted(needed, si.contiguous()).clamp(max=needed.numel() - 1)
        infos[qs] = (needed, local, sv)
        plan.append((qs, qe, (needed.view(-1, 1) * bs + ar).reshape(-1)))

    def seg_fn(qb, kb, vb, item):
        qs, qe, _ = item
        needed, local, sv = infos[qs]
        nb, R = needed.numel(), qe - qs
        kb = kb.to(ct).reshape(B, Hkv, nb, bs * D)
        vb = vb.to(ct).reshape(B, Hkv, nb, bs * Dv)
        li = local.reshape(B, Hkv, G * R * K, 1)
        kg = torch.gather(kb, 2, li.expand(B, Hkv, G * R * K, bs * D)).view(B, Hkv, G, R, K * bs, D)
        vg = torch.gather(vb, 2, li.expand(B, Hkv, G * R * K, bs * Dv)).view(B, Hkv, G, R, K * bs, Dv)
        s = (qb.to(ct).view(B, Hkv, G, R, 1, D) @ kg.transpose(-1, -2)).view(B, Hq, R, K * bs) * scale
        kp = ((needed[local] * bs).unsqueeze(-1) + ar).reshape(B, Hq, R, K * bs)
        ok = sv.unsqueeze(-1).expand(B, Hq, R, K, bs).reshape(B, Hq, R, K * bs) & (kp < Nk)
        if causal:
            qp = (torch.arange(qs, qe, device=q.device) + off).view(1, 1, R, 1)
            ok = ok & (kp <= qp)
        if kpm is not None:
            ok = ok & kpm[torch.arange(B, device=q.device).view(-1, 1, 1, 1), kp]
        if mask is not None and not isinstance(mask, torch.Tensor):  # a mask_mod at the gathered pairs
            ok = ok & mask(torch.arange(B, device=q.device).view(-1, 1, 1, 1),
                           torch.arange(Hq, device=q.device).view(1, -1, 1, 1),
                           torch.arange(qs, qe, device=q.device).view(1, 1, R, 1), kp.clamp(max=Nk - 1))
        elif mask is not None:
            bi = torch.arange(B, device=q.device).view(-1, 1, 1, 1) if mask.shape[0] > 1 else 0
            hi = torch.arange(Hq, device=q.device).view(1, -1, 1, 1) if mask.shape[1] > 1 else 0
            qi = torch.arange(qs, qe, device=q.device).view(1, 1, R, 1) if mask.shape[2] > 1 else 0
            ki = kp.clamp(max=Nk - 1) if mask.shape[3] > 1 else 0
            ok = ok & mask[bi, hi, qi, ki]
        pr = masked_softmax(s, ok)
        out = pr.view(B, Hkv, G, R, 1, K * bs) @ vg
        return out.view(B, Hq, R, Dv).to(q.dtype)

    return segmented(seg_fn, plan, q, kpad, vpad)


def _gather_supports(call) -> Optional[str]:
    if call.options.mode != "topk":
        return "the gather path serves mode='topk' (grouped softmax weighs every visible key: use the reference)"
    return None


@landmark.impl("gather", supports=_gather_supports,
               description="per-query gather of the topk retrieved blocks + own block, O(N·(k+1)·block)")
def gather_attention(q, k, v, call):
    """Per-query retrieval of the topk blocks plus the own block, by gathers."""
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
    return gather_attention_per_query(q, k, v, idx=idx, valid=valid, block=bs, scale=call.scale,
                                      causal=call.causal, mask=call.mask, key_mask=call.key_mask)


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
        return gather_attention_per_query(q, keys, values, idx=idx, valid=valid, block=bs, scale=scale, causal=True)
