"""Clipped softmax.

    P = clip((ζ - γ) · softmax(S) + γ, 0, 1),      S = scale · Q Kᵀ (masked: P = 0)

"Quantizable Transformers: Removing Outliers by Helping Attention Heads Do
Nothing" (Bondarenko et al., NeurIPS 2023). With ``γ < 0`` small probabilities
are clipped to exactly 0 (and with ``ζ > 1`` large ones to exactly 1), so a head
can "do nothing" without pushing its logits to extreme values — the source of
activation outliers that break INT8 quantisation. The paper parametrises
``γ = -α / T`` with ``T`` the sequence length and uses ``ζ = 1``.

[J] ``T`` is the number of keys the query can see under the causal structure
(``Nk`` noncausal, ``i + Nk - Nq + 1`` causal), so decoding equals the causal
forward pass. Pass ``gamma=<float>`` for a fixed value. The paper's second
remedy, gated attention, is the layer option ``Attention(gate=True)``.

The regime where it cannot train, and the default α = 1 [J]. An entry survives the
clip iff ``p_j > α / (T + α)``; a whole row is zero — the "no-op" a head can learn —
iff every ``p_j`` is below that, which needs a near-uniform row and ``α > T / (T - 1)``
(just above 1). At initialisation, with small logits, every row *is* near uniform, so
with ``α`` well above 1 every row is clipped to exact zeros and the head gets no
gradient at all (the clamp's derivative is 0): measured on the benchmark's quick tasks
(N = 32, small models, standard init), ``α = 4`` (attnzoo 0.1's default) stays at
chance on classify, copy and reverse (0.25, 0.08, 0.06), ``α = 2`` learns copy only
partly the others, ``α = 1.5`` fails reverse, and ``α = 1`` learns all three (1.00,
1.00, 0.95; ``attnzoo bench tasks`` on the quick config's classify, copy and reverse
with ``[tasks.options.clipped_softmax] alpha = ...``). ``α = 1`` is the largest value
whose near-uniform rows keep a gradient, so it is the default: small entries are still
clipped to exact zeros, but a whole row is never exactly zero. Larger ``α`` (the
exact-zero rows of the paper) needs logits already spread at the start — a pretrained
model, a larger initialisation, or ``α`` raised after a warm-up.

Time O(N² D); memory O(N²) for the reference, O(N · block) for ``chunked``.
Decoding keeps a KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...errors import AttentionInputError
from ...kernels import score_mods
from ...kernels.caches import KVCacheDecoder
from ...kernels.common import compute_dtype, repeat_kv, visible_counts
from ...kernels.dense import masked_softmax, scores
from ...kernels.rows import ClippedSoftmaxRows, row_attention
from ...kernels.masking import group_mask
from ...kernels.segmented import chunked_rows
from ...registry import MethodOptions, method


@dataclass(frozen=True)
class ClippedSoftmaxOptions(MethodOptions):
    """Options of ``clipped_softmax``.

    Attributes:
        zeta: stretch (>= 1); ``gamma``: shift (<= 0) before clipping to [0, 1], or None
            for ``-alpha / T``; ``alpha``: the paper's α (default 1: the largest with which a
            model trains from a standard initialisation; see the module docstring).
        block_q: query rows per chunk of ``chunked``.
    """

    zeta: float = 1.0
    gamma: Optional[float] = None
    alpha: float = 1.0
    block_q: Optional[int] = None

    def validate(self) -> None:
        if self.zeta < 1.0 or (self.gamma is not None and self.gamma > 0.0):
            raise AttentionInputError(
                f"clipped softmax needs zeta >= 1 and gamma <= 0, got zeta={self.zeta}, gamma={self.gamma}")
        if self.block_q is not None and self.block_q < 1:
            raise AttentionInputError(f"option block_q must be a positive int (or None), got {self.block_q!r}")


def _gamma(o, causal, q_len, kv_len, device, qs=0, qe=None, dtype=torch.float32):
    if o.gamma is not None:
        return float(o.gamma)
    return -float(o.alpha) / visible_counts(causal, q_len, kv_len, device, qs, qe, dtype)


def _clip(p, zeta, gamma, allowed):
    w = ((zeta - gamma) * p + gamma).clamp(0.0, 1.0)
    if allowed is not None:
        w = w.masked_fill(~allowed, 0.0)
    return w


@method("clipped_softmax", options=ClippedSoftmaxOptions,
        paper="Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing",
        summary="softmax stretched by (zeta, gamma) and clipped to [0, 1]: exact zeros for no-op heads",
        time="O(N^2 D)", memory="O(N·block) chunked, O(N^2) reference", score_mods=True, decoder=KVCacheDecoder())
def clipped_softmax(q, k, v, call):
    """Clipped softmax attention with explicit N×N weights.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    ct = compute_dtype(q.dtype)
    o = call.options
    allowed = call.masker.full()
    p = masked_softmax(scores(q, k, call.scale, call.score_mod), allowed)
    w = _clip(p, o.zeta, _gamma(o, call.causal, call.q_len, call.kv_len, q.device, dtype=ct), allowed)
    out = (w @ repeat_kv(v, call.q_heads).to(ct)).to(q.dtype)
    return (out, w.to(q.dtype)) if call.return_weights else out


def _fast(q, k, v, call):
    """Every row sees a key (no masks of the caller's, no query before the first key):
    :func:`attnzoo.kernels.rows.row_attention` with the clip as its row transform —
    masked entries have p = 0, so ``γ <= 0`` clips them to exactly 0 already."""
    G, o, causal = call.q_heads // call.kv_heads, call.options, call.causal
    ct = compute_dtype(q.dtype)

    def gamma_of(qs, qe):
        gamma = _gamma(o, causal, call.q_len, call.kv_len, q.device, qs, qe, ct)
        if isinstance(gamma, torch.Tensor):  # (n, 1) per query row, repeated over the G heads
            return gamma.repeat(G, 1).view(1, G * (qe - qs), 1)
        return torch.full((1, 1, 1), gamma, dtype=ct, device=q.device)

    return row_attention(q, k, v, ClippedSoftmaxRows(o.zeta, gamma_of), scale=call.scale, causal=causal,
                         extra_of=gamma_of, block_q=o.block_q)


@clipped_softmax.impl("chunked", options=("block_q",),
                      description="query-row chunks recomputed in the backward, O(N·block) memory")
def chunked(q, k, v, call):
    """Query rows in chunks recomputed in the backward (each chunk holds whole rows, so the softmax
    and the clip stay exact): O(N · block) memory, autograd works."""
    B, Hq, Hkv, D = call.batch, call.q_heads, call.kv_heads, call.head_dim
    G = Hq // Hkv
    ct = compute_dtype(q.dtype)
    o, masker, mod, scale = call.options, call.masker, call.score_mod, call.scale
    if call.mask is None and call.key_mask is None and mod is None and call.offset >= 0:
        return _fast(q, k, v, call)

    def rows(qb, kb, vb, qs, qe):
        n, m = qe - qs, kb.shape[2]
        s = (qb.to(ct).view(B, Hkv, G, n, D) @ kb.to(ct).unsqueeze(2).transpose(-1, -2)) * scale
        s = score_mods.apply(mod, s, qs, 0, batch=B, heads=Hq, kv_heads=Hkv)
        allowed = masker.block(qs, qe, 0, m)
        a = None if allowed is None else group_mask(allowed, Hkv, G)
        p = masked_softmax(s, a)
        w = _clip(p, o.zeta, _gamma(o, call.causal, call.q_len, call.kv_len, q.device, qs, qe, ct), a)
        return (w @ vb.to(ct).unsqueeze(2)).reshape(B, Hq, n, -1).to(q.dtype)

    return chunked_rows(rows, q, k, v, masker, o.block_q)
