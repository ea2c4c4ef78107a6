"""Chunked scans shared by the linear-attention family.

For feature-mapped queries and keys ``fq: (B, H, Nq, F)``, ``fk: (B, H, Nk, F)`` and
values ``v: (B, H, Nk, Dv)``, with an optional per-head decay ``λ_h`` in (0, 1]:

    causal:     o_i = sum_{j <= i} λ^(i-j) (fq_i · fk_j) v_j
    noncausal:  o_i = fq_i (fkᵀ v)                      (fkᵀ v first: O(N F Dv))

The causal form is computed in chunks of ``C`` tokens, as Lightning Attention does:
inside a chunk the ``C x C`` masked product ``[(Q_c K_cᵀ) ⊙ M_λ] V_c``; across chunks a
running ``F x Dv`` state ``S`` (decayed by ``λ^C`` per chunk) read by ``λ^(i+1) Q_c S``.
Every decay exponent is >= 0, so nothing overflows (no ``λ^-i`` factors). Time
O(N C F + N F Dv), memory O(N C + N F Dv / C) per head, and autograd works through it.

A normaliser (``o_i / (fq_i · sum_j fk_j)``) is the same computation with a column of
ones appended to ``v`` (:func:`with_ones`, :func:`split_normalizer`). Causal
cross-attention (``Nq != Nk``, lower-right aligned) is :func:`causal_aligned`.

On top of the scans, the kernel-attention pipeline the feature-map methods share
(``linear``, ``hedgehog``, ``lightning``): a feature map ``φ(x, positions, is_query)``
applied to q and k with their token positions (:func:`feature_pair`, so positional maps
such as cosFormer's work segment by segment and step by step), the dense N×N form of
the references (:func:`dense_kernel_attention`), the chunked form of the fast paths
(:func:`kernel_attention`: ``φ(K)ᵀV`` first, or the causal scan over segments of the
inputs with the state carried) and the recurrent decoding step
(:func:`kernel_attention_step`). Each ends with one of three outputs: ``"normalize"``
(divide by ``φ(q_i)·Σ_j φ(k_j) + eps``), ``"rms"`` (TransNormer's NormAttention: an RMS
norm on each head's output) or ``None`` (the raw sums).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..errors import AttentionInputError
from .common import compute_dtype, needs_graph, repeat_kv

DEFAULT_CHUNK = 64

#: A feature map of the kernel-attention pipeline: ``φ(x (B, H, N, D), positions (N,),
#: is_query) -> (B, H, N, F)``; positions are the tokens' key positions (lower-right).
FeatureMap = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]

#: The outputs of the pipeline (see the module docstring).
OUTPUTS = ("normalize", "rms", None)


def check_chunk(chunk: int) -> None:
    """The ``chunk`` option of a method built on these scans (tokens per chunk): >= 1."""
    if chunk < 1:
        raise AttentionInputError(f"option chunk must be a positive int (tokens per chunk), got {chunk!r}")


def noncausal_linear(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``fq (fkᵀ v)``: ``(B, H, Nq, F), (B, H, Nk, F), (B, H, Nk, Dv) -> (B, H, Nq, Dv)``."""
    return fq @ (fk.transpose(-1, -2) @ v)


#: Largest intermediate (elements) one segment of the causal scan may create: 1 Mi
#: float32 = 4 MiB. The segments' temporaries are freed and reused in the heap from one
#: segment to the next (with attnzoo's allocator settings, attnzoo/allocator.py), so only
#: the first segment touches fresh pages: causal linear at N = 16,384 (B·H = 8) took
#: 110-125 ms warm and 140-160 ms in a fresh process, against 170 / 220 ms with 16 MiB
#: segments. 2 MiB segments measured the same there but cost lightning 2x at B·H = 2,
#: N = 8,192 (two segments of 4,096 tokens instead of one).
SEGMENT_ELEMENTS = 1 << 20


def segment_length(batch: int, heads: int, width: int, chunk: int = DEFAULT_CHUNK) -> int:
    """Tokens per segment so that a ``(B, H, tokens, width)`` intermediate stays under
    :data:`SEGMENT_ELEMENTS` (a whole number of chunks)."""
    return max(chunk, (SEGMENT_ELEMENTS // max(1, batch * heads * width)) // chunk * chunk)


def causal_segments(q, k, v, key_mask, run_segment, chunk: int = DEFAULT_CHUNK):
    """Causal self-attention over consecutive segments of the *inputs*, so that feature
    maps, head repeats and casts also work on small tensors; ``run_segment(q_s, k_s, v_s,
    kpm_s, offset, state) -> (out_s, state)`` carries the recurrent state across. The
    inputs are split (not indexed), so autograd concatenates their gradients once."""
    B, Hq, N, D = q.shape
    seg = segment_length(B, Hq, max(D, v.shape[-1], chunk), chunk)
    kpms = key_mask.split(seg, dim=1) if key_mask is not None else [None] * (-(-N // seg))
    graph = needs_graph(q, k, v)
    outs, state, result = [], None, None
    for i, (q_s, k_s, v_s, m_s) in enumerate(zip(q.split(seg, 2), k.split(seg, 2), v.split(seg, 2), kpms)):
        out, state = run_segment(q_s, k_s, v_s, m_s, i * seg, state)
        if graph or seg >= N:
            outs.append(out)
            continue
        # no graph: each segment's output goes straight into the result, so only the result
        # is fresh memory (a list of segment outputs and their concatenation would be two)
        if result is None:
            result = out.new_empty(*out.shape[:2], N, out.shape[3])
        result[:, :, i * seg:i * seg + out.shape[2]] = out
    if result is not None:
        return result
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def causal_linear(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, *, decay: Optional[torch.Tensor] = None,
                  chunk: int = DEFAULT_CHUNK, initial_state: Optional[torch.Tensor] = None,
                  return_state: bool = False):
    """Chunked causal linear attention (equal lengths ``Nq == Nk == N``).

    ``decay``: ``(H,)`` per-head λ in (0, 1] or None. ``initial_state``: ``(B, H, F, Dv)``,
    the state after the tokens before this call (position -1), decayed like any other
    state. Returns ``out (B, H, N, Dv)`` and, with ``return_state``, the final state.

    Long sequences run as consecutive segments (whole chunks, the state carried from one
    to the next) so no intermediate exceeds :data:`SEGMENT_ELEMENTS`.
    """
    B, H, N, F = fq.shape
    C = max(1, min(int(chunk), N))
    seg = segment_length(B, H, max(C, F, v.shape[-1]), C)
    if N <= seg:
        return _causal_segment(fq, fk, v, decay=decay, chunk=C, initial_state=initial_state,
                               return_state=return_state)
    outs, state = [], initial_state
    # split (not index) so autograd concatenates the segment gradients once
    for q_s, k_s, v_s in zip(fq.split(seg, dim=2), fk.split(seg, dim=2), v.split(seg, dim=2)):
        out, state = _causal_segment(q_s, k_s, v_s, decay=decay, chunk=C, initial_state=state, return_state=True)
        outs.append(out)
    out = torch.cat(outs, dim=2)
    return (out, state) if return_state else out


def _causal_segment(fq, fk, v, *, decay, chunk, initial_state, return_state):
    """One segment of :func:`causal_linear` (all its chunks at once)."""
    B, H, N, F = fq.shape
    Dv = v.shape[-1]
    C = max(1, min(int(chunk), N))
    nc = -(-N // C)
    pad = nc * C - N
    if pad:
        fq = torch.nn.functional.pad(fq, (0, 0, 0, pad))
        fk = torch.nn.functional.pad(fk, (0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    qc = fq.reshape(B, H, nc, C, F)
    kc = fk.reshape(B, H, nc, C, F)
    vc = v.reshape(B, H, nc, C, Dv)
    idx = torch.arange(C, device=fq.device)
    causal = idx.view(-1, 1) >= idx.view(1, -1)
    if decay is None:
        intra_mask = causal.to(fq.dtype)
        q_in, k_out, chunk_decay = qc, kc, None
    else:
        log_l = torch.log(decay.to(fq.dtype)).view(1, H, 1, 1, 1)  # (1, H, 1, 1, 1)
        diff = (idx.view(-1, 1) - idx.view(1, -1)).clamp(min=0).to(fq.dtype)
        intra_mask = torch.exp(log_l * diff) * causal  # λ^(i-j), j <= i
        q_in = qc * torch.exp(log_l * (idx + 1).to(fq.dtype).view(1, 1, 1, C, 1))  # λ^(i+1): state -> position i
        k_out = kc * torch.exp(log_l * (C - 1 - idx).to(fq.dtype).view(1, 1, 1, C, 1))  # λ^(C-1-j): j -> chunk end
        chunk_decay = torch.exp(log_l * C).view(1, H, 1, 1)  # λ^C: state of one chunk end -> the next
    scores = (qc @ kc.transpose(-1, -2)) * intra_mask
    out = scores @ vc  # (B, H, nc, C, Dv)
    kv = k_out.transpose(-1, -2) @ vc  # (B, H, nc, F, Dv): each chunk's contribution at its end
    if chunk_decay is None:
        # exclusive prefix sum over the N / C chunk states (not over tokens)
        # (shifted, not cumsum - kv: that subtraction would cancel digits)
        total = torch.cumsum(kv, dim=2)
        inter = torch.cat([torch.zeros_like(total[:, :, :1]), total[:, :, :-1]], dim=2)
        state = total[:, :, -1]
        if initial_state is not None:
            inter = inter + initial_state.unsqueeze(2)
            state = state + initial_state
    else:
        state = initial_state if initial_state is not None else fq.new_zeros(B, H, F, Dv)
        before = []
        # a scan over the N / C chunk states (not over tokens); unbind once, because
        # indexing kv[:, :, c] in the loop would make autograd build a full-size zero
        # gradient per chunk (quadratic in N)
        for kv_c in kv.unbind(dim=2):
            before.append(state)
            state = state * chunk_decay + kv_c
        inter = torch.stack(before, dim=2)
    out = out + q_in @ inter
    out = out.reshape(B, H, nc * C, Dv)[:, :, :N]
    if pad and return_state and decay is not None:
        # the last chunk's keys were decayed to its padded end; redo it to the true end
        r = C - pad
        log_d = torch.log(decay.to(fq.dtype)).view(1, H, 1, 1)
        last_before = before[-1]
        k_last = kc[:, :, -1, :r] * torch.exp(log_d * (r - 1 - idx[:r]).to(fq.dtype).view(1, 1, r, 1))
        state = last_before * torch.exp(log_d * r) + k_last.transpose(-1, -2) @ vc[:, :, -1, :r]
    return (out, state) if return_state else out


def causal_aligned(fq, fk, v, *, decay=None, chunk=DEFAULT_CHUNK):
    """Causal attention with lower-right alignment for ``Nq != Nk``: query ``i`` sees key
    ``j`` iff ``j <= i + Nk - Nq``. Keys before the first query's position form an
    initial state; queries before the first key see nothing (zeros)."""
    Nq, Nk = fq.shape[2], fk.shape[2]
    off = Nk - Nq
    if off == 0:
        return causal_linear(fq, fk, v, decay=decay, chunk=chunk)
    if off > 0:
        prefix = causal_linear(fq.new_zeros(fk[:, :, :off].shape), fk[:, :, :off], v[:, :, :off], decay=decay,
                               chunk=chunk, return_state=True)[1]
        return causal_linear(fq, fk[:, :, off:], v[:, :, off:], decay=decay, chunk=chunk, initial_state=prefix)
    head = fq.new_zeros(fq.shape[0], fq.shape[1], -off, v.shape[-1])
    return torch.cat([head, causal_linear(fq[:, :, -off:], fk, v, decay=decay, chunk=chunk)], dim=2)


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """``v`` with a column of ones appended: the last output column is then the normaliser."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def split_normalizer(out: torch.Tensor, eps: float) -> torch.Tensor:
    """``out[..., :-1] / out[..., -1:]`` (guarded by ``eps``): the normalised output. With
    ``eps == 0`` (positive features, whose denominator is zero only with no visible key)
    a zero denominator (no visible key) gives 0 instead, and any common factor of the
    features cancels exactly."""
    num, den = out[..., :-1], out[..., -1:]
    if eps == 0:
        return num / _safe(den)
    return num / (den + eps)


def _safe(den: torch.Tensor) -> torch.Tensor:
    """``den`` with its zeros (rows that see no key, whose numerator is 0 too) replaced by
    1: the quotient is then 0 there, with finite gradients."""
    return torch.where(den > 0, den, torch.ones_like(den))


# ------------------------------------------------------------------ kernel attention


def positionless(fn: Callable[[torch.Tensor], torch.Tensor]) -> FeatureMap:
    """A map of ``x`` alone (``φ(x) -> features``) as a :data:`FeatureMap` (its
    ``log_space`` flag kept)."""

    def phi(x, pos, is_query):
        return fn(x)

    phi.log_space = getattr(fn, "log_space", False)
    return phi


def feature_pair(q, k, key_mask, phi: FeatureMap, *, position_offset: int = 0, with_shift: bool = False):
    """``φ(q), φ(k)`` in the compute dtype, k repeated to the query heads, padded keys'
    features zeroed. Query ``i`` sits at position ``i + Nk - Nq`` (lower-right), key ``j``
    at ``j``, both shifted by ``position_offset`` (the tokens before these).

    A map with ``log_space = True`` (FAVOR+'s ``exp`` features) returns log-features; they
    are exponentiated here after the stabilising shifts of Performer's algorithm: each
    query row by its own max, the keys by one max per (batch, head) over the real keys —
    constants that cancel in the normalisation (and in an RMS norm), while no feature
    underflows. ``with_shift=True`` also returns that key shift ``(B, Hq, 1, 1)`` (None
    for other maps), which recurrent states carry (:func:`rescale_state`)."""
    Hq, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
    ct = compute_dtype(q.dtype)
    q_pos = torch.arange(Nq, device=q.device) + (Nk - Nq) + position_offset
    k_pos = torch.arange(Nk, device=q.device) + position_offset
    fq = phi(q.to(ct), q_pos, True)
    fk = phi(repeat_kv(k, Hq).to(ct), k_pos, False)
    shift = None
    if getattr(phi, "log_space", False):
        fq = torch.exp(fq - fq.amax(dim=-1, keepdim=True).detach())
        real = fk if key_mask is None else fk.masked_fill(~key_mask.view(k.shape[0], 1, Nk, 1), float("-inf"))
        shift = real.amax(dim=(-2, -1), keepdim=True).detach()
        shift = shift.masked_fill(torch.isinf(shift), 0.0)  # every key padded: any shift will do
        fk = torch.exp(fk - shift)
    if key_mask is not None:
        fk = fk * key_mask.view(k.shape[0], 1, Nk, 1).to(ct)
    return (fq, fk, shift) if with_shift else (fq, fk)


def rescale_state(S: Optional[torch.Tensor], old_shift, fk: torch.Tensor, new_shift):
    """Put a recurrent state ``S`` (built from key features shifted by ``old_shift``) and new
    key features ``fk`` (shifted by ``new_shift``) on one common shift, the larger:
    ``(S, fk, shift)``. Shifts are ``(B, H, 1, 1)`` or None (no shifting)."""
    if new_shift is None:
        return S, fk, None
    if S is None or old_shift is None:
        return S, fk, new_shift
    shift = torch.maximum(old_shift, new_shift)
    return S * torch.exp(old_shift - shift), fk * torch.exp(new_shift - shift), shift


def finish(out: torch.Tensor, output: Optional[str], eps: float) -> torch.Tensor:
    """The pipeline's output from the scan's (``"normalize"``: ``v`` had the column of ones)."""
    if output == "normalize":
        return split_normalizer(out, eps)
    if output == "rms":
        return out * torch.rsqrt(out.pow(2).mean(dim=-1, keepdim=True) + eps)
    return out


def dense_kernel_attention(q, k, v, phi: FeatureMap, *, causal: bool, key_mask=None, output: Optional[str],
                           eps: float, decay: Optional[torch.Tensor] = None, return_weights: bool = False):
    """The references' form: the explicit ``(B, Hq, Nq, Nk)`` kernel matrix
    ``W_ij = φ(q_i)·φ(k_j)`` [``· λ^(i-j)``] over the visible keys (causal: lower-right),
    then ``O = W V / (W 1 + eps)`` (``"normalize"``, the weights returned are the
    normalised rows) or ``finish(W V)`` (``"rms"`` / None, the weights are ``W``).

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv) in q's
    dtype. ``decay``: ``(Hq,)`` per-head λ (causal only) or None.
    """
    fq, fk = feature_pair(q, k, key_mask, phi)
    Nq, Nk = q.shape[2], k.shape[2]
    w = fq @ fk.transpose(-1, -2)  # (B, Hq, Nq, Nk)
    if decay is not None:
        i = torch.arange(Nq, device=q.device).view(-1, 1) + (Nk - Nq)
        j = torch.arange(Nk, device=q.device).view(1, -1)
        dist = (i - j).clamp(min=0).to(w.dtype)
        w = w * (torch.exp(torch.log(decay.to(w.dtype)).view(1, -1, 1, 1) * dist) * (j <= i))
    elif causal:
        w = w * torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(diagonal=Nk - Nq)
    vv = repeat_kv(v, q.shape[1]).to(w.dtype)
    if output == "normalize":
        den = w.sum(dim=-1, keepdim=True)
        weights = w / (_safe(den) if eps == 0 else den + eps)
        out = weights @ vv
    else:
        weights = w
        out = finish(w @ vv, output, eps)
    out = out.to(q.dtype)
    return (out, weights.to(q.dtype)) if return_weights else out


def _values(v, key_mask, heads: int, dtype, output: Optional[str]) -> torch.Tensor:
    vv = repeat_kv(v, heads).to(dtype)
    if key_mask is not None:
        vv = vv * key_mask.view(v.shape[0], 1, -1, 1).to(dtype)
    return with_ones(vv) if output == "normalize" else vv


def kernel_attention(q, k, v, phi: FeatureMap, *, causal: bool, key_mask=None, output: Optional[str], eps: float,
                     chunk: int = DEFAULT_CHUNK, decay: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fast form of :func:`dense_kernel_attention`, never N×N: ``φ(K)ᵀV`` first
    (noncausal), the chunked causal scan (causal; lower-right for ``Nq != Nk``). Causal
    self-attention runs the whole pipeline — feature maps with their positions, head
    repeats, casts, the scan — segment by segment (:func:`causal_segments`), so its
    temporaries stay small; the recurrent state is carried across."""
    Hq = q.shape[1]
    if causal and q.shape[2] == k.shape[2]:

        def run_segment(q_s, k_s, v_s, kpm_s, offset, state):
            fq, fk, shift = feature_pair(q_s, k_s, kpm_s, phi, position_offset=offset, with_shift=True)
            S, old_shift = state if state is not None else (None, None)
            S, fk, shift = rescale_state(S, old_shift, fk, shift)
            vv = _values(v_s, kpm_s, Hq, fq.dtype, output)
            out, S = causal_linear(fq, fk, vv, decay=decay, chunk=chunk, initial_state=S, return_state=True)
            return finish(out, output, eps).to(q.dtype), (S, shift)

        return causal_segments(q, k, v, key_mask, run_segment, chunk)
    fq, fk = feature_pair(q, k, key_mask, phi)
    vv = _values(v, key_mask, Hq, fq.dtype, output)
    out = causal_aligned(fq, fk, vv, decay=decay, chunk=chunk) if causal else noncausal_linear(fq, fk, vv)
    return finish(out, output, eps).to(q.dtype)


def kernel_attention_step(state, q, k, v, phi: FeatureMap, *, output: Optional[str], eps: float,
                          chunk: int = DEFAULT_CHUNK, decay: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decode the next T tokens from a constant-size recurrent state: ``state.S`` (None
    before the first step; ``Σ λ^(t-j) φ(k_j) [v_j, 1]ᵀ`` per query head, the column of
    ones with ``"normalize"``) and ``state.position`` (tokens seen), e.g. a
    :class:`~attnzoo.kernels.caches.RecurrentState`; a chunked scan over just the new
    tokens, started from ``S``. Returns ``(B, Hq, T, Dv)``, the last T rows of the
    causal forward."""
    fq, fk, shift = feature_pair(q, k, None, phi, position_offset=state.position, with_shift=True)
    S, fk, shift = rescale_state(state.S, getattr(state, "key_shift", None), fk, shift)
    state.key_shift = shift
    vv = _values(v, None, q.shape[1], fq.dtype, output)
    out, state.S = causal_linear(fq, fk, vv, decay=decay, chunk=chunk, initial_state=S, return_state=True)
    state.position += q.shape[2]
    return finish(out, output, eps).to(q.dtype)
