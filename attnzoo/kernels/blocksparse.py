"""The block-sparse kernel: softmax attention over only the kept (query-block, key-block)
tiles of a block layout, with an exact element-level mask inside them.

For query block ``i`` the kept key blocks are ``idx[h, i, :K]`` (``valid`` marks the
real ones; rows keep different numbers of blocks). Query rows are processed in
segments of consecutive query blocks; a segment gathers the key blocks it needs into a
compact buffer, computes ``(rows, K·block)`` scores, applies the element mask
(causal lower-right, a dense mask or mask_mod, key padding, the method's own pattern)
and a masked softmax, and multiplies the gathered values. Under autograd each segment
is recomputed in the backward pass and its key gradients are index-added back
(:func:`attnzoo.kernels.segmented.segmented`), so time is O(N·K·block·D) and memory
O(N·K·block): never N×N. Used by ``block_sparse``, the window methods and the routed
methods.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .common import BLOCK_ELEMENTS, compute_dtype, needs_graph
from .dense import masked_softmax
from .segmented import segmented


def block_indices(layout: torch.Tensor):
    """``layout (H', nqb, nkb)`` bool -> ``idx (H', nqb, K)`` long and ``valid (H', nqb, K)``:
    the kept key blocks of each query block first, in ascending order, padded to the
    largest count ``K`` (at least 1)."""
    counts = layout.sum(-1)
    K = max(1, int(counts.max()) if counts.numel() else 1)
    order = torch.argsort((~layout).to(torch.int8), dim=-1, stable=True)[..., :K]
    valid = torch.gather(layout, -1, order)
    return order, valid


def mask_at(mask: torch.Tensor, qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    """Values of a 4-D broadcastable mask at query positions ``qp`` and key positions ``kp``
    (both 5-D broadcast index tensors)."""
    b = torch.arange(mask.shape[0], device=mask.device).view(-1, 1, 1, 1, 1)
    h = torch.arange(mask.shape[1], device=mask.device).view(1, -1, 1, 1, 1)
    qi = qp if mask.shape[2] > 1 else torch.zeros_like(qp)
    ki = kp if mask.shape[3] > 1 else torch.zeros_like(kp)
    return mask[b, h, qi, ki]


def block_sparse_attention(q, k, v, *, idx: torch.Tensor, valid: torch.Tensor, block: int, scale: float,
                           causal: bool = False, mask=None, key_mask: Optional[torch.Tensor] = None,
                           element_mask: Optional[Callable] = None,
                           score_mod: Optional[Callable] = None) -> torch.Tensor:
    """Softmax attention over the kept blocks.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    ``idx``/``valid``: (H', nqb, K) with H' in {1, Hq} (see :func:`block_indices`), or
    (B', H', nqb, K) with B' in {1, B} for content-dependent (per-sequence) selections.
    ``mask``: bool tensor broadcastable to (B, Hq, Nq, Nk) or a mask_mod;
    ``element_mask(b, h, q_pos, k_pos)``: the method's own pattern (a mask_mod);
    ``key_mask``: (B, Nk) bool, True = real key; ``score_mod``: evaluated on the gathered
    scores at their true positions.
    """
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    nqb, nkb = -(-Nq // block), -(-Nk // block)
    if idx.dim() == 3:
        idx, valid = idx.unsqueeze(0), valid.unsqueeze(0)
    Bl, Hl, _, K = idx.shape
    ct = compute_dtype(q.dtype)
    offset = Nk - Nq
    qpad = F.pad(q, (0, 0, 0, nqb * block - Nq)) if nqb * block != Nq else q
    kpad = F.pad(k, (0, 0, 0, nkb * block - Nk)) if nkb * block != Nk else k
    vpad = F.pad(v, (0, 0, 0, nkb * block - Nk)) if nkb * block != Nk else v
    per_seg = max(1, BLOCK_ELEMENTS // max(1, B * Hq * block * K * block))
    arange_b = torch.arange(block, device=q.device)

    def attend(qb, kg, vg, qs, qe, blocks, seg_valid, graph=True):
        """Rows ``[qs, qe)`` against their gathered key blocks ``kg/vg (B, Hq, sbq, K·block, ·)``,
        whose block numbers are ``blocks (Bl, Hl, sbq, K)``; without ``graph``, in place."""
        sbq = (qe - qs) // block
        s = qb.to(ct).view(B, Hq, sbq, block, D) @ kg.transpose(-1, -2)
        s = s * scale if graph else s.mul_(scale)
        key_pos = (blocks * block).unsqueeze(-1) + arange_b  # (Bl, Hl, sbq, K, block)
        slot_ok = seg_valid.unsqueeze(-1).expand_as(key_pos).reshape(Bl, Hl, sbq, 1, K * block)
        kp = key_pos.reshape(Bl, Hl, sbq, 1, K * block)
        qp = (qs + torch.arange(qe - qs, device=q.device)).view(1, 1, sbq, block, 1)
        ok = slot_ok & (kp < Nk)
        if causal:
            ok = ok & (kp <= qp + offset)
        # masks are evaluated at in-range positions only (the padded tail is already excluded
        # above), so a mask_mod that indexes a per-position tensor never reads past its end
        qc, kc = qp.clamp(max=Nq - 1), kp.clamp(max=Nk - 1)
        bi = torch.arange(B, device=q.device).view(-1, 1, 1, 1, 1)
        hi = torch.arange(Hq, device=q.device).view(1, -1, 1, 1, 1)
        if element_mask is not None:
            ok = ok & element_mask(bi, hi, qc, kc)
        if mask is not None:
            ok = ok & (mask_at(mask, qc, kc) if isinstance(mask, torch.Tensor) else mask(bi, hi, qc, kc))
        if score_mod is not None:
            s = score_mod(s, bi, hi, qc, kc)
        if key_mask is not None:
            kpm = F.pad(key_mask, (0, nkb * block - Nk))
            ok = ok & kpm[torch.arange(B, device=q.device).view(-1, 1, 1, 1, 1), kp]
        p = masked_softmax(s, ok, inplace=not graph and score_mod is None)
        return (p @ vg).reshape(B, Hq, qe - qs, Dv).to(q.dtype)

    if not needs_graph(q, k, v):
        # no graph: each (head, query block) gathers its K key blocks straight from the
        # whole padded k and v by one index_select of contiguous blocks. The segments'
        # union of needed blocks (below, for the recomputing backward) is nearly every
        # block at long N, so copying it per segment made the forward O(N²/segment).
        kf = kpad.to(ct).reshape(B * Hkv * nkb, block, D)
        vf = vpad.to(ct).reshape(B * Hkv * nkb, block, Dv)
        kv_row = ((torch.arange(B, device=q.device).view(B, 1, 1, 1) * Hkv
                   + torch.div(torch.arange(Hq, device=q.device), G, rounding_mode="floor").view(1, Hq, 1, 1)) * nkb)
        out = torch.empty(B, Hq, nqb * block, Dv, dtype=q.dtype, device=q.device)
        for i0 in range(0, nqb, per_seg):
            i1 = min(nqb, i0 + per_seg)
            qs, qe, sbq = i0 * block, i1 * block, i1 - i0
            blocks, seg_valid = idx[:, :, i0:i1], valid[:, :, i0:i1]
            # unused slots may hold anything: they read block 0 and are masked in attend, so
            # masks and key padding are only ever indexed at real positions
            blocks = torch.where(seg_valid, blocks, 0).clamp(0, nkb - 1)
            rows = (kv_row + blocks).reshape(-1)  # flat block rows of kf / vf, (B·Hq·sbq·K,)
            kg = kf.index_select(0, rows).view(B, Hq, sbq, K * block, D)
            vg = vf.index_select(0, rows).view(B, Hq, sbq, K * block, Dv)
            out[:, :, qs:qe] = attend(qpad[:, :, qs:qe], kg, vg, qs, qe, blocks, seg_valid, graph=False)
        return out[:, :, :Nq]

    infos, plan = {}, []
    for i0 in range(0, nqb, per_seg):
        i1 = min(nqb, i0 + per_seg)
        seg_idx, seg_valid = idx[:, :, i0:i1], valid[:, :, i0:i1]
        needed = torch.unique(seg_idx[seg_valid]) if bool(seg_valid.any()) else seg_idx.new_zeros(1)
        local = torch.searchsorted(needed, seg_idx.contiguous()).clamp(max=needed.numel() - 1)
        keys = (needed.view(-1, 1) * block + arange_b).reshape(-1)
        infos[i0 * block] = (needed, local, seg_valid)
        plan.append((i0 * block, i1 * block, keys))

    def seg_fn(qb, kb, vb, item):
        qs, qe, _ = item
        needed, local, seg_valid = infos[qs]
        nb, sbq = needed.numel(), (qe - qs) // block
        kb = kb.to(ct).view(B, Hkv, 1, nb, block, D).expand(B, Hkv, G, nb, block, D).reshape(B, Hq, nb, block, D)
        vb = vb.to(ct).view(B, Hkv, 1, nb, block, Dv).expand(B, Hkv, G, nb, block, Dv).reshape(B, Hq, nb, block, Dv)
        gi = local.reshape(Bl, Hl, sbq * K, 1, 1)
        kg = torch.gather(kb, 2, gi.expand(B, Hq, sbq * K, block, D)).view(B, Hq, sbq, K * block, D)
        vg = torch.gather(vb, 2, gi.expand(B, Hq, sbq * K, block, Dv)).view(B, Hq, sbq, K * block, Dv)
        return attend(qb, kg, vg, qs, qe, needed[local], seg_valid)

    return segmented(seg_fn, plan, qpad, kpad, vpad)[:, :, :Nq]
