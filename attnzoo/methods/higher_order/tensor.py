"""Tensor (triple-wise) attention: each query attends *pairs* of keys.

"How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention to
Kronecker Computation" (Alman, Song; ICLR 2024). Matrix attention ``D⁻¹ exp(QKᵀ) V`` scores
a query against one key; tensor attention scores it against a pair ``(j1, j2)`` through
the column-wise Kronecker product ``K1 ⊘ K2 ∈ R^{n²×d}``, whose row ``(j1, j2)`` is
``K1_{j1} ∘ K2_{j2}`` (elementwise product), and values ``V1 ⊘ V2`` likewise::

    A_{i,(j1,j2)} = exp(scale · Σ_d Q_{id} K1_{j1 d} K2_{j2 d})       A = exp(scale · Q (K1 ⊘ K2)ᵀ) ∈ R^{n×n²}
    D = diag(A 1_{n²})
    Att = D⁻¹ A (V1 ⊘ V2),   Att_i = Σ_{j1,j2} P_{i,j1,j2} (V1_{j1} ∘ V2_{j2})

**This is the naive algorithm, for small N**: O(Nq·Nk²·D) time. The paper shows that when
the entries are bounded by o(∛log n) an n^{1+o(1)}-time approximation exists (the
polynomial method), and that above that bound «no algorithm that runs faster than
n^{3-o(1)}» exists unless SETH fails; neither the fast approximation nor anything subcubic is
implemented here. A call with more than ``max_triples`` scored triples per head
(``Nq·Nk²``, default 2^24: N = 256 in self-attention) raises a clear error instead of
running for minutes.

Implementations:

* ``dense`` — the reference's maths by two batched matmuls and one softmax over the
  ``Nk²`` pairs (memory O(Nq·Nk²)); ``impl="auto"`` takes it while the whole score
  tensor stays under 16 Mi elements, and the task models train with it (1.3× faster
  than the reference at their size; 2–3× faster than ``chunk`` at N = 128).
* ``reference`` — the ``(B, Hq, Nq, Nk, Nk)`` score tensor written out, a masked softmax
  over the ``Nk²`` pairs of each row, the value pairs contracted. Memory O(Nq·Nk²).
* ``chunk`` — **exact, with the same cubic time** (exp must be evaluated at every triple:
  no exact subcubic form exists in general, see above), but never the ``n × n²`` tensor:
  the first key of the pair in chunks of ``c``; a chunk's scores ``(Nq, c, Nk)`` in one
  matmul, ``(Q ∘ K1_c) K2ᵀ``; its values as ``Σ_{j1} V1_{j1} ∘ (P_{i,j1,:} V2)``, a second
  matmul. Two passes over the chunks: the denominators (each chunk under its own
  row maxima, rescaled), then the normalised numerators — each chunk checkpointed
  (recomputed in the backward pass), so memory is O(Nq·Nk·c) in the forward and the backward pass alike,
  against O(Nq·Nk²) for the reference. The shifts by the detached maxima cancel
  exactly between numerator and denominator, so the gradients are the exact ones.

Decoding keeps a KV cache: each new query scores every pair of cached keys (O(L²·D) per
token).

Judgement calls:

* [J] The API gives one key and one value sequence: by default ``K1 = K2 = K`` and
  ``V1 = V2 = V``; the options ``k2`` and ``v2`` (shaped like ``k`` and ``v``) give the
  second key and value sequences of the paper's five-projection form.
* [J] ``scale`` is the call's (``D^-0.5`` by default, which keeps the trilinear scores at
  unit variance for unit-variance inputs, as it does for dot products); the paper writes
  ``1/d``: pass ``scale=1/D`` for it.
* [J] Masks: the pair ``(j1, j2)`` is visible to query ``i`` iff both keys are (causality,
  the mask, key padding); causal is lower-right as everywhere. A row with no visible key
  returns zeros.
* [J] The call's score_mods are not taken (they are defined on (query, key) pairs, not
  triples); ``return_weights`` is refused (the weights are ``(Nq, Nk, Nk)`` per head, not
  the library's ``(Nq, Nk)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from ...errors import AttentionInputError, InputTooLarge, fmt_shape
from ...kernels.caches import KVCacheDecoder
from ...kernels.common import BLOCK_ELEMENTS, compute_dtype, needs_graph, repeat_kv
from ...kernels.dense import masked_softmax
from ...kernels.masking import group_mask
from ...registry import MethodOptions, method


@dataclass(frozen=True)
class TensorOptions(MethodOptions):
    """Options of ``tensor``.

    Attributes:
        k2: the second key sequence ``(B, Hkv, Nk, D)`` (default: ``k``).
        v2: the second value sequence ``(B, Hkv, Nk, Dv)`` (default: ``v``).
        max_triples: the largest ``Nq·Nk²`` a call may score per head (default 2^24);
            above it the call raises. Raise it knowingly: time is cubic.
        chunk: first keys per chunk of ``chunk`` (default: as many as keep one chunk's
            scores under 4 Mi elements).
    """

    k2: Optional[torch.Tensor] = None
    v2: Optional[torch.Tensor] = None
    max_triples: int = 1 << 24
    chunk: Optional[int] = None

    def validate(self) -> None:
        if self.max_triples < 1:
            raise AttentionInputError(f"option max_triples must be a positive int, got {self.max_triples!r}")
        if self.chunk is not None and self.chunk < 1:
            raise AttentionInputError(f"option chunk must be a positive int (or None), got {self.chunk!r}")


def _too_long(call) -> Optional[str]:
    triples = call.q_len * call.kv_len * call.kv_len
    if triples <= call.options.max_triples:
        return None
    side = int(round(call.options.max_triples ** (1 / 3)))
    return (f"tensor attention is the naive cubic algorithm, for small N: Nq·Nk² = {call.q_len}·{call.kv_len}² = "
            f"{triples} scored triples per head exceed max_triples={call.options.max_triples} (about N = {side} in "
            "self-attention); pass a larger max_triples to run it anyway (time grows as N³)")


def _check_size(call) -> None:
    reason = _too_long(call)
    if reason is not None:
        raise InputTooLarge(reason)


def _second_pair(k, v, call):
    """``(K2, V2)``: the options' second key and value sequences (checked), else ``k, v``."""
    o = call.options
    out = []
    for name, given, like in (("k2", o.k2, k), ("v2", o.v2, v)):
        if given is None:
            out.append(like)
            continue
        if given.shape != like.shape or given.dtype != like.dtype or given.device != like.device:
            what = "k" if name == "k2" else "v"
            raise AttentionInputError(
                f"option {name} must match {what}: shape {fmt_shape(like)}, {like.dtype} on {like.device}; got "
                f"shape {fmt_shape(given)}, {given.dtype} on {given.device}")
        out.append(given)
    return out[0], out[1]


@method("tensor", short_impl="dense", options=TensorOptions,
        paper=("How to Capture Higher-order Correlations? Generalizing Matrix Softmax Attention to Kronecker "
               "Computation"),
        summary="triple-wise attention: softmax over key pairs (K1 ⊘ K2), values V1 ⊘ V2; the naive cubic "
                "algorithm, for small N",
        time="O(Nq Nk^2 D)", memory="O(Nq Nk^2) reference and dense, O(Nq Nk c) chunk", weights=False)
def tensor(q, k, v, call):
    """The ``n × n²`` scores written out, a masked softmax over the key pairs of each row.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    _check_size(call)
    k2, v2 = _second_pair(k, v, call)
    Hq = q.shape[1]
    ct = compute_dtype(q.dtype)
    Q, K1, K2 = q.to(ct), repeat_kv(k, Hq).to(ct), repeat_kv(k2, Hq).to(ct)
    V1, V2 = repeat_kv(v, Hq).to(ct), repeat_kv(v2, Hq).to(ct)
    S = call.scale * torch.einsum("bhid,bhjd,bhkd->bhijk", Q, K1, K2)  # (B, Hq, Nq, Nk, Nk)
    vis = call.masker.full()  # (B', H', Nq, Nk) or None
    allowed = None if vis is None else (vis.unsqueeze(-1) & vis.unsqueeze(-2)).flatten(-2)
    P = masked_softmax(S.flatten(-2), allowed).view_as(S)
    return torch.einsum("bhijk,bhjd,bhkd->bhid", P, V1, V2).to(q.dtype)


#: the largest (B·Hq·Nq·Nk²) score tensor ``dense`` writes out (16 Mi elements, 64 MiB in fp32;
#: its softmax and saved tensors take as much again): past it ``impl="auto"`` takes ``chunk``
DENSE_SCORES = 4 * BLOCK_ELEMENTS


def _dense_fits(call) -> Optional[str]:
    reason = _too_long(call)
    if reason is not None:
        return reason
    scores = call.batch * call.q_heads * call.q_len * call.kv_len * call.kv_len
    if scores > DENSE_SCORES:
        return (f"dense writes the whole (B·Hq·Nq·Nk²) score tensor: {scores} elements exceed {DENSE_SCORES}; "
                "impl='chunk' keeps one chunk of first keys at a time")
    return None


@tensor.impl("dense", supports=_dense_fits,
             description="the n x n^2 scores by two batched matmuls and one softmax: O(Nq·Nk²) memory, "
                         "the fastest at the short lengths the cubic method is for")
def dense_attention(q, k, v, call):
    """The reference's maths by batched matmuls: scores ``(Q ∘ K1_j1) K2ᵀ`` for every first
    key at once, one masked softmax over the ``Nk²`` pairs, values ``Σ_j1 V1_j1 ∘ (P V2)``.
    Faster than the reference's three-operand einsums (whose backward copies per row) and
    than ``chunk`` while the ``(Nq, Nk, Nk)`` scores fit (chunk recomputes them per chunk)."""
    k2, v2 = _second_pair(k, v, call)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    ct = compute_dtype(q.dtype)
    qk = q.to(ct).reshape(B, Hkv, G, Nq, 1, D) * k.to(ct).reshape(B, Hkv, 1, 1, Nk, D)  # (B, Hkv, G, Nq, Nk, D)
    k2t = k2.to(ct).transpose(-1, -2).unsqueeze(2)  # (B, Hkv, 1, D, Nk)
    s = (qk.reshape(B, Hkv, G, Nq * Nk, D) @ k2t).view(B, Hkv, G, Nq, Nk * Nk) * call.scale
    vis = call.masker.full()
    allowed = None
    if vis is not None:
        visg = group_mask(vis, Hkv, G)  # (B', Hkv', G', Nq, Nk)
        allowed = (visg.unsqueeze(-1) & visg.unsqueeze(-2)).flatten(-2)  # the pair (j1, j2): both visible
    p = masked_softmax(s, allowed).view(B, Hkv, G, Nq * Nk, Nk)
    t = (p @ v2.to(ct).unsqueeze(2)).view(B, Hkv, G, Nq, Nk, Dv)  # P_{i,j1,:} V2
    out = (t * v.to(ct).reshape(B, Hkv, 1, 1, Nk, Dv)).sum(-2)  # Σ_j1 V1_j1 ∘ (P_{i,j1,:} V2)
    return out.reshape(B, Hq, Nq, Dv).to(q.dtype)


@tensor.impl("chunk", supports=_too_long, options=("chunk",),
             description="exact, cubic time, chunks of first keys checkpointed: O(Nq·Nk·c) memory, "
                         "no n x n^2 tensor")
def chunk_attention(q, k, v, call):
    """Exact tensor attention by chunks of the pair's first key (see the module docstring)."""
    k2, v2 = _second_pair(k, v, call)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    ct = compute_dtype(q.dtype)
    c = call.options.chunk or max(1, BLOCK_ELEMENTS // max(1, B * Hq * Nq * max(Nk, D, Dv)))
    c = min(c, Nk)
    scale = call.scale
    qg = q.to(ct).reshape(B, Hkv, G, Nq, D)
    k1, v1 = k.to(ct), v.to(ct)
    k2t = k2.to(ct).transpose(-1, -2).unsqueeze(2)  # (B, Hkv, 1, D, Nk)
    v2g = v2.to(ct).unsqueeze(2)  # (B, Hkv, 1, Nk, Dv)
    vis = call.masker.full()
    visg = None if vis is None else group_mask(vis, Hkv, G)  # (B', Hkv', G', Nq, Nk)

    def pair_ok(j0, j1):
        return None if visg is None else visg[..., j0:j1].unsqueeze(-1) & visg.unsqueeze(-2)

    def chunk_scores(qg_, k1c, k2t_, j0, j1):
        """Scores of the pairs (j1 in [j0, j1), any j2), hidden pairs at -inf: (B, Hkv, G, Nq, n, Nk)."""
        n = j1 - j0
        qk = qg_.unsqueeze(-2) * k1c.reshape(B, Hkv, 1, 1, n, D)  # (B, Hkv, G, Nq, n, D): Q ∘ K1_j1
        s = (qk.reshape(B, Hkv, G, Nq * n, D) @ k2t_).view(B, Hkv, G, Nq, n, Nk) * scale
        ok = pair_ok(j0, j1)
        return s if ok is None else s.masked_fill(~ok, float("-inf"))

    spans = [(j0, min(Nk, j0 + c)) for j0 in range(0, Nk, c)]

    def denominator(qg_, k1c, k2t_, j0, j1):
        """The chunk's Σ exp(s - m_c) and its own row maxima m_c (detached; -inf where the
        chunk shows a row nothing)."""
        sc = chunk_scores(qg_, k1c, k2t_, j0, j1)
        m = sc.detach().amax(dim=(-1, -2))
        shift_c = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).view(B, Hkv, G, Nq, 1, 1)
        return torch.exp(sc - shift_c).sum(dim=(-1, -2)), m

    def numerator(qg_, k1c, v1c, k2t_, v2g_, shift_, den_, j0, j1):
        n = j1 - j0
        p = torch.exp(chunk_scores(qg_, k1c, k2t_, j0, j1) - shift_) / den_.view(B, Hkv, G, Nq, 1, 1)
        t = (p.view(B, Hkv, G, Nq * n, Nk) @ v2g_).view(B, Hkv, G, Nq, n, Dv)  # P_{i,j1,:} V2
        return (t * v1c.reshape(B, Hkv, 1, 1, n, Dv)).sum(-2)  # Σ_j1 V1_j1 ∘ (P_{i,j1,:} V2)

    grad = needs_graph(q, k, v, k2, v2)

    def run(fn, *args):  # each chunk recomputed in the backward pass: no chunk's scores outlive it
        return checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args)

    # pass 1: the denominators, each chunk under its own maximum, rescaled to the row's
    # maximum M (the shifts are constants: they cancel, the gradients are exact); pass 2:
    # the numerators normalised inside the chunks — not num / den at the end — which keeps
    # the softmax's backward structure, so a row with one visible pair gets exactly zero
    # score gradients, as the reference does.
    parts = [run(denominator, qg, k1[:, :, j0:j1], k2t, j0, j1) for j0, j1 in spans]
    M = torch.stack([m for _, m in parts]).amax(0)
    M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))
    den = sum(d * torch.exp(m - M) for d, m in parts)  # a chunk that shows a row nothing: factor 0
    den = torch.where(den > 0, den, torch.ones_like(den))  # a row with nothing visible: zeros below
    shift = M.view(B, Hkv, G, Nq, 1, 1)
    out = sum(run(numerator, qg, k1[:, :, j0:j1], v1[:, :, j0:j1], k2t, v2g, shift, den, j0, j1)
              for j0, j1 in spans)
    return out.reshape(B, Hq, Nq, Dv).to(q.dtype)


@tensor.decodes
class TensorDecoder(KVCacheDecoder):
    """A KV cache; each new query scores every pair of cached keys (the default
    ``K2 = K``, ``V2 = V`` only: the second sequences of ``k2``/``v2`` are not cached)."""

    state_size = "KV cache: 2·Hkv·N·D per sequence (each step scores the N² cached key pairs)"

    def step(self, run, state, q, k, v, *, scale, impl, options):
        if options.k2 is not None or options.v2 is not None:
            raise AttentionInputError("decoding tensor attention takes no k2/v2 options (the cache holds one key and "
                                      "one value sequence); run the full forward instead")
        return super().step(run, state, q, k, v, scale=scale, impl=impl, options=options)

