"""FlashAttention's algorithm in PyTorch: online softmax over tiles, forward and backward.

"FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness" (Dao et
al., 2022). Queries in chunks, keys in blocks; the forward keeps a running max and sum
per row, the backward (a custom ``autograd.Function`` that saves only Q, K, V, O and
the row log-sum-exp) recomputes each tile's probabilities, so no N×N tensor ever
exists: memory O(N · block). Blocks beyond the causal frontier are skipped; the mask
(causal, a dense mask or a mask_mod, a key mask) and the score_mod are evaluated one
tile at a time. Works in the grouped layout ``(B, Hkv, G, N, D)``, so GQA needs no copy
of K and V.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import score_mods
from .common import compute_dtype
from .masking import Masker, group_mask, make_masker

#: Default score tile, in elements over all (batch, head) pairs: 2 MiB of float32, small
#: enough to stay in the L2 cache while the tile's five elementwise passes run
#: (measured: 256x256 tiles at B*H = 8 are ~1.8x faster than 1024x512).
TILE_ELEMENTS = 1 << 19


def tile_sizes(batch: int, heads: int, q_len: int, kv_len: int, block_q: Optional[int] = None,
               block_k: Optional[int] = None):
    """``(block_q, block_k)``: key blocks of 256 (or ``block_k``) and as many query rows as
    keep one score tile at :data:`TILE_ELEMENTS` (or ``block_q``)."""
    bk = int(block_k) if block_k else min(kv_len, 256)
    bq = int(block_q) if block_q else max(64, min(1024, TILE_ELEMENTS // max(1, batch * heads * bk)))
    return max(1, min(bq, q_len)), max(1, bk)


def _masked(s, masker: Masker, qs, qe, ks, ke, Hkv, G):
    allowed = masker.block(qs, qe, ks, ke)
    if allowed is not None:
        s = s.masked_fill(~group_mask(allowed, Hkv, G), float("-inf"))
    return s


class _TiledSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, masker, score_mod, bq, bk):
        B, Hq, Nq, D = q.shape
        Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        G = Hq // Hkv
        ct = compute_dtype(q.dtype)
        qg = q.view(B, Hkv, G, Nq, D)
        kg, vg = k.unsqueeze(2), v.unsqueeze(2)
        out = torch.zeros(B, Hkv, G, Nq, Dv, dtype=ct, device=q.device)
        lse = torch.full((B, Hkv, G, Nq), float("-inf"), dtype=ct, device=q.device)
        for qs in range(0, Nq, bq):
            qe = min(Nq, qs + bq)
            qb = qg[:, :, :, qs:qe].to(ct) * scale
            m = torch.full((B, Hkv, G, qe - qs, 1), float("-inf"), dtype=ct, device=q.device)
            l = torch.zeros_like(m)
            acc = torch.zeros(B, Hkv, G, qe - qs, Dv, dtype=ct, device=q.device)
            for ks in range(0, masker.key_end(qs, qe), bk):
                ke = min(Nk, ks + bk)
                s = qb @ kg[:, :, :, ks:ke].to(ct).transpose(-1, -2)
                s = score_mods.apply(score_mod, s, qs, ks, batch=B, heads=Hq, kv_heads=Hkv)
                s = _masked(s, masker, qs, qe, ks, ke, Hkv, G)
                m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
                m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)
                p = s.sub_(m_safe).exp_()  # in place: the tile is reused, not reallocated
                corr = torch.exp(m - m_safe)
                l.mul_(corr).add_(p.sum(dim=-1, keepdim=True))
                acc.mul_(corr).add_(p @ vg[:, :, :, ks:ke].to(ct))
                m = m_new
            out[:, :, :, qs:qe] = acc / l.clamp(min=torch.finfo(ct).tiny)
            lse[:, :, :, qs:qe] = (m + torch.log(l)).squeeze(-1)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, masker, score_mod, bq, bk)
        return out.view(B, Hq, Nq, Dv).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, masker, score_mod, bq, bk = ctx.args
        B, Hq, Nq, D = q.shape
        Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        G = Hq // Hkv
        ct = compute_dtype(q.dtype)
        chain = not score_mods.is_additive(score_mod)  # d mod / d score is not 1: chain through it
        qg, kg, vg = q.view(B, Hkv, G, Nq, D), k.unsqueeze(2), v.unsqueeze(2)
        dog = dout.reshape(B, Hkv, G, Nq, Dv).to(ct)
        delta = (dog * out).sum(dim=-1, keepdim=True)  # rowsum(dO * O)
        lse_safe = lse.masked_fill(torch.isinf(lse), float("inf")).unsqueeze(-1)  # empty rows -> P = 0
        dq = torch.zeros(B, Hkv, G, Nq, D, dtype=ct, device=q.device)
        dk = torch.zeros(B, Hkv, Nk, D, dtype=ct, device=q.device)
        dv = torch.zeros(B, Hkv, Nk, Dv, dtype=ct, device=q.device)
        for qs in range(0, Nq, bq):
            qe = min(Nq, qs + bq)
            n = qe - qs
            qb = qg[:, :, :, qs:qe].to(ct) * scale
            dob = dog[:, :, :, qs:qe]
            for ks in range(0, masker.key_end(qs, qe), bk):
                ke = min(Nk, ks + bk)
                raw = qb @ kg[:, :, :, ks:ke].to(ct).transpose(-1, -2)
                if chain:
                    with torch.enable_grad():
                        raw = raw.requires_grad_(True)
                        modded = score_mods.apply(score_mod, raw, qs, ks, batch=B, heads=Hq, kv_heads=Hkv)
                    s = modded.detach().clone()
                else:
                    s = score_mods.apply(score_mod, raw, qs, ks, batch=B, heads=Hq, kv_heads=Hkv)
                s = _masked(s, masker, qs, qe, ks, ke, Hkv, G)
                p = s.sub_(lse_safe[:, :, :, qs:qe]).exp_()
                vb = vg[:, :, :, ks:ke].to(ct)
                dv[:, :, ks:ke] += p.reshape(B, Hkv, G * n, ke - ks).transpose(-1, -2) @ dob.reshape(B, Hkv, G * n, Dv)
                ds = (dob @ vb.transpose(-1, -2)).sub_(delta[:, :, :, qs:qe]).mul_(p)  # P * (dP - delta)
                if chain:
                    ds = torch.autograd.grad(modded, raw, ds)[0]
                dq[:, :, :, qs:qe] += ds @ kg[:, :, :, ks:ke].to(ct)
                dk[:, :, ks:ke] += ds.reshape(B, Hkv, G * n, ke - ks).transpose(-1, -2) @ qb.reshape(B, Hkv, G * n, D)
        dq = (dq * scale).view(B, Hq, Nq, D).to(q.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def tiled_softmax_attention(q, k, v, *, scale: float, causal: bool = False, mask=None, key_mask=None,
                            score_mod: Optional[Callable] = None, block_q: Optional[int] = None,
                            block_k: Optional[int] = None) -> torch.Tensor:
    """Exact softmax attention, tiled: O(N · block) memory, autograd works.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    The score_mod must not hold tensors that require grad (its own gradient is not
    computed; the scores' is).
    """
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    masker = make_masker(q, k, causal, mask, key_mask)
    bq, bk = tile_sizes(B, Hq, Nq, Nk, block_q, block_k)
    return _TiledSoftmax.apply(q.contiguous(), k.contiguous(), v.contiguous(), scale, masker, score_mod, bq, bk)
