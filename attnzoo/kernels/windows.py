"""What the window methods share: analytic block layouts of sliding and dilated windows,
and the ways to run softmax attention restricted to a pattern (dense, block-sparse,
FlexAttention, bands of contiguous keys).

A *pattern* is a method's own mask_mod (a window, a dilated window, a neighbourhood).
It is combined by AND with the call's causal structure, dense mask or mask_mod and key
mask; rows with nothing visible give zeros.

* :func:`pattern_reference` — dense masked softmax with the pattern evaluated on the
  ``Nq × Nk`` grid (the references: O(N²));
* :func:`pattern_blocks` — the block-sparse kernel (:mod:`attnzoo.kernels.blocksparse`)
  over a block layout, with the pattern as its element mask: O(N·K·block);
* :func:`pattern_flex` — FlexAttention with the pattern as a (cached) block mask;
* :func:`band_attention` — chunks of query rows, each over the few contiguous key ranges
  its pattern can reach (a window, sinks): no gathers, no data-dependent shapes, so it
  also traces under ``torch.compile(fullgraph=True)``: O(N·(w + rows)).

The layouts (:func:`window_layout`, :func:`dilated_layout`) are computed from the block
bounds only, never from an element-level ``Nq × Nk`` evaluation, and are exact: they
equal :func:`attnzoo.kernels.masking.block_layout` of the pattern.
"""

from __future__ import annotations

from typing import Union

import torch

from .blocksparse import block_indices, block_sparse_attention
from .common import BLOCK_ELEMENTS, compute_dtype
from .dense import masked_softmax, softmax_attention
from .flex import flex_attention
from .masking import dense_mask, group_mask
from .segmented import segmented


def _bounds(q_len: int, kv_len: int, block: int, device):
    """Aligned positions ``[qf, ql]`` of each query block ``(1, nqb, 1)`` and positions
    ``[kf, kl]`` of each key block ``(1, 1, nkb)``."""
    nqb, nkb = -(-q_len // block), -(-kv_len // block)
    off = kv_len - q_len
    qf = torch.arange(nqb, device=device) * block + off  # aligned position of each block's first query
    ql = torch.clamp(qf + block - 1, max=q_len - 1 + off)
    kf = torch.arange(nkb, device=device) * block
    kl = torch.clamp(kf + block - 1, max=kv_len - 1)
    return qf.view(1, -1, 1), ql.view(1, -1, 1), kf.view(1, 1, -1), kl.view(1, 1, -1)


def window_layout(q_len: int, kv_len: int, block: int, spans: Union[int, torch.Tensor], sinks: int, causal: bool,
                  device=None) -> torch.Tensor:
    """Block layout ``(H, nqb, nkb)`` of sliding windows of ``spans`` keys (an int, H = 1,
    or one per head, ``(H,)``) plus ``sinks`` initial keys, from the block bounds only.

    Causal: query ``i`` sees ``i' - w < j <= i'`` (``i' = i + Nk - Nq``) or ``j < sinks``
    with ``j <= i'``; noncausal: ``|j - i'| <= w // 2`` or ``j < sinks``. For a query block
    ``[qf, ql]`` (aligned) and a key block ``[kf, kl]`` the differences ``d = i' - j`` fill
    ``[qf - kl, ql - kf]``; the block is touched iff that range meets the window's.
    """
    qf, ql, kf, kl = _bounds(q_len, kv_len, block, device)
    w = torch.as_tensor(spans, device=device, dtype=torch.long).reshape(-1, 1, 1)
    if causal:  # need 0 <= d < w
        layout = (qf - kl).clamp(min=0) <= torch.minimum(ql - kf, w - 1)
        if sinks:
            layout = layout | ((kf < sinks) & (kf <= ql))
    else:  # need |d| <= w // 2
        layout = torch.maximum(qf - kl, -(w // 2)) <= torch.minimum(ql - kf, w // 2)
        if sinks:
            layout = layout | (kf < sinks)
    return layout


def dilated_layout(q_len: int, kv_len: int, block: int, window: int, rates: torch.Tensor, causal: bool,
                   device=None) -> torch.Tensor:
    """Block layout ``(H, nqb, nkb)`` of the dilated window for per-head dilations ``rates
    (H,)``, from the block bounds only (no element-level N×N evaluation).

    For a query block with aligned positions ``[qf, ql]`` and a key block ``[kf, kl]`` the
    differences ``d = i' - j`` fill the integer range ``[qf - kl, ql - kf]``; the block is
    touched iff that range holds a multiple ``r·t`` of the head's dilation with ``t`` in
    the window (``0 <= t < w`` causal, ``|t| <= w // 2`` noncausal). This is exact: it
    equals :func:`attnzoo.kernels.masking.block_layout` of the mask_mod.
    """
    qf, ql, kf, kl = _bounds(q_len, kv_len, block, device)
    r = rates.to(device=device, dtype=torch.long).view(-1, 1, 1)
    if causal:
        lo = (qf - kl).clamp(min=0)
        hi = torch.minimum(ql - kf, r * (window - 1))
    else:
        reach = r * (window // 2)
        lo = torch.maximum(qf - kl, -reach)
        hi = torch.minimum(ql - kf, reach)
    first_multiple = -torch.div(-lo, r, rounding_mode="floor") * r  # smallest multiple of r >= lo
    return first_multiple <= hi


def one_if_shared(values: torch.Tensor) -> torch.Tensor:
    """``values[:1]`` when every head has the same value (one shared layout), else ``values``."""
    return values[:1] if bool((values == values[0]).all()) else values


# ------------------------------------------------------------------ attention over a pattern


def pattern_reference(q, k, v, call, pattern):
    """Dense softmax attention masked by ``pattern`` (a mask_mod or a bool tensor
    broadcastable to ``(B, Hq, Nq, Nk)``) and the call's causal structure, mask, key mask
    and score_mod. q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv)."""
    B, Hq, Nq, Nk = call.batch, call.q_heads, call.q_len, call.kv_len
    allowed = pattern if isinstance(pattern, torch.Tensor) else dense_mask(pattern, B, Hq, Nq, Nk, q.device)
    if call.mask is not None:
        user = call.mask if isinstance(call.mask, torch.Tensor) else dense_mask(call.mask, B, Hq, Nq, Nk, q.device)
        allowed = allowed & user
    return softmax_attention(q, k, v, scale=call.scale, causal=call.causal, mask=allowed, key_mask=call.key_mask,
                             score_mod=call.score_mod, dropout_p=call.dropout_p, return_weights=call.return_weights)


def pattern_blocks(q, k, v, call, layout: torch.Tensor, block: int, pattern=None):
    """The block-sparse kernel over ``layout`` (``(1 or Hq, nqb, nkb)`` bool) with
    ``pattern`` (a mask_mod, or None) as the element mask inside the kept tiles."""
    idx, valid = block_indices(layout)
    return block_sparse_attention(q, k, v, idx=idx, valid=valid, block=int(block), scale=call.scale,
                                  causal=call.causal, mask=call.mask, key_mask=call.key_mask, element_mask=pattern,
                                  score_mod=call.score_mod)


def pattern_flex(q, k, v, call, pattern):
    """FlexAttention with ``pattern`` as its block mask (cached when the pattern has a
    ``cache_key``), combined with the call's mask, key mask and score_mod."""
    return flex_attention(q, k, v, scale=call.scale, causal=call.causal, mask=call.mask, key_mask=call.key_mask,
                          score_mod=call.score_mod, pattern=pattern)


def _static_band_chunk(q, pattern, causal, offset, scale, positions, B, Hkv, G, D, ct):
    """The chunk function of :func:`band_attention` when only the pattern (and causality)
    masks: the pattern then depends on positions alone, so the additive mask of a chunk
    depends on its shape and its keys' place relative to its queries — the same for every
    chunk inside the sequence. It is built once per geometry and fused into the score
    GEMM (``baddbmm``): score, softmax and the value GEMM are the only passes left."""
    biases: dict = {}

    def bias_of(qs, qe, kpos, keys):
        n, m = qe - qs, kpos.numel()
        # contiguous keys (a slice): the geometry is (rows, keys, where they start); else per chunk
        key = (n, m, keys.start - qs) if isinstance(keys, slice) else (qs, n, m)
        hit = biases.get(key)
        if hit is None:
            qpos = torch.arange(qs, qe, device=q.device).view(-1, 1)
            ok = pattern(0, 0, qpos, kpos.view(1, -1))
            if causal:
                ok = ok & (kpos.view(1, -1) <= qpos + offset)
            ok = torch.as_tensor(ok, device=q.device).expand(n, m)
            dead = ~ok.any(dim=-1)  # rows that see no key: zeros, not NaN (their bias stays 0: finite gradients)
            bias = torch.zeros(n, m, dtype=ct, device=q.device).masked_fill(~ok & ~dead.view(-1, 1), float("-inf"))
            # under torch.compile the emptiness of a row is not asked (data-dependent): always masked
            any_dead = True if torch.compiler.is_compiling() else bool(dead.any())
            hit = (bias.repeat(G, 1).unsqueeze(0), dead.repeat(G).view(1, G * n, 1) if any_dead else None)
            if not torch.compiler.is_compiling():
                biases[key] = hit
        return hit

    def chunk(qb, kb, vb, item):
        qs, qe, keys = item
        kpos = positions[qs]
        n, m = qe - qs, kpos.numel()
        bias, dead = bias_of(qs, qe, kpos, keys)
        qg = qb.to(ct).reshape(B * Hkv, G * n, D)
        kg = kb.to(ct).reshape(B * Hkv, m, D)
        s = torch.baddbmm(bias, qg, kg.transpose(-1, -2), alpha=scale)
        p = torch.softmax(s, dim=-1)
        if dead is not None:
            p = p.masked_fill(dead, 0.0)
        out = p @ vb.to(ct).reshape(B * Hkv, m, -1)
        return out.reshape(B, Hkv * G, n, -1).to(q.dtype)

    return chunk


def band_rows(batch: int, heads: int, reach: int) -> int:
    """Query rows per chunk of :func:`band_attention` for a pattern that reaches ``reach``
    keys: about half the reach (so a chunk's keys are at most ~1.5x the ones it uses),
    within 16..1024 rows and one score block under :data:`BLOCK_ELEMENTS`."""
    rows = max(16, min(1024, max(1, reach // 2)))
    while rows > 16 and batch * heads * rows * (reach + rows) > BLOCK_ELEMENTS:
        rows //= 2
    return rows


def band_attention(q, k, v, call, pattern, key_ranges, rows: int):
    """Softmax attention restricted to ``pattern`` (a mask_mod), over chunks of ``rows``
    query rows; chunk ``[qs, qe)`` attends only the keys of ``key_ranges(qs, qe)``, a
    list of disjoint ``(lo, hi)`` ranges in ascending order (e.g. the sinks and the
    window). Inside a chunk the pattern, the call's causal structure, mask and key mask
    are evaluated at the true positions, and the call's score_mod is applied. Under
    autograd each chunk is recomputed in the backward (:func:`~attnzoo.kernels.segmented.segmented`).

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    B, Hq, Hkv, Nq, Nk, D = call.batch, call.q_heads, call.kv_heads, call.q_len, call.kv_len, call.head_dim
    G = Hq // Hkv
    ct = compute_dtype(q.dtype)
    offset, scale, mask, key_mask, mod, causal = call.offset, call.scale, call.mask, call.key_mask, call.score_mod, \
        call.causal
    plan, positions = [], {}
    for qs in range(0, Nq, rows):
        qe = min(Nq, qs + rows)
        ranges = [(max(0, lo), min(Nk, hi)) for lo, hi in key_ranges(qs, qe)]
        ranges = [(lo, hi) for lo, hi in ranges if hi > lo] or [(0, 1)]  # >= 1 key: empty rows give zeros
        if len(ranges) == 1:
            keys = slice(*ranges[0])
            kpos = torch.arange(ranges[0][0], ranges[0][1], device=q.device)
        else:
            kpos = torch.cat([torch.arange(lo, hi, device=q.device) for lo, hi in ranges])
            keys = kpos
        positions[qs] = kpos
        plan.append((qs, qe, keys))
    heads = torch.arange(Hq, device=q.device).view(1, Hkv, G, 1, 1)
    batch = torch.arange(B, device=q.device).view(-1, 1, 1, 1, 1)
    # a pattern that says it depends on positions only (``per_head = False``) and no mask
    # of the call's: the fused path
    if mod is None and mask is None and key_mask is None and not getattr(pattern, "per_head", True):
        return segmented(_static_band_chunk(q, pattern, causal, offset, scale, positions, B, Hkv, G, D, ct),
                         plan, q, k, v)

    def chunk(qb, kb, vb, item):
        qs, qe = item[0], item[1]
        kpos = positions[qs]
        n, m = qe - qs, kpos.numel()
        qpos = torch.arange(qs, qe, device=q.device).view(1, 1, 1, n, 1)
        kp = kpos.view(1, 1, 1, 1, m)
        s = (qb.to(ct).view(B, Hkv, G, n, D) * scale) @ kb.to(ct).unsqueeze(2).transpose(-1, -2)
        if mod is not None:
            s = mod(s, batch, heads, qpos, kp).expand(s.shape)
        ok = pattern(batch, heads, qpos, kp)
        if causal:
            ok = ok & (kp <= qpos + offset)
        if mask is not None:
            if isinstance(mask, torch.Tensor):
                mq = mask if mask.shape[2] == 1 else mask[:, :, qs:qe]
                mk = mq if mq.shape[3] == 1 else mq.index_select(3, kpos)
                ok = ok & group_mask(mk, Hkv, G)
            else:
                ok = ok & mask(batch, heads, qpos, kp)
        if key_mask is not None:
            ok = ok & key_mask.index_select(1, kpos).view(B, 1, 1, 1, m)
        p = masked_softmax(s, ok.expand(s.shape))
        return (p @ vb.to(ct).unsqueeze(2)).reshape(B, Hq, n, -1).to(q.dtype)

    return segmented(chunk, plan, q, k, v)
