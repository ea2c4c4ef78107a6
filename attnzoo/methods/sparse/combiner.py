"""Combiner (fixed, mean-pooled summaries): full-support attention at sparse cost.

    keys are cut into blocks of ``s`` positions; block b has members Ω_b, n_b real keys,
        k̄_b = mean_{j∈Ω_b} k_j,   v̄_b = mean_{j∈Ω_b} v_j
    query i (aligned position i' = i + Nk - Nq, own block o_i = i' // s):
        direct:  keys j ∈ Ω_{o_i}            (causal: only j <= i')         logit  q·k_j · scale
        distant: summaries of blocks b ≠ o_i (causal: only b < o_i)          logit  q·k̄_b · scale + log n_b
        out_i = one softmax over {direct keys} ∪ {distant summaries} applied to {v_j} ∪ {v̄_b}

"Combiner: Full Attention Transformer with Sparse Computation Cost" (Ren et al.,
NeurIPS 2021) writes full attention as a conditional expectation: a query attends
directly to its local region and, for every other region Ω_b, to Ω_b as a whole with
probability mass p(Ω_b | i) and then within it by a query-independent distribution
p(j | Ω_b). Every key is reachable (full attention support, in contrast to purely
local / block-sparse patterns), yet each query handles only ``s + N/s`` items: time
O(N (s + N/s) D) = O(N √N D) with ``s = round(√Nk)`` (``block_size=None``), memory
O(N (s + N/s)).

Judgement calls (the paper leaves a family of choices):
  [J] Combiner-Fixed with a parameter-free within-block distribution: p(j | Ω_b) is
      uniform over the block's real keys, so the summary value is ``v̄_b = mean v``.
      The region's abstraction key is the mean of its keys, ``k̄_b = mean k`` (the
      paper's max/mean-pooling "Fixed" variant; no learnable pooling weights), so the
      method has no parameters.
  [J] The summary logit is ``scale·q·k̄_b + log n_b``: a block summary stands for the
      mass of its ``n_b`` members (with all keys of a block equal it reproduces exact
      softmax over them).
  [J] Blocks are over key positions; a query's own block is that of its lower-right
      aligned position ``i' = i + Nk - Nq`` (DESIGN.md). Causal: direct keys are its
      block up to itself, summaries only for blocks that end before its block starts
      (so decoding needs only completed blocks' summaries). Noncausal: its whole block
      directly and every other block through its summary; a noncausal-cross query whose
      aligned position is negative (Nq > Nk) takes block 0 as its own block. Because a
      row's pattern depends on i', ``rows_independent=False`` (like sliding windows).
  [J] Key padding: padded keys are neither attended directly nor pooled; ``n_b`` counts
      the real keys and a block without real keys has no summary. No dense ``mask``
      (``masks=False``): a summary cannot honour a per-key mask of an arbitrary query.
  [J] Decoding needs a block size fixed before the length is known: ``block_size`` or
      ``max_len`` (then ``s = round(√max_len)``) must be given to ``init_state``.

The reference is the factorisation written per block: for each key block ``o``, the
queries whose own block it is get one softmax over ``o``'s keys and the other blocks'
summaries (pooled block by block); it returns as weights the equivalent dense
``Nq × Nk`` matrix (a summary's probability spread uniformly over its real members).
The fast form ``block`` appends the summaries as extra "keys" (an extra channel carries
``log n_b / scale``) and runs the block-sparse kernel
(:func:`attnzoo.kernels.blocksparse.block_sparse_attention`) over each query block's own
key block(s) plus the summary blocks: never N×N. Decoding keeps the running sums of the
current block, its keys/values, and the completed blocks' summaries: memory O(s + N/s),
work per token O(s + N/s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ... import stats
from ...errors import AttentionInputError
from ...kernels.block_select import block_means, num_blocks
from ...kernels.blocksparse import block_indices, block_sparse_attention
from ...kernels.caches import Decoder
from ...kernels.common import compute_dtype, repeat_kv
from ...kernels.dense import masked_softmax
from ...registry import MethodOptions, method


@dataclass(frozen=True)
class CombinerOptions(MethodOptions):
    """Options of ``combiner``.

    Attributes:
        block_size: the block (and local region) size ``s``; None (default) for
            ``round(√Nk)``, which balances the ``s`` direct keys and ``Nk/s`` summaries.
    """

    block_size: Optional[int] = None

    def validate(self) -> None:
        if self.block_size is not None and self.block_size < 1:
            raise AttentionInputError(
                f"block_size must be a positive int or None (round(sqrt(Nk))), got {self.block_size!r}")

    @classmethod
    def for_length(cls, n: int) -> dict:
        # the default block round(sqrt(N)) at every length (full support, O(N^1.5)), made
        # explicit so that decoding, which cannot see the final length, uses the same one
        return {"block_size": max(1, round(math.sqrt(n)))}


def resolve_block(block_size: Optional[int], kv_len: int) -> int:
    """The block size: the given one, or ``round(√Nk)`` (at least 1)."""
    return max(1, round(math.sqrt(kv_len))) if block_size is None else int(block_size)


def own_blocks(q_len: int, kv_len: int, s: int, device=None) -> torch.Tensor:
    """Each query's own block ``(Nq,)``: that of its aligned position ``i + Nk - Nq``,
    clamped into ``[0, nb - 1]`` (only matters for negative positions, see [J])."""
    nb = num_blocks(kv_len, s)
    pos = torch.arange(q_len, device=device) + (kv_len - q_len)
    return torch.div(pos, s, rounding_mode="floor").clamp(0, nb - 1)


# ----------------------------------------------------------------------------- reference


@method("combiner", options=CombinerOptions,
        summary="direct attention in the own block + one mean-pooled summary per distant block (full support)",
        paper="Combiner: Full Attention Transformer with Sparse Computation Cost",
        exact=False, time="O(N (s + N/s) D) = O(N^1.5 D)", memory="O(N (s + N/s))", masks=False,
        rows_independent=False)  # a row's own block depends on its aligned position i + Nk - Nq
def combiner(q, k, v, call):
    """The factorised attention written per block: the summaries pooled one block at a
    time, then for each key block ``o`` one softmax of the queries whose own block is
    ``o`` over ``o``'s keys (explicit scores) and the distant blocks' summaries.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv);
    with ``return_weights`` also the equivalent dense ``(B, Hq, Nq, Nk)`` weights.
    """
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    s = resolve_block(call.options.block_size, Nk)
    nb = num_blocks(Nk, s)
    scale, causal = call.scale, call.causal
    ct = compute_dtype(q.dtype)
    qc, kc, vc = q.to(ct), repeat_kv(k, Hq).to(ct), repeat_kv(v, Hq).to(ct)
    real = torch.ones(B, Nk, dtype=torch.bool, device=q.device) if call.key_mask is None else call.key_mask

    # the abstraction of each region: mean key and value over its real keys, and their number
    members = [slice(b * s, min(Nk, (b + 1) * s)) for b in range(nb)]
    kbar, vbar, count = [], [], []
    for sl in members:
        w = real[:, sl].to(ct)  # (B, m)
        n = w.sum(-1)  # (B,)
        kbar.append((kc[:, :, sl] * w.view(B, 1, -1, 1)).sum(2) / n.clamp(min=1).view(B, 1, 1))
        vbar.append((vc[:, :, sl] * w.view(B, 1, -1, 1)).sum(2) / n.clamp(min=1).view(B, 1, 1))
        count.append(n)

    pos = torch.arange(Nq, device=q.device) + (Nk - Nq)
    own = own_blocks(Nq, Nk, s, q.device)
    outs, weight_rows = [], []
    for o in range(nb):
        rows = torch.nonzero(own == o).flatten()
        if rows.numel() == 0:
            continue
        r0, r1 = int(rows[0]), int(rows[-1]) + 1  # a query block's rows are consecutive
        qo, po = qc[:, :, r0:r1], pos[r0:r1].view(-1, 1)
        sl = members[o]
        # direct: the own block's keys (causal: up to the query itself)
        direct = (qo @ kc[:, :, sl].transpose(-1, -2)) * scale  # (B, Hq, R, m)
        j = torch.arange(sl.start, sl.stop, device=q.device).view(1, -1)
        ok_direct = real[:, sl].view(B, 1, 1, -1) & ((j <= po) if causal else (j >= 0))
        # distant: one summary per other block (causal: the earlier blocks), if it has real keys
        others = [b for b in range(nb) if (b < o if causal else b != o)]
        logits, allowed = [direct], [ok_direct.expand(B, 1, r1 - r0, -1)]
        if others:
            kb = torch.stack([kbar[b] for b in others], dim=2)  # (B, Hq, nO, D)
            nbk = torch.stack([count[b] for b in others], dim=1)  # (B, nO)
            logits.append((qo @ kb.transpose(-1, -2)) * scale + nbk.clamp(min=1).log().view(B, 1, 1, -1))
            allowed.append((nbk > 0).view(B, 1, 1, -1).expand(B, 1, r1 - r0, -1))
        p = masked_softmax(torch.cat(logits, dim=-1), torch.cat(allowed, dim=-1))
        m = sl.stop - sl.start
        p_direct, p_summ = p[..., :m], p[..., m:]
        out = p_direct @ vc[:, :, sl]
        if others:
            out = out + p_summ @ torch.stack([vbar[b] for b in others], dim=2)
        outs.append(out)
        if call.return_weights:  # a summary's mass spread uniformly over its block's real keys
            w = qc.new_zeros(B, Hq, r1 - r0, Nk)
            w[..., sl] = p_direct
            for x, b in enumerate(others):
                spread = real[:, members[b]].to(ct) / count[b].clamp(min=1).view(B, 1)  # (B, m_b)
                w[..., members[b]] = p_summ[..., x:x + 1] * spread.view(B, 1, 1, -1)
            weight_rows.append(w)
    out = torch.cat(outs, dim=2).to(q.dtype)
    if not call.return_weights:
        return out
    return out, torch.cat(weight_rows, dim=2).to(q.dtype)


# ----------------------------------------------------------------------------- block


def _density(causal, Nq, Nk, s, key_mask, count, device) -> float:
    """Mean over queries (with any visible key) of (direct keys + summaries) / visible keys,
    from O(B·N) prefix counts."""
    B = count.shape[0]
    nb = count.shape[1]
    f64 = torch.float64
    real = torch.ones(B, Nk, device=device, dtype=f64) if key_mask is None else key_mask.to(f64)
    cum = F.pad(real.cumsum(1), (1, 0))  # cum[:, j] = real keys before j
    own = own_blocks(Nq, Nk, s, device)
    pos = torch.arange(Nq, device=device) + (Nk - Nq)
    start = own * s
    nonempty = (count > 0).to(f64)
    csum = F.pad(nonempty.cumsum(1), (1, 0))  # non-empty blocks before b
    if causal:
        end = (pos + 1).clamp(0, Nk)
        direct = (cum[:, end] - cum[:, start.clamp(max=Nk)]).clamp(min=0)
        summ = csum[:, own]
        visible = cum[:, end]
    else:
        end = ((own + 1) * s).clamp(max=Nk)
        direct = cum[:, end] - cum[:, start]
        summ = csum[:, nb:nb + 1] - nonempty[:, own]
        visible = cum[:, Nk:Nk + 1].expand(B, Nq)
    ok = visible > 0
    if not bool(ok.any()):
        return 0.0
    return float(((direct + summ) / visible.clamp(min=1))[ok].mean())


def block_layout(causal: bool, q_len: int, kv_len: int, s: int, device=None) -> torch.Tensor:
    """The fast form's selection: ``(1, nqb, nb + ns)`` bool, for each query block of
    ``s`` rows the key blocks of its queries' own blocks, then the blocks of summaries
    (``ns = ceil(nb / s)`` blocks of ``s`` summaries) it needs."""
    nb = num_blocks(kv_len, s)
    ns = num_blocks(nb, s)
    off = kv_len - q_len
    nqb = num_blocks(q_len, s)
    first = torch.arange(nqb, device=device) * s
    last = (first + s - 1).clamp(max=q_len - 1)
    lo = torch.div(first + off, s, rounding_mode="floor").clamp(0, nb - 1)
    hi = torch.div(last + off, s, rounding_mode="floor").clamp(0, nb - 1)
    kb = torch.arange(nb, device=device).view(1, -1)
    key_lay = (kb >= lo.view(-1, 1)) & (kb <= hi.view(-1, 1))
    sb_first = torch.arange(ns, device=device).view(1, -1) * s
    if causal:
        key_lay = key_lay & (last + off >= 0).view(-1, 1)
        summ_lay = sb_first < hi.view(-1, 1)  # some summary b < own block
    else:
        summ_lay = torch.ones(nqb, ns, dtype=torch.bool, device=device)
    return torch.cat([key_lay, summ_lay], dim=1).unsqueeze(0)


def _block_supports(call) -> Optional[str]:
    if call.scale == 0:
        return "it needs a nonzero scale (the summaries' log-count bias rides on an extra channel divided by it)"
    return None


@combiner.impl("block", supports=_block_supports,
               description="summaries as extra keys; block-sparse kernel over own block + summaries, O(N√N)")
def block_attention(q, k, v, call):
    """The summaries appended as extra keys; the block-sparse kernel over each query
    block's own key block(s) and the summary blocks. O(N (s + N/s)) time and memory."""
    B, _, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    s = resolve_block(call.options.block_size, Nk)
    scale, causal, key_mask = call.scale, call.causal, call.key_mask
    ct = compute_dtype(q.dtype)
    qc, kc, vc = q.to(ct), k.to(ct), v.to(ct)
    nb = num_blocks(Nk, s)
    ns = num_blocks(nb, s)  # blocks of summaries
    kbar, count = block_means(kc, key_mask, s)
    vbar, _ = block_means(vc, key_mask, s)
    # an extra channel carries the summaries' log-count bias: scale * (q·k̄ + 1·log(n)/scale)
    pad = nb * s - Nk
    k_keys = F.pad(kc, (0, 1, 0, pad))
    logn = (count.clamp(min=1).log() / scale).view(B, 1, nb, 1).expand(B, Hkv, nb, 1)
    k_summ = F.pad(torch.cat([kbar, logn], dim=-1), (0, 0, 0, ns * s - nb))
    k_ext = torch.cat([k_keys, k_summ], dim=2)
    v_ext = torch.cat([F.pad(vc, (0, 0, 0, pad)), F.pad(vbar, (0, 0, 0, ns * s - nb))], dim=2)
    q_ext = F.pad(qc, (0, 1), value=1.0)
    real = torch.ones(B, Nk, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    kpm_ext = torch.cat([F.pad(real, (0, pad)), F.pad(count > 0, (0, ns * s - nb))], dim=1)
    off, keys_end = Nk - Nq, nb * s

    # layout: query block i -> the key blocks of its queries' own blocks, and the summary blocks
    idx, valid = block_indices(block_layout(causal, Nq, Nk, s, q.device))

    def element(b, h, qp, kp):
        pos = qp + off
        own = torch.div(pos, s, rounding_mode="floor").clamp(0, nb - 1)
        is_key = kp < keys_end
        direct = is_key & (torch.div(kp, s, rounding_mode="floor") == own) & (kp < Nk)
        sb = kp - keys_end
        if causal:
            direct = direct & (kp <= pos)
            summ = (~is_key) & (sb < own)
        else:
            summ = (~is_key) & (sb < nb) & (sb != own)
        return direct | summ

    if stats.active():
        stats.report("density", _density(causal, Nq, Nk, s, key_mask, count, q.device))
    out = block_sparse_attention(q_ext, k_ext, v_ext, idx=idx, valid=valid, block=s, scale=scale, causal=False,
                                 key_mask=kpm_ext, element_mask=element)
    return out.to(q.dtype)


# ------------------------------------------------------------------------- decoding


class CombinerState:
    """Completed blocks' summaries (sums and counts) and the current block's keys/values:
    O(s + N/s) per sequence and head, never the whole history."""

    def __init__(self, batch, kv_heads, head_dim, v_dim, block, dtype, device):
        ct = compute_dtype(dtype)
        self.block, self.dtype = int(block), dtype
        self.kbar = torch.zeros(batch, kv_heads, 0, head_dim, dtype=ct, device=device)
        self.vbar = torch.zeros(batch, kv_heads, 0, v_dim, dtype=ct, device=device)
        self.k = torch.zeros(batch, kv_heads, 0, head_dim, dtype=ct, device=device)  # current block
        self.v = torch.zeros(batch, kv_heads, 0, v_dim, dtype=ct, device=device)
        self.length = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.kbar, self.vbar, self.k, self.v))


@combiner.decodes
class CombinerDecoder(Decoder):
    """The current block's keys and values plus one summary per completed block; each
    step attends the new queries (causally) over the current block so far and the
    completed blocks' summaries. A block's summary is made when it fills."""

    state_size = "current block + one summary per completed block: (s + N/s)·2·Hkv·D per sequence"

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, options):
        block_size = options.block_size
        if block_size is None:
            if max_len is None:
                raise AttentionInputError(
                    "combiner decoding needs a fixed block size: pass block_size= (or max_len=, then "
                    "round(sqrt(max_len)))")
            block_size = resolve_block(None, int(max_len))
        return CombinerState(batch_size, kv_heads, head_dim, v_dim, block_size, dtype, device)

    def step(self, run, state, q, k, v, *, scale, impl, options):
        block_size = options.block_size
        if block_size is not None and int(block_size) != state.block:
            raise AttentionInputError(f"block_size={block_size} differs from the state's block size {state.block}")
        s, ct = state.block, state.kbar.dtype
        Hq = q.shape[1]
        outs, t0, T = [], 0, q.shape[2]
        while t0 < T:
            take = min(T - t0, s - state.k.shape[2])  # new tokens that stay in the current block
            qc = q[:, :, t0:t0 + take].to(ct)
            state.k = torch.cat([state.k, k[:, :, t0:t0 + take].to(ct)], dim=2)
            state.v = torch.cat([state.v, v[:, :, t0:t0 + take].to(ct)], dim=2)
            m, nb = state.k.shape[2], state.kbar.shape[2]
            keys = repeat_kv(torch.cat([state.k, state.kbar], dim=2), Hq)
            values = repeat_kv(torch.cat([state.v, state.vbar], dim=2), Hq)
            bias = torch.cat([torch.zeros(m, dtype=ct, device=q.device),
                              torch.full((nb,), math.log(s), dtype=ct, device=q.device)])
            logits = (qc @ keys.transpose(-1, -2)) * scale + bias
            qpos = torch.arange(m - take, m, device=q.device).view(-1, 1)
            allowed = torch.cat([torch.arange(m, device=q.device).view(1, -1) <= qpos,
                                 torch.ones(take, nb, dtype=torch.bool, device=q.device)], dim=1)
            outs.append((masked_softmax(logits, allowed) @ values).to(q.dtype))
            if m == s:  # the block is complete: keep only its summary
                state.kbar = torch.cat([state.kbar, state.k.sum(2, keepdim=True) / s], dim=2)
                state.vbar = torch.cat([state.vbar, state.v.sum(2, keepdim=True) / s], dim=2)
                state.k, state.v = state.k[:, :, :0], state.v[:, :, :0]
            state.length += take
            t0 += take
        return torch.cat(outs, dim=2)
