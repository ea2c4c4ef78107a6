"""SeerAttention: a learnable gate picks the key blocks each query block attends to.

    Qp_i = avgpool(Q, block i)                               (nqb × D)
    Kp_j = [maxpool(K, j) ; minpool(K, j) ; avgpool(K, j)]   (nkb × 3D)
    G    = softmax_j( (Qp Wq)(Kp Wk)ᵀ / √Dg )                 (causal: future blocks masked)
    keep = top-k blocks of each row of G (or G >= threshold), plus the diagonal block(s)
    O    = softmax attention of every query over the keys of its kept blocks

"SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs" (Gao et al., 2024).
The gate (AttnGate) is the paper's: Q blocks average-pooled, K blocks max-, min- and
average-pooled and concatenated, one linear projection per head on each side. It is
trained by self-distillation (:func:`train_gate`): the target is the dense attention map
max-pooled to blocks and row-normalised, the loss the KL divergence between it and the
gate's block distribution.

Implementations:

* ``reference`` — the gate written per block: each key block pooled from its own real
  keys, then for each query block its pooled query, its scores against every key block,
  the visible and the diagonal blocks of its row, and its top-k by a directly counted
  rank (or its gate probabilities against ``threshold``); the kept blocks expanded to an
  explicit ``Nq × Nk`` mask, then dense masked softmax.
* ``block`` — the selection vectorised (:func:`select_blocks`: pooled block tensors, one
  matrix product, a stable sort) and the block-sparse kernel over the kept blocks only:
  gate O((N/b)² D), attention O(N·K·b·D), memory O(N·K·b + (N/b)²) — never N×N.

The two compute the selection with different programs (shared only: the tie rule and
the rounding of the scores, :mod:`attnzoo.kernels.routing_select`).

Judgement calls:

* [J] K pooling: max, min and average concatenated (3D inputs to ``gate_k``), as in the
  paper; ``gate_q: (Hq, D, Dg)``, ``gate_k: (Hq, 3D, Dg)``, one projection per *query*
  head (GQA: the pooled k/v-head blocks are shared by the head's query group, then
  projected per query head). The paper's RoPE on the pooled blocks is left to the
  caller's q/k (they are already rotated when they reach attention).
* [J] Functional form without weights (``gate_q=gate_k=None``): identity-like
  projections, ``Qp · (max + min + avg)(K) / √D`` — the needle key of a block dominates
  its max (or min) coordinates, so a strong match survives the pooling.
* [J] The diagonal block(s) are always kept: the key blocks that hold the aligned
  positions ``i + Nk - Nq`` of the block's queries (one or two blocks; clamped to the
  keys for cross-attention), so a causal row always sees itself. They count towards
  ``topk``; if they are more than ``topk`` they are all kept.
* [J] ``threshold`` given: keep every visible block whose gate probability is
  ``>= threshold`` (``topk`` is then ignored), plus the diagonal.
* [J] Ties in the top-k are broken by the lower block index, in both programs. The gate
  scores (and probabilities) are computed in float64 from the detached inputs and gate
  weights rounded to float32, then rounded to float32
  (:mod:`attnzoo.kernels.routing_select`), so the reference and the fast form select the
  same blocks.
* [J] Blocks with nothing visible are never selected: a block is visible to a query
  block if it holds a real (unpadded) key that some query of the block may see under
  causality and, with a ``mask``, the mask allows some (query, key) pair of the tile.
  Padded keys leave the k pooling.
* [J] The selection is discrete and is not differentiated (computed under no_grad from
  detached q, k): gradients reach q, k, v through the attention over the kept blocks,
  and the gate weights get none from the output — they are trained by
  :func:`train_gate` (the paper trains the gate alone, by distillation, on a frozen
  model).
* [J] A query's blocks depend on the other queries of its block (average pooling), so
  ``rows_independent=False``.
* [J] Sized for short sequences (``for_length``): blocks of N/8 tokens (at most the
  default 64) and ``topk`` a quarter of the blocks (at least 2, at most the default 8).
* [J] ``stats.report("density", ...)`` counts, per query row, the keys of its kept
  blocks that causality and padding let it see, over the keys they let it see (a dense
  user ``mask`` is not counted; it is applied inside the kept tiles).
* [J] :func:`train_gate` computes the dense attention map (O(N²), training only, like
  the paper's distillation) and reports recall of the gate alone (no forced diagonal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ... import stats
from ...errors import AttentionInputError, fmt_shape
from ...kernels.block_select import expand_layout
from ...kernels.blocksparse import block_indices, block_sparse_attention
from ...kernels.common import repeat_kv
from ...kernels.dense import masked_softmax, softmax_attention
from ...kernels.masking import block_layout, dense_mask
from ...kernels.routing_select import (rank_by_count, rank_by_sort, routed_softmax, selection_input,
                                       selection_scores)
from ...registry import MethodOptions, method

DEFAULT_BLOCK, DEFAULT_TOPK = 64, 8


def _check(block_size, topk, threshold):
    if int(block_size) < 1:
        raise AttentionInputError(f"block_size must be >= 1, got {block_size}")
    if threshold is None and int(topk) < 1:
        raise AttentionInputError(f"topk must be >= 1, got {topk}")
    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:
        raise AttentionInputError(f"threshold must be in [0, 1], got {threshold}")


def _check_weights(gate_q, gate_k, Hq, D):
    if (gate_q is None) != (gate_k is None):
        raise AttentionInputError("gate_q and gate_k must be given together (or both None)")
    if gate_q is None:
        return
    if gate_q.dim() != 3 or gate_q.shape[0] != Hq or gate_q.shape[1] != D:
        raise AttentionInputError(f"gate_q must be (Hq, D, Dg) = ({Hq}, {D}, Dg), got {fmt_shape(gate_q)}")
    if gate_k.dim() != 3 or tuple(gate_k.shape) != (Hq, 3 * D, gate_q.shape[2]):
        raise AttentionInputError(
            f"gate_k must be (Hq, 3·D, Dg) = ({Hq}, {3 * D}, {gate_q.shape[2]}), got {fmt_shape(gate_k)}")


@dataclass(frozen=True)
class SeerOptions(MethodOptions):
    """Options of ``seer``.

    Attributes:
        block_size: tokens per query block and per key block.
        topk: key blocks kept per query block (the diagonal included).
        threshold: keep the blocks of gate probability ``>= threshold`` instead (``topk``
            ignored), or None.
        gate_q, gate_k: the AttnGate's projections ``(Hq, D, Dg)`` and ``(Hq, 3D, Dg)``
            (None: identity-like, see the module docstring).
    """

    block_size: int = DEFAULT_BLOCK
    topk: int = DEFAULT_TOPK
    threshold: Optional[float] = None
    gate_q: Optional[torch.Tensor] = None
    gate_k: Optional[torch.Tensor] = None

    def validate(self) -> None:
        _check(self.block_size, self.topk, self.threshold)
        if (self.gate_q is None) != (self.gate_k is None):
            raise AttentionInputError("gate_q and gate_k must be given together (or both None)")

    @classmethod
    def for_length(cls, n: int) -> dict:
        block = min(DEFAULT_BLOCK, max(2, n // 8))
        topk = min(DEFAULT_TOPK, max(2, -(-n // block) // 4))
        if (block, topk) == (DEFAULT_BLOCK, DEFAULT_TOPK):
            return {}
        return {"block_size": block, "topk": topk}


# ------------------------------------------------------------------------ reference


@method("seer", options=SeerOptions,
        summary="a learnable gate over pooled q/k blocks keeps the top-k key blocks per query block",
        paper="SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs",
        time="O(N K b D + (N/b)^2 D)", memory="O(N K b + (N/b)^2)", rows_independent=False,
        causal_leak="the gate scores key blocks from pooled query blocks, which include queries after the query")
def seer(q, k, v, call):
    """Dense softmax masked by the gate's kept blocks expanded to elements, the gate
    written per block.

    Each key block ``j`` is pooled from its own real keys (max, min, mean; zeros for a
    block with none). Each query block ``i``: its mean query, its score against every key
    block, its visible blocks (a real key some query of the block may see under
    causality, and a tile the mask allows somewhere), its diagonal blocks (those holding
    the aligned positions of its queries) and the blocks it keeps: the diagonal ones,
    then the best others by a directly counted rank (a higher score, or an equal score
    and a lower index, beats a block) up to ``topk`` in all — or, with ``threshold``,
    every visible block of gate probability ``>= threshold``.
    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    o = call.options
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    _check_weights(o.gate_q, o.gate_k, Hq, D)
    G, b = Hq // Hkv, o.block_size
    nqb, nkb = -(-Nq // b), -(-Nk // b)
    offset = Nk - Nq
    real = torch.ones(B, Nk, dtype=torch.bool, device=q.device) if call.key_mask is None else call.key_mask
    user = call.mask
    if user is not None and not isinstance(user, torch.Tensor):
        user = dense_mask(user, B, Hq, Nq, Nk, q.device)
    with torch.no_grad():
        qs, ks = selection_input(q), selection_input(k)
        gq = None if o.gate_q is None else selection_input(o.gate_q)
        gk = None if o.gate_k is None else selection_input(o.gate_k)
        # every key block pooled from its own real keys, projected for each query head
        pk = []
        for j in range(nkb):
            keys = slice(j * b, min((j + 1) * b, Nk))
            r = real[:, keys].view(B, 1, -1, 1)
            kb = ks[:, :, keys]  # (B, Hkv, n_j, D)
            count = r.sum(2)  # (B, 1, 1)
            mx = kb.masked_fill(~r, float("-inf")).amax(2)
            mn = kb.masked_fill(~r, float("inf")).amin(2)
            avg = (kb * r).sum(2) / count.clamp(min=1)
            pooled = torch.cat([mx, mn, avg], dim=-1).masked_fill(count == 0, 0.0)  # (B, Hkv, 3D)
            pooled = pooled.repeat_interleave(G, dim=1)  # the k/v head's pooled block, for each query head
            if gk is None:
                pk.append(pooled[..., :D] + pooled[..., D:2 * D] + pooled[..., 2 * D:])
            else:
                pk.append(torch.einsum("bhf,hfe->bhe", pooled, gk))
        pk = torch.stack(pk, dim=2)  # (B, Hq, nkb, Dg)
        layout = torch.zeros(B, Hq, nqb, nkb, dtype=torch.bool, device=q.device)
        for i in range(nqb):
            rows = range(i * b, min((i + 1) * b, Nq))
            pq = qs[:, :, rows.start:rows.stop].mean(2)  # (B, Hq, D)
            if gq is not None:
                pq = torch.einsum("bhd,hde->bhe", pq, gq)
            score = selection_scores((pk * pq.unsqueeze(2)).sum(-1) / math.sqrt(pq.shape[-1]))  # (B, Hq, nkb)
            last = rows[-1] + offset  # the aligned position of the block's last query
            visible = torch.zeros(B, Hq, nkb, dtype=torch.bool, device=q.device)
            for j in range(nkb):
                keys = range(j * b, min((j + 1) * b, Nk))
                seen = real[:, keys.start:keys.stop]
                if call.causal:
                    seen = seen & (torch.arange(keys.start, keys.stop, device=q.device) <= last)
                ok = seen.any(-1).view(B, 1)
                if user is not None:
                    tile = user[..., rows.start:rows.stop, :][..., keys.start:keys.stop]
                    ok = ok & tile.flatten(-2).any(-1).view(tile.shape[0], tile.shape[1])
                visible[:, :, j] = ok
            diagonal = torch.zeros(nkb, dtype=torch.bool, device=q.device)
            if not (call.causal and last < 0):
                for j in {min(max(r + offset, 0), Nk - 1) // b for r in rows}:
                    diagonal[j] = True
            forced = visible & diagonal
            if o.threshold is None:
                others = visible & ~forced
                slots = o.topk - forced.sum(-1, keepdim=True)  # what the diagonal leaves of topk
                keep = forced | (others & (rank_by_count(score, others) < slots))
            else:
                keep = forced | (visible & (_gate_probabilities(score, visible) >= float(o.threshold)))
            layout[:, :, i] = keep
    allowed = expand_layout(layout, Nq, Nk, b, b)
    return routed_softmax(q, k, v, call, allowed)


def _gate_probabilities(score, visible):
    """The gate's distribution over one query block's visible key blocks, written out:
    ``exp(s - max) / Σ exp(s - max)`` over the visible ones (float64), as float32."""
    s = score.to(torch.float64).masked_fill(~visible, float("-inf"))
    e = torch.exp(s - s.amax(-1, keepdim=True).clamp(min=-1e300)).masked_fill(~visible, 0.0)
    return selection_scores(e / e.sum(-1, keepdim=True).clamp(min=1e-300))


# ------------------------------------------------------------------ the fast selection


def _pad_blocks(x, block, n_blocks):
    n = x.shape[2]
    return F.pad(x, (0, 0, 0, n_blocks * block - n)) if n_blocks * block != n else x


def pool(q, k, *, block, key_mask=None):
    """Pooled blocks: ``qp (B, Hq, nqb, D)`` (average over the real queries) and
    ``kp (B, Hkv, nkb, 3D)`` ([max, min, avg] over the real keys; zeros for a block
    with none), and the real-key count of each key block ``(B, 1, nkb)``."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    nqb, nkb = -(-Nq // block), -(-Nk // block)
    qb = _pad_blocks(q, block, nqb).view(B, Hq, nqb, block, D)
    qcount = (torch.arange(nqb * block, device=q.device) < Nq).view(nqb, block).sum(-1).clamp(min=1)
    qp = qb.sum(3) / qcount.view(1, 1, nqb, 1).to(q.dtype)
    real = torch.arange(nkb * block, device=k.device) < Nk
    real = real.view(1, -1).expand(B, -1)
    if key_mask is not None:
        real = real & F.pad(key_mask, (0, nkb * block - Nk))
    real = real.view(B, 1, nkb, block, 1)
    kb = _pad_blocks(k, block, nkb).view(B, Hkv, nkb, block, D)
    count = real.sum(3)  # (B, 1, nkb, 1)
    has = count > 0
    avg = (kb * real).sum(3) / count.clamp(min=1).to(k.dtype)
    mx = kb.masked_fill(~real, float("-inf")).amax(3).masked_fill(~has, 0.0)
    mn = kb.masked_fill(~real, float("inf")).amin(3).masked_fill(~has, 0.0)
    return qp, torch.cat([mx, mn, avg], dim=-1), count.view(B, 1, nkb)


def block_visibility(B, Hq, Nq, Nk, block, *, causal, key_mask=None, mask=None, device=None):
    """``visible (B', H', nqb, nkb)``: the key blocks that hold a real key (not padded)
    which some query of the block may see under causality, and — with a ``mask`` (dense
    or a mask_mod) — in which the mask allows at least one (query, key) pair of the tile;
    ``forced``: the diagonal blocks (see the module docstring) that are visible. Both
    bool; O(nqb·nkb)."""
    nqb, nkb = -(-Nq // block), -(-Nk // block)
    off = Nk - Nq
    first = torch.arange(nqb, device=device) * block + off
    last = torch.clamp(torch.arange(nqb, device=device) * block + block - 1, max=Nq - 1) + off
    real = torch.ones(1, Nk, device=device) if key_mask is None else key_mask.to(torch.float32)
    cum = F.pad(real.cumsum(-1), (1, 0))  # cum[b, t] = real keys in [0, t)
    start = (torch.arange(nkb, device=device) * block).view(1, nkb)
    end = torch.clamp(start + block, max=Nk)
    if causal:
        end = torch.minimum(end, (last + 1).clamp(0, Nk).view(nqb, 1))
    end = torch.maximum(end, start).expand(nqb, nkb)
    vis = (cum[:, end] - cum[:, start.expand(nqb, nkb)] > 0).view(cum.shape[0], 1, nqb, nkb)
    if mask is not None and not isinstance(mask, torch.Tensor):  # a mask_mod: evaluated one row of tiles at a time
        vis = vis & block_layout(mask, B, Hq, Nq, Nk, block, device)
    elif mask is not None:
        m = mask
        if m.shape[-1] != 1:
            m = F.pad(m, (0, nkb * block - Nk)).view(*m.shape[:-1], nkb, block).any(-1)
        if m.shape[-2] != 1:
            m = F.pad(m.transpose(-1, -2), (0, nqb * block - Nq))
            m = m.view(*m.shape[:-1], nqb, block).any(-1).transpose(-1, -2)
        vis = vis & m
    lo = first.clamp(0, Nk - 1) // block
    hi = last.clamp(0, Nk - 1) // block
    j = torch.arange(nkb, device=device).view(1, -1)
    forced = (j >= lo.view(-1, 1)) & (j <= hi.view(-1, 1))
    if causal:
        forced = forced & (last >= 0).view(-1, 1)
    forced = forced.view(1, 1, nqb, nkb) & vis
    return vis, forced


def gate_logits(q, k, *, block, gate_q=None, gate_k=None, key_mask=None):
    """Gate scores ``(B, Hq, nqb, nkb)`` = ``(Qp Wq)(Kp Wk)ᵀ / √Dg`` (differentiable in the
    gate weights) and the real-key counts of the key blocks ``(B, 1, nkb)``."""
    Hq, D = q.shape[1], q.shape[3]
    qp, kp, count = pool(q, k, block=block, key_mask=key_mask)
    kp = repeat_kv(kp, Hq)
    if gate_q is None:
        pq, pk = qp, kp[..., :D] + kp[..., D:2 * D] + kp[..., 2 * D:]
    else:
        pq = torch.einsum("bhnd,hde->bhne", qp, gate_q.to(qp.dtype))
        pk = torch.einsum("bhnf,hfe->bhne", kp, gate_k.to(kp.dtype))
    return (pq @ pk.transpose(-1, -2)) / math.sqrt(pq.shape[-1]), count


def select_blocks(q, k, *, causal=False, mask=None, key_mask=None, block_size=64, topk=8,
                  threshold=None, gate_q=None, gate_k=None) -> torch.Tensor:
    """The fast form's selection: the kept key blocks, bool ``(B, Hq, nqb, nkb)``, by
    pooled block tensors and one stable sort. Not differentiated."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    block = int(block_size)
    with torch.no_grad():
        logits, _ = gate_logits(selection_input(q), selection_input(k), block=block,
                                gate_q=None if gate_q is None else selection_input(gate_q),
                                gate_k=None if gate_k is None else selection_input(gate_k),
                                key_mask=key_mask)
        logits = selection_scores(logits)
        vis, forced = block_visibility(B, Hq, Nq, Nk, block, causal=causal, key_mask=key_mask,
                                       mask=mask, device=q.device)
        vis, forced = vis.expand_as(logits), forced.expand_as(logits)
        if threshold is not None:
            probs = selection_scores(masked_softmax(logits.to(torch.float64), vis))
            keep = (probs >= float(threshold)) & vis
        else:
            s = logits.masked_fill(~vis, float("-inf")).masked_fill(forced, float("inf"))
            keep = (rank_by_sort(s) < int(topk)) & vis
        return keep | forced


def density(idx, valid, *, block, Nq, Nk, causal, key_mask=None) -> float:
    """Mean over query rows (with something visible) of (keys in the kept blocks that the
    row may see under causality and padding) / (keys it may see). O(N·K) work."""
    nqb = idx.shape[2]
    B = 1 if key_mask is None else key_mask.shape[0]
    real = torch.ones(B, Nk, dtype=torch.float64, device=idx.device)
    if key_mask is not None:
        real = key_mask.to(torch.float64)
    cum = F.pad(real.cumsum(-1), (1, 0))  # cum[b, t] = real keys in [0, t)
    bi = torch.arange(B, device=idx.device).view(-1, 1, 1, 1, 1)
    pos = torch.arange(nqb * block, device=idx.device).view(1, 1, nqb, block, 1) + (Nk - Nq)
    start = (idx * block).clamp(max=Nk).unsqueeze(-2)  # (B', H', nqb, 1, K)
    end = ((idx + 1) * block).clamp(max=Nk).unsqueeze(-2)
    if causal:
        end = torch.minimum(end, (pos + 1).clamp(0, Nk))
    end = torch.maximum(end, start)
    attended = ((cum[bi, end] - cum[bi, start]) * valid.unsqueeze(-2).to(torch.float64)).sum(-1)
    vis_end = (pos + 1).clamp(0, Nk) if causal else torch.full_like(pos, Nk)
    visible = cum[bi, vis_end].squeeze(-1)  # (B, 1, nqb, block)
    rows = (torch.arange(nqb * block, device=idx.device) < Nq).view(1, 1, nqb, block)
    ok = rows & (visible > 0)
    ratio = attended / visible.clamp(min=1)
    ok = ok.expand_as(ratio)
    return float(ratio[ok].mean()) if bool(ok.any()) else 0.0


@seer.impl("block", description="block-sparse kernel over the gate's kept blocks, O(N·K·block)")
def block_attention(q, k, v, call):
    """The block-sparse kernel over the gate's kept blocks only."""
    o = call.options
    _check_weights(o.gate_q, o.gate_k, q.shape[1], q.shape[3])
    Nq, Nk = q.shape[2], k.shape[2]
    block = o.block_size
    layout = select_blocks(q, k, causal=call.causal, mask=call.mask, key_mask=call.key_mask,
                           block_size=block, topk=o.topk, threshold=o.threshold, gate_q=o.gate_q, gate_k=o.gate_k)
    idx, valid = block_indices(layout)
    if stats.active():
        stats.report("density", density(idx, valid, block=block, Nq=Nq, Nk=Nk, causal=call.causal,
                                        key_mask=call.key_mask))
    return block_sparse_attention(q, k, v, idx=idx, valid=valid, block=block, scale=call.scale, causal=call.causal,
                                  mask=call.mask, key_mask=call.key_mask)


# --------------------------------------------------------------------------- module


@seer.module_class
class SeerAttention(torch.nn.Module):
    """SeerAttention with its learnable AttnGate (``gate_q (Hq, D, Dg)``, ``gate_k (Hq, 3D, Dg)``).

    Call it like the functional form: ``module(q, k, v, causal=..., key_mask=...)``.
    Train the gate with :func:`train_gate`. [J] Initialised like ``nn.Linear``
    (uniform ±1/√fan_in): an untrained gate is a random one.
    """

    def __init__(self, heads: int, head_dim: int, kv_heads: Optional[int] = None, v_dim: Optional[int] = None,
                 impl: str = "auto", block_size: int = DEFAULT_BLOCK, gate_dim: int = 32, topk: int = DEFAULT_TOPK,
                 threshold: Optional[float] = None):
        super().__init__()
        _check(block_size, topk, threshold)
        self.heads, self.kv_heads, self.impl = heads, kv_heads or heads, impl
        self.block_size, self.topk, self.threshold = int(block_size), int(topk), threshold
        bq, bk = 1 / math.sqrt(head_dim), 1 / math.sqrt(3 * head_dim)
        self.gate_q = torch.nn.Parameter(torch.empty(heads, head_dim, gate_dim).uniform_(-bq, bq))
        self.gate_k = torch.nn.Parameter(torch.empty(heads, 3 * head_dim, gate_dim).uniform_(-bk, bk))

    def forward(self, q, k, v, **kwargs):
        kwargs.setdefault("impl", self.impl)
        kwargs.setdefault("block_size", self.block_size)
        kwargs.setdefault("topk", self.topk)
        kwargs.setdefault("threshold", self.threshold)
        return seer(q, k, v, gate_q=self.gate_q, gate_k=self.gate_k, **kwargs)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, block_size={self.block_size}, "
                f"gate_dim={self.gate_q.shape[2]}, topk={self.topk}, threshold={self.threshold}")


# ------------------------------------------------------------------------- training


def block_target(q, k, *, block, causal=True, key_mask=None, scale=None):
    """The distillation target ``(B, Hq, nqb, nkb)``: the dense attention map max-pooled
    to blocks and row-normalised (dense: training is O(N²), as in the paper)."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    nqb, nkb = -(-Nq // block), -(-Nk // block)
    v = torch.zeros(B, k.shape[1], Nk, 1, dtype=q.dtype, device=q.device)
    w = softmax_attention(q, k, v, scale=q.shape[-1] ** -0.5 if scale is None else float(scale), causal=causal,
                          key_mask=key_mask, return_weights=True)[1]
    wp = F.pad(w, (0, nkb * block - Nk, 0, nqb * block - Nq)).view(B, Hq, nqb, block, nkb, block).amax((3, 5))
    return wp / wp.sum(-1, keepdim=True).clamp(min=1e-30), w


def train_gate(module: SeerAttention, q, k, *, steps: int = 200, lr: float = 0.01, sparsity: float = 0.9,
               causal: bool = True, key_mask=None) -> dict:
    """Self-distillation of the gate: minimise ``KL(target || gate)`` with Adam, where the
    target is :func:`block_target` and ``gate = softmax`` of :func:`gate_logits` over the
    visible key blocks. ``key_mask``: ``(B, Nk)`` bool, True = real key, or None.

    Returns ``{"recall", "recall_before", "losses"}``: recall is the fraction of the true
    (dense) attention mass inside the blocks the gate keeps at ``sparsity`` — each query
    block keeps its ``ceil((1 - sparsity) · visible)`` best blocks (at least one) by gate
    score, [J] the gate alone, without the forced diagonal — averaged over query rows.
    """
    block = module.block_size
    q, k = q.detach().float(), k.detach().float()
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    with torch.no_grad():
        target, weights = block_target(q, k, block=block, causal=causal, key_mask=key_mask)
    vis, _ = block_visibility(B, Hq, Nq, Nk, block, causal=causal, key_mask=key_mask, device=q.device)

    def current_logits():
        return gate_logits(q, k, block=block, gate_q=module.gate_q, gate_k=module.gate_k,
                           key_mask=key_mask)[0]

    def recall() -> float:
        with torch.no_grad():
            logits = current_logits()
            visx = vis.expand_as(logits)
            n_vis = visx.sum(-1, keepdim=True)
            keep_n = torch.ceil((1 - float(sparsity)) * n_vis).clamp(min=1)
            keep = (rank_by_sort(logits.masked_fill(~visx, float("-inf"))) < keep_n) & visx
            mass = (weights * expand_layout(keep, Nq, Nk, block, block)).sum(-1)
            rows = weights.sum(-1) > 0
            return float(mass[rows].mean())

    before = recall()
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    for _ in range(int(steps)):
        opt.zero_grad()
        logits = current_logits()
        logp = torch.log_softmax(logits.masked_fill(~vis, float("-inf")), dim=-1)
        t = target
        loss = (t * (torch.log(t.clamp(min=1e-30)) - logp.masked_fill(t == 0, 0.0))).sum(-1).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {"recall": recall(), "recall_before": before, "losses": losses}
