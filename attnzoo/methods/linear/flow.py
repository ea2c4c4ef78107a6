"""Flow attention (Flowformer).

Queries are sinks, keys are sources, ``φ = sigmoid`` makes every flow
``φ(q_i)·φ(k_j)`` positive. Noncausal (self and cross), as in the official
``Flow_Attention``::

    I_i = φ(q_i)·Σ_j φ(k_j)              incoming flow of sink i
    O_j = φ(k_j)·Σ_i φ(q_i)              outgoing flow of source j
    Î_i = φ(q_i)·Σ_j φ(k_j) / O_j        conserved incoming flow (every source emits 1)
    Ô_j = φ(k_j)·Σ_i φ(q_i) / I_i        conserved outgoing flow (every sink receives 1)
    c_j = Nk · softmax_j(Ô_j)            competition among the sources
    a_i = sigmoid(Î_i · Nq / Nk)         allocation to the sinks
    o_i = a_i · Σ_j [φ(q_i)·φ(k_j) / I_i] c_j v_j

"Flowformer: Linearizing Transformers with Conservation Flows" (Wu et al.,
ICML 2022). Every ``/x`` is ``/(x + eps)``, ``eps = 1e-6``.

Causal self-attention, as in the official ``Flow_Attention_Causal``: every sum over
keys runs over ``j <= i``, every sum over queries over ``i <= j`` (the queries that
exist when source ``j`` arrives), and flows are normalised by the counts
``n_i`` (visible keys of row ``i``) and ``r_j = j + 1`` (queries up to ``j``)::

    I_i = φ(q_i)·Σ_{j<=i} φ(k_j)                    O_j = φ(k_j)·Σ_{i<=j} φ(q_i)
    Î_i = (1/n_i) Σ_{j<=i} φ(q_i)·φ(k_j) r_j / O_j   Ô_j = (1/r_j) Σ_{i<=j} φ(k_j)·φ(q_i) n_i / I_i
    c_j = n_j · exp(Ô_j) / Σ_{j'<=j} exp(Ô_j')       a_i = sigmoid(Î_i)
    o_i = a_i · Σ_{j<=i} [φ(q_i)·φ(k_j) / I_i] c_j v_j

With ``n_i = Nk`` and ``r_j = Nq`` the ``Î`` line is the noncausal ``Î_i · Nq/Nk``.
Every quantity of token ``t`` depends on tokens ``<= t`` only, so the causal form is
a recurrence with a constant-size state: ``Σφ(k)``, ``Σφ(q)``, ``Σ φ(k_j) r_j/O_j``,
``Σ φ(q_i) n_i/I_i`` (D each), the running ``log Σ exp(Ô)`` and
``S = Σ φ(k_j) c_j v_jᵀ`` (D × Dv), per query head.

Judgement calls:

* [J] The causal competition normalises ``exp(Ô_j)`` over the sources up to ``j``
  itself (times ``n_j``), exactly as the official causal code
  (``exp(Ô) / cumsum(exp(Ô)) * normal``), not over the sources visible to each row:
  each source's weight is then fixed when it arrives, the output is plain causal
  linear attention over ``c_j v_j`` (:func:`~attnzoo.kernels.linear_scan.causal_linear`),
  and ``c_j = n_j exp(Ô_j - logcumsumexp(Ô)_j)`` is stable for any ``Ô``
  (the exponent is never positive).
* [J] The official code clamps ``Ô`` to ``[-1, 1]`` "for stability"; the softmax and
  ``logcumsumexp`` here are stable without it, so it is off by default (``Ô >= 0``
  always). ``clamp=1.0`` reproduces the official behaviour.
* [J] ``eps`` is added to each denominator (``I + eps``, ``O + eps``); the official
  code instead adds it to both factors of the dot products. Counts ``n_i = 0`` (no
  visible key) give ``Î_i = 0`` and ``o_i = 0``.
* [J] ``φ`` is applied to the raw q and k, as in the official code: ``scale`` is
  accepted and unused.
* [J] Key padding: padded keys get ``φ(k_j) = 0`` and ``v_j = 0``, leave the
  competition softmax, and do not count in ``Nk`` / ``n_i``: a noncausal padded call
  equals the call with the padded keys removed. (Causal: the queries at padded
  positions still exist and still count in ``r_j``; only keys are padded.)
* [J] Causal cross-attention (``Nq != Nk``) is not supported: ``O_j`` needs the
  queries up to position ``j``, and with lower-right alignment the first ``Nk - Nq``
  keys have none (their outgoing flow is undefined, ``0 / 0``).
* [J] GQA: flows are per query head (``O_j`` sums the queries of that head), so keys
  and values are repeated to the query heads and the decoding state is per query head.

Time O(N D Dv) (+ O(N C D) causal); memory O(N·D + N·C) for ``chunk``
(``C`` = chunk), O(N²) for the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...errors import AttentionInputError, UnsupportedPattern
from ...kernels.caches import Decoder, RecurrentState
from ...kernels.common import compute_dtype, repeat_kv
from ...kernels.dense import masked_softmax
from ...kernels.linear_scan import DEFAULT_CHUNK, check_chunk, causal_linear, noncausal_linear
from ...registry import MethodOptions, method

#: Stand-in for ``Ô`` of a padded key in ``logcumsumexp``: ``Ô >= 0`` always, so
#: ``exp(-1e4 - Ô)`` is exactly 0 in float32 and float64 (no infinities anywhere).
_PAD_LOGIT = -1.0e4


@dataclass(frozen=True)
class FlowOptions(MethodOptions):
    """Options of ``flow``.

    Attributes:
        eps: added to every denominator.
        clamp: clamp ``Ô`` to ``[-clamp, clamp]`` (the official code uses 1.0; None = off).
        chunk: tokens per chunk of the causal scan (``chunk`` and decoding).
    """

    eps: float = 1e-6
    clamp: Optional[float] = None
    chunk: int = DEFAULT_CHUNK

    def validate(self) -> None:
        if self.clamp is not None and not self.clamp > 0:
            raise AttentionInputError(f"option clamp must be a positive number (or None), got {self.clamp!r}")
        check_chunk(self.chunk)


def _inputs(q, k, v, key_mask):
    """``φ(q)``, ``φ(k)``, ``v`` in the compute dtype, k/v repeated to the query heads,
    padded keys' features and values zeroed; and the real-key mask ``(B, 1, Nk)`` or None."""
    Hq = q.shape[1]
    ct = compute_dtype(q.dtype)
    fq = torch.sigmoid(q.to(ct))
    fk = torch.sigmoid(repeat_kv(k, Hq).to(ct))
    vv = repeat_kv(v, Hq).to(ct)
    real = None
    if key_mask is not None:
        real = key_mask.view(k.shape[0], 1, k.shape[2])
        fk = fk * real.unsqueeze(-1).to(ct)
        vv = vv * real.unsqueeze(-1).to(ct)
    return fq, fk, vv, real


def _check_causal(q, k):
    if q.shape[2] != k.shape[2]:
        raise UnsupportedPattern(
            f"flow attention has no causal cross form (q length {q.shape[2]} != k length {k.shape[2]}): "
            "the outgoing flow of a key needs the queries up to its position; it supports: "
            "noncausal_self, causal_self, noncausal_cross"
        )


def _clamp(o_hat, clamp):
    return o_hat if clamp is None else o_hat.clamp(-float(clamp), float(clamp))


@method("flow", short_impl="chunk", options=FlowOptions,
        summary="Flowformer: sigmoid features, flow conservation, source competition and sink allocation",
        paper="Flowformer: Linearizing Transformers with Conservation Flows",
        patterns=("noncausal_self", "causal_self", "noncausal_cross"), time="O(N D Dv)", memory="O(N·D + N·C)",
        masks=False, rows_independent=False)
def flow(q, k, v, call):
    """Flow attention with the explicit N×N flow matrix ``F_ij = φ(q_i)·φ(k_j)``.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    ``eps``: added to every denominator. ``clamp``: clamp ``Ô`` to ``[-clamp, clamp]``
    (the official code uses 1.0; None = off). The weights returned are the effective
    ``A_ij = a_i F_ij c_j / I_i`` (``o = A v``).
    """
    causal, eps, clamp = call.causal, call.options.eps, call.options.clamp
    if causal:
        _check_causal(q, k)
    fq, fk, vv, _ = _inputs(q, k, v, call.key_mask)
    Nq, Nk = q.shape[2], k.shape[2]
    flow = fq @ fk.transpose(-1, -2)  # F_ij: (B, Hq, Nq, Nk)
    allowed = call.masker.full()  # j <= i and key j real
    sees = flow.new_ones(1, 1, Nq, Nk) if allowed is None else allowed.to(flow.dtype)
    if not causal:
        real = sees[..., :1, :]  # (B|1, 1, 1, Nk): the real keys
        n_k = real.sum(-1, keepdim=True)  # (B|1, 1, 1, 1)
        incoming = flow.sum(-1, keepdim=True)  # I_i: (B, Hq, Nq, 1)
        outgoing = flow.sum(-2, keepdim=True)  # O_j: (B, Hq, 1, Nk)
        in_hat = (flow / (outgoing + eps)).sum(-1, keepdim=True)  # Î_i
        out_hat = _clamp((flow / (incoming + eps)).sum(-2, keepdim=True), clamp)  # Ô_j
        alloc = torch.sigmoid(in_hat * Nq / n_k.clamp(min=1))  # a_i
        compete = masked_softmax(out_hat, real.bool()) * n_k  # c_j: (B, Hq, 1, Nk)
    else:
        arrived = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).triu().to(flow.dtype)  # query i <= key j
        n = sees.sum(-1, keepdim=True)  # n_i: visible real keys of row i, (B|1, 1, N, 1)
        r = arrived.sum(0).view(1, 1, 1, Nk)  # r_j = j + 1
        incoming = (flow * sees).sum(-1, keepdim=True)  # I_i over j <= i
        outgoing = (flow * arrived).sum(-2, keepdim=True)  # O_j over i <= j
        in_hat = (flow * sees * r / (outgoing + eps)).sum(-1, keepdim=True) / n.clamp(min=1)
        out_hat = _clamp((flow * arrived * n / (incoming + eps)).sum(-2, keepdim=True) / r, clamp)
        alloc = torch.sigmoid(in_hat)
        # c_j = n_j · [softmax of Ô over the real sources j' <= j] evaluated at j'= j
        # (Nq == Nk: row j of `sees` is "source j' <= j and real")
        logits = out_hat.expand(*out_hat.shape[:2], Nk, Nk)  # row j, column j': Ô_j'
        soft = masked_softmax(logits, sees.bool().expand_as(logits))
        compete = (torch.diagonal(soft, dim1=-2, dim2=-1) * n.squeeze(-1)).unsqueeze(-2)  # (B, Hq, 1, Nk)
    weights = alloc * (flow * sees) / (incoming + eps) * compete  # A_ij
    out = (weights @ vv).to(q.dtype)
    return (out, weights.to(q.dtype)) if call.return_weights else out


# ------------------------------------------------------------------------------ fast


def _noncausal(fq, fk, vv, real, eps, clamp):
    Nq = fq.shape[2]
    ksum = fk.sum(2, keepdim=True)  # (B, H, 1, D)
    qsum = fq.sum(2, keepdim=True)
    incoming = (fq * ksum).sum(-1)  # I_i: (B, H, Nq)
    outgoing = (fk * qsum).sum(-1)  # O_j: (B, H, Nk)
    in_hat = (fq * (fk / (outgoing + eps).unsqueeze(-1)).sum(2, keepdim=True)).sum(-1)  # Î_i
    out_hat = _clamp((fk * (fq / (incoming + eps).unsqueeze(-1)).sum(2, keepdim=True)).sum(-1), clamp)  # Ô_j
    if real is None:
        n_k = float(fk.shape[2])
        compete = torch.softmax(out_hat, dim=-1) * n_k
    else:
        n_k = real.sum(-1, keepdim=True).to(fq.dtype)  # (B, 1, 1)
        compete = masked_softmax(out_hat, real) * n_k
        n_k = n_k.clamp(min=1)
    alloc = torch.sigmoid(in_hat * Nq / n_k)
    num = noncausal_linear(fq, fk, vv * compete.unsqueeze(-1))
    return num * (alloc / (incoming + eps)).unsqueeze(-1)


def _causal(fq, fk, vv, real, eps, clamp, chunk, state=None):
    """The causal form, continuing ``state`` (the tokens before these; decoding, so no
    padding) if given: prefix sums of D-vectors, ``logcumsumexp`` for the competition
    and the chunked causal kernel. Returns ``(out, (ksum, qsum, kw, qw, lse, S))``."""
    N = fq.shape[2]
    t0 = 0 if state is None else state.position
    r = torch.arange(t0 + 1, t0 + N + 1, device=fq.device, dtype=fq.dtype)  # r_t = t + 1 queries so far
    if real is None:
        m, n = None, r  # every key is real: n_t = r_t
    else:
        m = real.to(fq.dtype)  # (B, 1, N)
        n = torch.cumsum(m, dim=-1)  # n_t: real keys up to t

    def prefix(x, name):  # inclusive prefix sum along the tokens, continuing the state
        c = torch.cumsum(x, dim=2)
        return c if state is None else c + getattr(state, name).unsqueeze(2)

    ksum, qsum = prefix(fk, "ksum"), prefix(fq, "qsum")
    incoming = (fq * ksum).sum(-1)  # I_i = φ(q_i)·Σ_{j<=i} φ(k_j)
    outgoing = (fk * qsum).sum(-1)  # O_j = φ(k_j)·Σ_{i<=j} φ(q_i)
    kw = prefix(fk * (r / (outgoing + eps)).unsqueeze(-1), "kw")
    qw = prefix(fq * (n / (incoming + eps)).unsqueeze(-1), "qw")
    in_hat = (fq * kw).sum(-1) / n.clamp(min=1)  # Î_i
    out_hat = _clamp((fk * qw).sum(-1) / r, clamp)  # Ô_j
    logits = out_hat if m is None else torch.where(real, out_hat, out_hat.new_tensor(_PAD_LOGIT))
    lse = torch.logcumsumexp(logits, dim=-1)
    if state is not None:
        lse = torch.logaddexp(lse, state.lse.unsqueeze(-1))
    compete = n * torch.exp(logits - lse)  # c_j = n_j exp(Ô_j - log Σ_{j'<=j} exp(Ô_j')): exponent <= 0
    if m is not None:
        compete = compete * m
    num, S = causal_linear(fq, fk, vv * compete.unsqueeze(-1), chunk=chunk,
                           initial_state=None if state is None else state.S, return_state=True)
    out = num * (torch.sigmoid(in_hat) / (incoming + eps)).unsqueeze(-1)
    return out, (ksum[:, :, -1], qsum[:, :, -1], kw[:, :, -1], qw[:, :, -1], lse[..., -1], S)


@flow.impl("chunk", options=("chunk",),
           description="noncausal: sums of D-vectors, φ(K)ᵀV first; causal: prefix sums, logcumsumexp "
                       "competition and the chunked causal linear kernel")
def chunk_attention(q, k, v, call):
    """O(N) flow attention: sums (noncausal) or prefix sums of D-vectors, ``logcumsumexp``
    and the chunked causal linear kernel (causal); no N×N tensor."""
    o = call.options
    if call.causal:
        _check_causal(q, k)
    fq, fk, vv, real = _inputs(q, k, v, call.key_mask)
    if call.causal:
        out = _causal(fq, fk, vv, real, o.eps, o.clamp, o.chunk)[0]
    else:
        out = _noncausal(fq, fk, vv, real, o.eps, o.clamp)
    return out.to(q.dtype)


# -------------------------------------------------------------------------- decoding


@flow.decodes
class FlowDecoder(Decoder):
    """Decoding state per query head (a :class:`~attnzoo.kernels.caches.RecurrentState`,
    allocated at the first step): ``ksum = Σφ(k)``, ``qsum = Σφ(q)``,
    ``kw = Σ φ(k_j) r_j/O_j``, ``qw = Σ φ(q_i) n_i/I_i`` (B, Hq, D),
    ``lse = log Σ exp(Ô_j)`` (B, Hq), ``S = Σ φ(k_j) c_j v_jᵀ`` (B, Hq, D, Dv) and the
    number of tokens seen. Constant size in N."""

    state_size = "D·Dv + 4·D + 1 per query head, constant in N"
    options = ("chunk",)

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, options):
        return RecurrentState(ksum=None, qsum=None, kw=None, qw=None, lse=None, S=None)

    def step(self, run, state, q, k, v, *, scale, impl, options):
        """The next T tokens (causal self-attention) from the constant-size state (the
        registry's ``step`` checks that the shapes match the state's)."""
        fq, fk, vv, _ = _inputs(q, k, v, None)
        out, new = _causal(fq, fk, vv, None, options.eps, options.clamp, options.chunk,
                           None if state.S is None else state)
        state.ksum, state.qsum, state.kw, state.qw, state.lse, state.S = new
        state.position += q.shape[2]
        return out.to(q.dtype)
