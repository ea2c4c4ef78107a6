"""Reversed attention (DependencyViT): the softmax runs over the query axis.

    S = scale · Q Kᵀ                              (Nq × Nk)
    W_ij = exp(S_ij) / Σ_{i'} exp(S_i'j)          each key's column normalised over the queries
    O = W V                                       (a row of W need not sum to 1)

"Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention" (Ding
et al., CVPR 2023). In reversed attention a child token does not gather from the
others: it attends to its parents and *sends* its information to them "following a
normalized probability distribution" — each child's weights over the parents sum to
one, and a parent receives the messages of all the children that chose it, so the
attention matrix, read as child → parent, induces a dependency tree (a child's
largest weight names its parent). Here the parents are the output rows (queries) and
the children the keys/values: key j distributes its value over the queries with the
softmax of its column; ``O_i`` sums what query i receives. (DependencyViT writes it as
``Aᵀ V`` with the row softmax ``A = softmax(Q'K'ᵀ)`` of child queries Q' over parent
keys K'; with ``q = K'`` and ``k = Q'`` that is this.)

Judgement calls:

* [J] The reversed attention only: DependencyViT's message controller (a learned
  gate per child on its message) is a per-key factor on v (pass ``v * m``), and its
  pruning of leaf tokens (DependencyViT-Lite) is a token reduction
  (:mod:`attnzoo.layers.token_reduction`).
* [J] Masks and key padding: a masked pair gets weight 0 and leaves its key's column
  sum; a key whose column has nothing allowed (e.g. a padded key) sends nothing; a
  query that receives nothing gets zeros.
* [J] No causal form: a key's column sum runs over every query that sees it, later
  ones included, so a causal mask alone would still let later queries change earlier
  outputs. Cross-attention is natural (the children are the context's tokens).
* [J] GQA: every query head has its own columns over its k/v head's keys.
* [J] ``impl="auto"`` picks ``tiled`` (O(N) memory); the column sums make each output
  row depend on every query, so the method is not row-independent.

Complexity: time O(Nq·Nk·D); memory O(Nq·Nk) for the reference, O((Nq + Nk)·D) plus
one tile for ``tiled``.

Implementations:

* ``reference`` — the Nq × Nk scores, a masked softmax over the query axis (dim -2);
  can return W;
* ``tiled`` — two passes over tiles (each key's log-sum-exp over the queries, then the
  weighted sums), a custom backward recomputing the tiles (``dV = Wᵀ dO``,
  ``dS = W ⊙ (dO Vᵀ − δ)`` with ``δ_j = Σ_i W_ij (dO Vᵀ)_ij`` per query head): never Nq × Nk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...errors import AttentionInputError
from ...kernels.common import compute_dtype, repeat_kv
from ...kernels.dense import masked_softmax, scores
from ...kernels.masking import Masker, group_mask
from ...kernels.tiled import tile_sizes
from ...registry import MethodOptions, method

NAME = "reversed"


@dataclass(frozen=True)
class ReversedOptions(MethodOptions):
    """Options of ``reversed``.

    Attributes:
        block_q: query rows per tile of ``tiled`` (default: tiles of ~2 MiB).
        block_k: keys per tile of ``tiled`` (default 256).
    """

    block_q: Optional[int] = None
    block_k: Optional[int] = None

    def validate(self) -> None:
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AttentionInputError(f"{NAME}: {name} must be a positive int (or None), got {value!r}")


@method(NAME, short_impl="tiled", options=ReversedOptions,
        paper="Visual Dependency Transformers: Dependency Tree Emerges from Reversed Attention",
        summary="softmax over the query axis: each key distributes its value over the queries (DependencyViT)",
        patterns=("noncausal_self", "noncausal_cross"), time="O(Nq Nk D)", memory="O(N D) tiled; O(N^2) reference",
        rows_independent=False)
def reversed_attention(q, k, v, call):
    """Reversed attention with the explicit Nq × Nk matrix (the definition).

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv); weights: W.
    """
    ct = compute_dtype(q.dtype)
    s = scores(q, k, call.scale)  # (B, Hq, Nq, Nk)
    allowed = call.masker.full()
    W = masked_softmax(s.transpose(-1, -2), None if allowed is None else allowed.transpose(-1, -2)).transpose(-1, -2)
    out = (W @ repeat_kv(v, q.shape[1]).to(ct)).to(q.dtype)
    return (out, W.to(q.dtype)) if call.return_weights else out


# ----------------------------------------------------------------------------- tiled


def _tile(qb, kb, masker: Masker, qs, qe, ks, ke, Hkv, G):
    """Masked scores of one tile, grouped ``(B, Hkv, G, n, m)``; ``qb`` is pre-scaled."""
    s = qb @ kb.transpose(-1, -2).unsqueeze(2)
    allowed = masker.block(qs, qe, ks, ke)
    if allowed is not None:
        s = s.masked_fill(~group_mask(allowed, Hkv, G), float("-inf"))
    return s


class _TiledReversed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, masker, bq, bk):
        B, Hq, Nq, D = q.shape
        Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        G = Hq // Hkv
        ct = compute_dtype(q.dtype)
        qg = q.view(B, Hkv, G, Nq, D)
        # pass 1: each key's log-sum-exp over the queries (per query head)
        lse = torch.full((B, Hkv, G, Nk), float("-inf"), dtype=ct, device=q.device)
        for ks in range(0, Nk, bk):
            ke = min(Nk, ks + bk)
            kb = k[:, :, ks:ke].to(ct)
            for qs in range(0, Nq, bq):
                qe = min(Nq, qs + bq)
                s = _tile(qg[:, :, :, qs:qe].to(ct) * scale, kb, masker, qs, qe, ks, ke, Hkv, G)
                lse[..., ks:ke] = torch.logaddexp(lse[..., ks:ke], torch.logsumexp(s, dim=-2))
        lse_safe = lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-2)  # columns with nothing: W = 0
        # pass 2: O = W V
        out = torch.zeros(B, Hkv, G, Nq, Dv, dtype=ct, device=q.device)
        for qs in range(0, Nq, bq):
            qe = min(Nq, qs + bq)
            qb = qg[:, :, :, qs:qe].to(ct) * scale
            for ks in range(0, Nk, bk):
                ke = min(Nk, ks + bk)
                p = _tile(qb, k[:, :, ks:ke].to(ct), masker, qs, qe, ks, ke, Hkv, G).sub_(lse_safe[..., ks:ke]).exp_()
                out[:, :, :, qs:qe] += p @ v[:, :, ks:ke].to(ct).unsqueeze(2)
        ctx.save_for_backward(q, k, v, lse_safe)
        ctx.args = (scale, masker, bq, bk)
        return out.view(B, Hq, Nq, Dv).to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, lse_safe = ctx.saved_tensors
        scale, masker, bq, bk = ctx.args
        B, Hq, Nq, D = q.shape
        Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
        G = Hq // Hkv
        ct = compute_dtype(q.dtype)
        qg = q.view(B, Hkv, G, Nq, D)
        dog = dout.reshape(B, Hkv, G, Nq, Dv).to(ct)

        def probs(qb, qs, qe, ks, ke):
            s = _tile(qb, k[:, :, ks:ke].to(ct), masker, qs, qe, ks, ke, Hkv, G)
            return s.sub_(lse_safe[..., ks:ke]).exp_()

        # pass 1: dV = Wᵀ dO (summed over the group's query heads) and δ_j = Σ_i W_ij dP_ij
        # (= v_j · dV_j per query head), with dP = dO Vᵀ computed as in pass 2, so that
        # dS = W ⊙ (dP − δ) vanishes exactly where it must (a key seen by one query)
        dv = torch.zeros(B, Hkv, Nk, Dv, dtype=ct, device=q.device)
        delta = torch.zeros(B, Hkv, G, 1, Nk, dtype=ct, device=q.device)
        for qs in range(0, Nq, bq):
            qe = min(Nq, qs + bq)
            n = qe - qs
            qb = qg[:, :, :, qs:qe].to(ct) * scale
            dob = dog[:, :, :, qs:qe]
            for ks in range(0, Nk, bk):
                ke = min(Nk, ks + bk)
                p = probs(qb, qs, qe, ks, ke)
                dp = dob @ v[:, :, ks:ke].to(ct).transpose(-1, -2).unsqueeze(2)
                delta[..., ks:ke] += (p * dp).sum(-2, keepdim=True)
                dv[:, :, ks:ke] += p.reshape(B, Hkv, G * n, ke - ks).transpose(-1, -2) @ dob.reshape(B, Hkv, G * n, Dv)
        # pass 2: dS = W ⊙ (dO Vᵀ − δ), dQ = scale dS K, dK = scale dSᵀ Q
        dq = torch.zeros(B, Hkv, G, Nq, D, dtype=ct, device=q.device)
        dk = torch.zeros(B, Hkv, Nk, D, dtype=ct, device=q.device)
        for qs in range(0, Nq, bq):
            qe = min(Nq, qs + bq)
            n = qe - qs
            qraw = qg[:, :, :, qs:qe].to(ct)
            qb = qraw * scale
            dob = dog[:, :, :, qs:qe]
            for ks in range(0, Nk, bk):
                ke = min(Nk, ks + bk)
                kb, vb = k[:, :, ks:ke].to(ct), v[:, :, ks:ke].to(ct)
                p = probs(qb, qs, qe, ks, ke)
                ds = (dob @ vb.transpose(-1, -2).unsqueeze(2)).sub_(delta[..., ks:ke]).mul_(p)
                dq[:, :, :, qs:qe] += ds @ kb.unsqueeze(2)
                dk[:, :, ks:ke] += ds.reshape(B, Hkv, G * n, ke - ks).transpose(-1, -2) @ qraw.reshape(B, Hkv, G * n, D)
        need = ctx.needs_input_grad
        return ((dq * scale).view(B, Hq, Nq, D).to(q.dtype) if need[0] else None,
                (dk * scale).to(k.dtype) if need[1] else None,
                dv.to(v.dtype) if need[2] else None, None, None, None, None)


@reversed_attention.impl("tiled", options=("block_q", "block_k"),
                         description="two passes over tiles (column log-sum-exp, then W V), custom backward "
                                     "recomputing tiles: O(N·D) memory, never Nq×Nk")
def tiled(q, k, v, call):
    """Reversed attention over tiles, forward and backward: no Nq × Nk tensor."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    bq, bk = tile_sizes(B, Hq, Nq, Nk, call.options.block_q, call.options.block_k)
    return _TiledReversed.apply(q.contiguous(), k.contiguous(), v.contiguous(), float(call.scale), call.masker, bq, bk)
