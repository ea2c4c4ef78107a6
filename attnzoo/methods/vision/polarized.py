"""Polarized self-attention (PSA): a channel-only and a spatial-only branch of sigmoid gates.

    per head, q̄ = the mean query over the (real) positions
    channel-only:  α = softmax_n(scale · u·k_n)   (u = a learned channel query, or q̄)
                   z = Σ_n α_n v_n ∈ R^Dv,   g_ch = sigmoid(LayerNorm(W_z z))      (one gate per channel)
    spatial-only:  g_sp[n] = sigmoid(softmax_c(q̄) · k_n)                          (one gate per position)
    parallel:      O_n = g_ch ⊙ v_n + g_sp[n] · v_n
    sequential:    O_n = g_sp[n] · (g_ch ⊙ v_n)

"Polarized Self-Attention: Towards High-quality Pixel-wise Regression" (Liu et al.,
2021). PSA keeps a high internal resolution in one dimension while completely
collapsing the other: the channel-only branch collapses the positions (a softmax
over all H·W positions of a one-channel query pools a C/2-channel value into one
vector, projected back to C channels by W_z, LayerNorm, sigmoid), the spatial-only
branch collapses the channels (the globally pooled C/2-channel query, softmaxed over
its channels, is dotted with every position's C/2-channel key, sigmoid); the
sigmoids give the Gaussian/binomial-like output distributions of pixel-wise
regression. Each branch's gates multiply the input X; the branches run in parallel
(summed) or in sequence.

How it maps onto q, k, v (B, H, N, D): v plays the gated input X (and the channel
branch's pooled values, which W_z maps back to the Dv channels), k the per-position
features both branches read (PSA's W_v^ch and W_v^sp), q the queries: its mean over
the positions is the spatial branch's pooled query (PSA's GAP of W_q^sp X), and,
unless a learned ``channel_query`` u is given (PSA's one-channel W_q^ch, a fixed
vector dotted with each key), the channel branch's query too.

Judgement calls:

* [J] The mapping above. Without parameters (the functional default) the channel
  query is q̄, W_z is the identity and the LayerNorm has no affine part;
  :class:`PolarizedAttention` learns u, W_z and the LayerNorm's affine parameters.
* [J] ``scale`` multiplies the channel branch's logits (PSA has no temperature; a
  learned u absorbs any); the spatial logits are unscaled, as in PSA (a convex
  combination of k's channels).
* [J] Sequential: PSA feeds the channel branch's output to the spatial branch's
  projections; with q and k given, the spatial gate from q and k multiplies the
  channel-gated v.
* [J] Key padding: padded positions leave the mean query and the channel softmax (a
  batch row with no real key gives zeros); their own output rows are gated like any
  other. General masks do not apply (no token-to-token weights): masks=False.
* [J] Self-attention only (the gates are per position of the gated v, and the output
  rows are those positions); no causal form (every gate pools over all positions).
  The grid does not enter: both poolings are global (grid-free).

Complexity: time O(N·(D + Dv)) per head (plus Dv² for W_z), memory O(N·Dv).

Implementations:

* ``reference`` — the formulas, k and v repeated to the query heads, the LayerNorm
  written out (mean and variance);
* ``fused`` — the grouped layout (no k/v copy for GQA), einsums and ``F.layer_norm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from ...errors import AttentionInputError, fmt_shape
from ...kernels.common import compute_dtype, repeat_kv
from ...kernels.dense import masked_softmax
from ...registry import MethodOptions, method

NAME = "polarized"
EPS = 1e-5  # nn.LayerNorm's


@dataclass(frozen=True)
class PolarizedOptions(MethodOptions):
    """Options of ``polarized``.

    Attributes:
        mode: ``"parallel"`` (PSA_p: the two branches summed), ``"sequential"`` (PSA_s:
            the spatial gate on the channel-gated values), ``"channel"`` or ``"spatial"``
            (one branch).
        channel_query: ``(Hq, D)``: the channel branch's learned query u (PSA's W_q^ch);
            None: the mean query.
        channel_weight: ``(Hq, Dv, Dv)``: W_z, applied to the pooled value; None: identity.
        norm_weight: ``(Hq, Dv)``: the LayerNorm's scale; None: 1.
        norm_bias: ``(Hq, Dv)``: the LayerNorm's shift; None: 0.
    """

    mode: Literal["parallel", "sequential", "channel", "spatial"] = "parallel"
    channel_query: Optional[torch.Tensor] = None
    channel_weight: Optional[torch.Tensor] = None
    norm_weight: Optional[torch.Tensor] = None
    norm_bias: Optional[torch.Tensor] = None


def _param(name, t, shape, ct, device):
    """A tensor option checked against ``shape``, in the compute dtype (or None)."""
    if t is None:
        return None
    if tuple(t.shape) != tuple(shape):
        raise AttentionInputError(f"{NAME}: {name} must have shape {fmt_shape(shape)}, got {fmt_shape(t)}")
    return t.to(device=device, dtype=ct)


def _params(q, v, o, ct):
    Hq, D, Dv = q.shape[1], q.shape[3], v.shape[3]
    return (_param("channel_query", o.channel_query, (Hq, D), ct, q.device),
            _param("channel_weight", o.channel_weight, (Hq, Dv, Dv), ct, q.device),
            _param("norm_weight", o.norm_weight, (Hq, Dv), ct, q.device),
            _param("norm_bias", o.norm_bias, (Hq, Dv), ct, q.device))


def _check_self(q, k):
    if q.shape[2] != k.shape[2]:
        raise AttentionInputError(
            f"{NAME} is self-attention: q and k must have the same length, got q {fmt_shape(q)} and k {fmt_shape(k)} "
            "(its gates are per position of v, and the output rows are those positions)")


def _empty_rows(out, key_mask):
    if key_mask is not None:
        empty = ~key_mask.any(-1)
        if bool(empty.any()):
            out = out.masked_fill(empty.view(-1, 1, 1, 1), 0.0)
    return out


# ------------------------------------------------------------------------ reference


@method(NAME, short_impl="fused", options=PolarizedOptions,
        paper="Polarized Self-Attention: Towards High-quality Pixel-wise Regression",
        summary="sigmoid gates on v: per channel (softmax over positions) and per position (softmax over channels)",
        patterns=("noncausal_self",), time="O(N (D + Dv))", memory="O(N Dv)", masks=False, weights=False,
        rows_independent=False)
def polarized(q, k, v, call):
    """PSA's two branches, written out (the definition).

    q: (B, Hq, N, D), k: (B, Hkv, N, D), v: (B, Hkv, N, Dv) -> (B, Hq, N, Dv).
    """
    _check_self(q, k)
    o = call.options
    ct = compute_dtype(q.dtype)
    B, Hq, N, D = q.shape
    u, W_z, gamma, beta = _params(q, v, o, ct)
    qc, kc, vc = q.to(ct), repeat_kv(k, Hq).to(ct), repeat_kv(v, Hq).to(ct)
    real = torch.ones(B, N, dtype=torch.bool, device=q.device) if call.key_mask is None else call.key_mask
    m = real.to(ct).view(B, 1, N, 1)
    q_mean = (qc * m).sum(2) / m.sum(2).clamp(min=1)  # (B, Hq, D): GAP of the queries
    out = 0
    g_ch = None
    if o.mode != "spatial":  # channel-only: collapse the positions
        query = q_mean if u is None else u.view(1, Hq, D).expand(B, Hq, D)
        logits = (kc * query.unsqueeze(2)).sum(-1) * call.scale  # (B, Hq, N)
        alpha = masked_softmax(logits, real.view(B, 1, N))  # over the real positions (none: zeros)
        z = (alpha.unsqueeze(-1) * vc).sum(2)  # (B, Hq, Dv)
        if W_z is not None:
            z = (W_z.unsqueeze(0) * z.unsqueeze(2)).sum(-1)  # W_z z
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        zn = (z - mu) / torch.sqrt(var + EPS)
        if gamma is not None:
            zn = zn * gamma
        if beta is not None:
            zn = zn + beta
        g_ch = torch.sigmoid(zn).unsqueeze(2)  # (B, Hq, 1, Dv)
        out = g_ch * vc
    if o.mode != "channel":  # spatial-only: collapse the channels
        s_hat = torch.softmax(q_mean, dim=-1)  # (B, Hq, D)
        g_sp = torch.sigmoid((kc * s_hat.unsqueeze(2)).sum(-1, keepdim=True))  # (B, Hq, N, 1)
        out = g_sp * (out if o.mode == "sequential" else vc) + (out if o.mode == "parallel" else 0)
    return _empty_rows(out, call.key_mask).to(q.dtype)


# ----------------------------------------------------------------------------- fused


@polarized.impl("fused", description="grouped layout (no k/v copy), einsums and F.layer_norm: O(N·(D+Dv))")
def fused(q, k, v, call):
    """The two branches in the grouped layout ``(B, Hkv, G, ...)``."""
    _check_self(q, k)
    o = call.options
    ct = compute_dtype(q.dtype)
    B, Hq, N, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    G = Hq // Hkv
    u, W_z, gamma, beta = _params(q, v, o, ct)
    qc, kc, vc = q.to(ct).view(B, Hkv, G, N, D), k.to(ct), v.to(ct)
    km = call.key_mask
    if km is None:
        q_mean = qc.mean(3)
    else:
        w = km.to(ct)
        q_mean = torch.einsum("bhgnd,bn->bhgd", qc, w) / w.sum(-1).clamp(min=1).view(B, 1, 1, 1)
    gate = None  # per channel, (B, Hkv, G, 1, Dv)
    if o.mode != "spatial":
        query = q_mean if u is None else u.view(1, Hkv, G, D)
        logits = torch.einsum("bhgd,bhnd->bhgn", query.expand(B, Hkv, G, D) * call.scale, kc)
        alpha = masked_softmax(logits, None if km is None else km.view(B, 1, 1, N))
        z = torch.einsum("bhgn,bhnv->bhgv", alpha, vc)
        if W_z is not None:
            z = torch.einsum("hgij,bhgj->bhgi", W_z.view(Hkv, G, Dv, Dv), z)
        zn = F.layer_norm(z, (Dv,), eps=EPS)
        if gamma is not None:
            zn = zn * gamma.view(Hkv, G, Dv)
        if beta is not None:
            zn = zn + beta.view(Hkv, G, Dv)
        gate = torch.sigmoid(zn).unsqueeze(3)
    v5 = vc.unsqueeze(2)  # (B, Hkv, 1, N, Dv)
    if o.mode == "channel":
        out = gate * v5
    else:
        g_sp = torch.sigmoid(torch.einsum("bhgd,bhnd->bhgn", torch.softmax(q_mean, dim=-1), kc)).unsqueeze(-1)
        if o.mode == "spatial":
            out = g_sp * v5
        elif o.mode == "sequential":
            out = (g_sp * gate) * v5
        else:
            out = (g_sp + gate) * v5
    return _empty_rows(out.reshape(B, Hq, N, Dv), km).to(q.dtype)


# --------------------------------------------------------------------------- module


@polarized.module_class
class PolarizedAttention(torch.nn.Module):
    """PSA with its learnable parts per head: the channel query u (PSA's W_q^ch), W_z and
    the LayerNorm's affine parameters; call it like the functional form:
    ``module(q, k, v, key_mask=...)``.

    Args:
        heads, kv_heads: query and key/value heads (``kv_heads`` defaults to ``heads``).
        head_dim: D. ``v_dim``: Dv (default D).
        mode: ``"parallel"``, ``"sequential"``, ``"channel"`` or ``"spatial"``.

    Initialisation: u ~ N(0, 1/D), W_z = identity, LayerNorm (1, 0).
    """

    def __init__(self, heads: int, head_dim: int, kv_heads: Optional[int] = None, v_dim: Optional[int] = None,
                 impl: str = "auto", mode: str = "parallel"):
        super().__init__()
        kv_heads = kv_heads or heads
        v_dim = v_dim or head_dim
        PolarizedOptions(mode=mode)  # fail now, not at the first forward
        self.heads, self.kv_heads, self.impl, self.mode = heads, kv_heads, impl, mode
        self.channel_query = torch.nn.Parameter(torch.randn(heads, head_dim) * head_dim ** -0.5)
        self.channel_weight = torch.nn.Parameter(torch.eye(v_dim).repeat(heads, 1, 1))
        self.norm_weight = torch.nn.Parameter(torch.ones(heads, v_dim))
        self.norm_bias = torch.nn.Parameter(torch.zeros(heads, v_dim))

    def forward(self, q, k, v, **kwargs):
        kwargs.setdefault("impl", self.impl)
        kwargs.setdefault("mode", self.mode)
        return polarized(q, k, v, channel_query=self.channel_query, channel_weight=self.channel_weight,
                         norm_weight=self.norm_weight, norm_bias=self.norm_bias, **kwargs)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kv_heads={self.kv_heads}, mode={self.mode!r}"
