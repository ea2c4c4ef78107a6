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
- [J] Selection scores are ``scale · q·L_b`` in the accumulation dtype; ties go to the
  lower block index (stable sort). Selection ignores the user ``mask`` (applied at
  element level afterwards) and is not differentiated (topk mode); in grouped mode the
  landmark gates are differentiable (mean of keys, as in training).
- [J] Noncausal self: the own block is fully visible and every other block is a
  candidate. Noncausal cross has no "own block" and is not supported.
- [J] The fast impl serves mode="topk"; mode="grouped" (dense by nature: every visible
  key gets weight) runs on the reference.

Decoding (topk mode): a KV cache plus a landmark cache (one mean per completed block,
computed once when the block fills). Each step scores the new tokens against the cached
landmarks (O(N/block)) and attends to the topk blocks plus its own block.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import stats
from ..errors import AttentionInputError, fmt_shape
from ..registry import Impl, MethodSpec, register
from . import softmax
from ._common import BLOCK_ELEMENTS, compute_dtype, masked_softmax, repeat_kv, segmented


def _check(block_size, topk, mode):
    if int(block_size) < 1 or int(topk) < 0:
        raise AttentionInputError(f"block_size must be >= 1 and topk >= 0, got block_size={block_size}, topk={topk}")
    if mode not in ("topk", "grouped"):
        raise AttentionInputError(f"mode must be 'topk' or 'grouped', got {mode!r}")


def compute_landmarks(k: torch.Tensor, key_padding_mask: Optional[torch.Tensor], block_size: int):
    """Mean of the real keys of each block: ``(B, Hkv, nkb, D)`` in the accumulation dtype,
    and ``has (B, 1, nkb)`` (the block has a real key)."""
    B, Hkv, Nk, D = k.shape
    nkb = -(-Nk // block_size)
    ct = compute_dtype(k.dtype)
    real = torch.ones(B, Nk, dtype=torch.bool, device=k.device) if key_padding_mask is None else key_padding_mask
    real = F.pad(real, (0, nkb * block_size - Nk))
    kp = F.pad(k.to(ct), (0, 0, 0, nkb * block_size - Nk))
    w = real.to(ct).view(B, 1, nkb, block_size, 1)
    cnt = w.sum(-2)  # (B, 1, nkb, 1)
    lm = (kp.view(B, Hkv, nkb, block_size, D) * w).sum(-2) / cnt.clamp(min=1)
    return lm, (cnt.squeeze(-1) > 0)


def _positions(Nq, Nk, device):
    return torch.arange(Nq, device=device) + (Nk - Nq)


def _landmark_scores(q, lm, scale):
    """``scale · q·L_b``: (B, Hq, Nq, nkb) in the accumulation dtype."""
    ct = compute_dtype(q.dtype)
    return (q.to(ct) @ repeat_kv(lm.to(ct), q.shape[1]).transpose(-1, -2)) * scale


def select(q, k, *, causal, key_padding_mask, scale, block_size, topk, landmarks=None):
    """The blocks each query attends: ``idx (B, Hq, Nq, topk+1)`` long, ``valid`` bool;
    slot 0 is the query's own block. Computed without gradient."""
    with torch.no_grad():
        # float32 whatever the input dtype: float64 and float32 runs on the same (rounded)
        # values, and decoding, retrieve the same blocks
        q, k = q.detach().float(), k.detach().float()
        B, Hq, Nq, _ = q.shape
        Nk = k.shape[2]
        bs = int(block_size)
        nkb = -(-Nk // bs)
        lm, has = compute_landmarks(k, key_padding_mask, bs)
        if landmarks is not None:
            lm = landmarks.detach().float()
        p = _positions(Nq, Nk, q.device)
        own = torch.div(p.clamp(min=0), bs, rounding_mode="floor")  # (Nq,)
        blocks = torch.arange(nkb, device=q.device)
        cand = (blocks.view(1, -1) < own.view(-1, 1)) if causal else (blocks.view(1, -1) != own.view(-1, 1))
        cand = cand & (p.view(-1, 1) >= 0)
        cand = cand.view(1, 1, Nq, nkb) & has.view(B, 1, 1, nkb)
        s = _landmark_scores(q, lm, scale).masked_fill(~cand, float("-inf"))
        kk = min(int(topk), nkb)
        order = torch.sort(s, dim=-1, descending=True, stable=True)
        top, top_s = order.indices[..., :kk], order.values[..., :kk]
        top_ok = top_s > float("-inf")
        own_ok = (p >= 0).view(1, 1, Nq, 1).expand(B, Hq, Nq, 1)
        idx = torch.cat([own.view(1, 1, Nq, 1).expand(B, Hq, Nq, 1), top], dim=-1)
        valid = torch.cat([own_ok, top_ok], dim=-1)
    return idx, valid


def _selected_mask(idx, valid, Nk, block_size):
    """Dense (B, Hq, Nq, Nk) mask of the selected blocks (reference only)."""
    B, Hq, Nq, _ = idx.shape
    nkb = -(-Nk // block_size)
    blk = torch.zeros(B, Hq, Nq, nkb + 1, dtype=torch.bool, device=idx.device)
    blk.scatter_(-1, torch.where(valid, idx, nkb), True)
    return blk[..., :nkb].repeat_interleave(block_size, dim=-1)[..., :Nk]


def _grouped_reference(q, k, v, *, causal, mask, key_padding_mask, scale, block_size, landmarks, return_weights):
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    bs = int(block_size)
    nkb = -(-Nk // bs)
    ct = compute_dtype(q.dtype)
    if landmarks is None:
        lm, has = compute_landmarks(k, key_padding_mask, bs)
    else:
        lm = landmarks.to(ct)
        _, has = compute_landmarks(k.detach(), key_padding_mask, bs)
    kr, vr = repeat_kv(k, Hq).to(ct), repeat_kv(v, Hq).to(ct)
    s = (q.to(ct) @ kr.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    ls = _landmark_scores(q, lm, scale)  # (B, Hq, Nq, nkb)
    allowed = torch.ones(B, Hq, Nq, Nk, dtype=torch.bool, device=q.device)
    p = _positions(Nq, Nk, q.device)
    j = torch.arange(Nk, device=q.device)
    if causal:
        allowed = allowed & (j.view(1, -1) <= p.view(-1, 1))
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.view(B, 1, 1, Nk)
    if mask is not None:
        allowed = allowed & mask
    own = torch.div(p.clamp(min=0), bs, rounding_mode="floor")
    kblock = torch.div(j, bs, rounding_mode="floor")
    in_own = (kblock.view(1, -1) == own.view(-1, 1)) & (p.view(-1, 1) >= 0)  # (Nq, Nk)
    blocks = torch.arange(nkb, device=q.device)
    cand = (blocks.view(1, -1) < own.view(-1, 1)) if causal else (blocks.view(1, -1) != own.view(-1, 1))
    cand = cand & (p.view(-1, 1) >= 0)
    # a candidate block gates only if this query may see one of its keys
    blk_any = F.pad(allowed & ~in_own, (0, nkb * bs - Nk)).view(B, Hq, Nq, nkb, bs).any(-1)
    cand = cand.view(1, 1, Nq, nkb) & has.view(B, 1, 1, nkb) & blk_any
    own_allowed = allowed & in_own
    # group normaliser over own keys and candidate landmarks
    neg = float("-inf")
    own_s = s.masked_fill(~own_allowed, neg)
    lm_s = ls.masked_fill(~cand, neg)
    m = torch.maximum(own_s.amax(-1, keepdim=True), lm_s.amax(-1, keepdim=True))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e_own = torch.exp(own_s - m)
    e_lm = torch.exp(lm_s - m)
    Z = e_own.sum(-1, keepdim=True) + e_lm.sum(-1, keepdim=True)
    Zs = torch.where(Z > 0, Z, torch.ones_like(Z))
    gate = e_lm / Zs  # (B, Hq, Nq, nkb)
    # in-block softmax over the allowed keys of candidate blocks
    in_blk = allowed & ~in_own
    sp = F.pad(s.masked_fill(~in_blk, neg), (0, nkb * bs - Nk), value=neg).view(B, Hq, Nq, nkb, bs)
    okp = F.pad(in_blk, (0, nkb * bs - Nk)).view(B, Hq, Nq, nkb, bs)
    within = masked_softmax(sp, okp)
    w_other = (within * gate.unsqueeze(-1)).reshape(B, Hq, Nq, nkb * bs)[..., :Nk]
    w = e_own / Zs + w_other
    out = (w @ vr).to(q.dtype)
    return (out, w.to(q.dtype)) if return_weights else out


def _check_landmarks(landmarks, k, block_size):
    if landmarks is None:
        return
    B, Hkv, Nk, D = k.shape
    nkb = -(-Nk // int(block_size))
    if not isinstance(landmarks, torch.Tensor) or tuple(landmarks.shape) != (B, Hkv, nkb, D):
        raise AttentionInputError(
            f"landmarks must be a tensor (B, Hkv, ceil(Nk/block_size), D) = {(B, Hkv, nkb, D)}, "
            f"got {fmt_shape(landmarks) if isinstance(landmarks, torch.Tensor) else type(landmarks).__name__}"
        )


def reference(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
              return_weights=False, block_size: int = 64, topk: int = 4, mode: str = "topk",
              landmarks: Optional[torch.Tensor] = None):
    """Dense masked softmax over the selected blocks (topk) or the grouped softmax.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    _check(block_size, topk, mode)
    _check_landmarks(landmarks, k, block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if mode == "grouped":
        return _grouped_reference(q, k, v, causal=causal, mask=mask, key_padding_mask=key_padding_mask, scale=scale,
                                  block_size=block_size, landmarks=landmarks, return_weights=return_weights)
    idx, valid = select(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale, block_size=block_size,
                        topk=topk, landmarks=landmarks)
    sel = _selected_mask(idx, valid, k.shape[2], int(block_size))
    allowed = sel if mask is None else sel & mask
    return softmax.reference(q, k, v, causal=causal, mask=allowed, key_padding_mask=key_padding_mask, scale=scale,
                             return_weights=return_weights)


def gather_attention_per_query(q, k, v, *, idx, valid, block, scale, causal, mask=None, key_padding_mask=None):
    """Softmax of each query over its own selected key blocks ``idx (B, Hq, Nq, K)``:
    segments of queries gather their blocks (no N×N), autograd via recomputation."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    K = idx.shape[-1]
    bs = int(block)
    nkb = -(-Nk // bs)
    ct = compute_dtype(q.dtype)
    off = Nk - Nq
    kpad = F.pad(k, (0, 0, 0, nkb * bs - Nk)) if nkb * bs != Nk else k
    vpad = F.pad(v, (0, 0, 0, nkb * bs - Nk)) if nkb * bs != Nk else v
    rows = max(1, BLOCK_ELEMENTS // max(1, B * Hq * K * bs * max(D, Dv, 1)))
    ar = torch.arange(bs, device=q.device)
    kpm = None if key_padding_mask is None else F.pad(key_padding_mask, (0, nkb * bs - Nk))
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


def report_density(idx, valid, *, Nq, Nk, block, causal, key_padding_mask):
    """Mean over queries of (keys in the selected blocks the query may see) / (keys it may see),
    under causality and padding (the user mask is not counted). ``idx (B, H, Nq, K)``."""
    B = idx.shape[0]
    device = idx.device
    real = torch.ones(B, Nk, device=device) if key_padding_mask is None else key_padding_mask.to(torch.float32)
    cum = F.pad(real.to(torch.float64).cumsum(-1), (1, 0))  # (B, Nk+1)
    p = _positions(Nq, Nk, device)
    end_q = (p + 1).clamp(0, Nk) if causal else torch.full_like(p, Nk)
    lo = (idx * block).clamp(max=Nk)
    hi = torch.minimum((idx + 1) * block, end_q.view(1, 1, -1, 1).expand_as(idx)).clamp(max=Nk)
    hi = torch.maximum(hi, lo)
    bix = torch.arange(B, device=device).view(-1, 1, 1, 1)
    got = ((cum[bix, hi] - cum[bix, lo]) * valid).sum(-1)  # (B, H, Nq)
    vis = cum[torch.arange(B, device=device).view(-1, 1), end_q.view(1, -1)].view(B, 1, Nq)
    ratio = torch.where(vis > 0, got / vis.clamp(min=1), torch.zeros_like(got))
    rows = (vis > 0).expand_as(ratio)
    if bool(rows.any()):
        stats.report("density", float(ratio[rows].mean()))


def _gather_supports(call):
    if call.options.get("mode", "topk") != "topk":
        return "the gather path serves mode='topk' (grouped softmax weighs every visible key: use the reference)"
    return None


def gather_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                     return_weights=False, block_size: int = 64, topk: int = 4, mode: str = "topk",
                     landmarks: Optional[torch.Tensor] = None):
    """Per-query retrieval of the topk blocks plus the own block, by gathers."""
    _check(block_size, topk, mode)
    if mode != "topk":
        raise AttentionInputError("impl='gather' serves mode='topk' only")
    _check_landmarks(landmarks, k, block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    idx, valid = select(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale, block_size=block_size,
                        topk=topk, landmarks=landmarks)
    if stats.active():
        report_density(idx, valid, Nq=q.shape[2], Nk=k.shape[2], block=int(block_size), causal=causal,
                       key_padding_mask=key_padding_mask)
    return gather_attention_per_query(q, k, v, idx=idx, valid=valid, block=int(block_size), scale=scale,
                                      causal=causal, mask=mask, key_padding_mask=key_padding_mask)


# ------------------------------------------------------------------------------ decoding


class LandmarkCache:
    """KV cache plus one landmark (mean key) per completed block."""

    def __init__(self, batch, kv_heads, head_dim, v_dim, block_size, dtype, device):
        from ..decoding import KVCache

        self.kv = KVCache(batch, kv_heads, head_dim, v_dim, dtype=dtype, device=device)
        self.block_size = int(block_size)
        self.landmarks = torch.zeros(batch, kv_heads, 0, head_dim, dtype=torch.float32, device=device)

    @property
    def length(self) -> int:
        return self.kv.length

    def nbytes(self) -> int:
        return self.kv.nbytes() + self.landmarks.numel() * self.landmarks.element_size()


def init_state(batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None,
               block_size=64, topk=4, mode="topk"):
    _check(block_size, topk, mode)
    if mode != "topk":
        raise AttentionInputError("landmark decoding retrieves blocks (mode='topk'); grouped mode has no step")
    return LandmarkCache(batch_size, kv_heads, head_dim, v_dim, block_size, dtype, device)


def step(cache: LandmarkCache, q, k, v, *, scale, impl="auto", block_size=64, topk=4, mode="topk"):
    """Append the new tokens, complete the landmarks of filled blocks, and attend each new
    query to its topk retrieved blocks plus its own block."""
    bs = cache.block_size
    cache.kv.append(k, v)
    L = cache.kv.length
    keys, values = cache.kv.keys, cache.kv.values
    done = L // bs
    have = cache.landmarks.shape[2]
    if done > have:  # landmarks of the newly completed blocks, computed once
        new, _ = compute_landmarks(keys[:, :, have * bs: done * bs].float(), None, bs)  # as select() does
        cache.landmarks = torch.cat([cache.landmarks, new], dim=2)
    nkb = -(-L // bs)
    lm = cache.landmarks
    if nkb > done:  # the partial block is never a causal candidate: a placeholder
        lm = torch.cat([lm, lm.new_zeros(lm.shape[0], lm.shape[1], nkb - done, lm.shape[3])], dim=2)
    idx, valid = select(q, keys, causal=True, key_padding_mask=None, scale=scale, block_size=bs, topk=topk,
                        landmarks=lm)
    return gather_attention_per_query(q, keys, values, idx=idx, valid=valid, block=bs, scale=scale, causal=True)


register(
    MethodSpec(
        name="landmark",
        family="sparse",
        summary="each query retrieves the topk key blocks by landmark score, plus its own block",
        paper="Landmark Attention: Random-Access Infinite Context Length for Transformers",
        reference=reference,
        impls=[Impl("gather", gather_attention, supports=_gather_supports, mask_mod=True,
                    description="per-query gather of the topk retrieved blocks + own block, O(N·(k+1)·block)")],
        patterns=("noncausal_self", "causal_self", "causal_cross"),
        exact=False,
        time="O(N^2/b D + N k b D)",
        memory="O(N^2/b + N k b)",
        decoding=True,
        state_size="KV cache plus one landmark per block: (2 + 1/b)·N·Hkv·D per sequence",
        init_state=init_state,
        step=step,
        test_options={"block_size": 16, "topk": 2},
    )
)
