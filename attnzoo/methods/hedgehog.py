"""Hedgehog: linear attention with trainable feature maps that mimic softmax.

    φ_h(x) = [softmax(W_h x + b_h), softmax(-(W_h x + b_h))]      (over the F features)
    o_i = φ(q_i)ᵀ Σ_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j φ(k_j)

"The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry"
(Zhang et al., ICLR 2024). Linear attentions lose softmax's two key properties —
low-entropy ("spiky") weights and dot-product monotonicity; Hedgehog recovers them
with a per-head single-layer MLP feature map trained so the linear-attention weights
match softmax's (a cross-entropy between the two weight matrices):
:func:`distill_hedgehog`. The paper writes the map with ``exp`` (``activation="exp"``);
its released code normalises with a softmax over the features
(``activation="softmax"``, the default [J]: the same up to a per-row factor, which
cancels in the attention normalisation for queries, and keeps the values bounded).

The functional form takes the map's parameters as options (``weight (H, D, F)``,
``bias (H, F)``; None = identity map); :class:`HedgehogAttention`
(``attnzoo.build("hedgehog", heads=..., head_dim=...)``) holds them. The attention
itself is ``linear``'s (chunked causal scan, ``φ(K)ᵀV`` first), so time O(N F Dv),
memory O(N·C + F·Dv), and decoding keeps a constant-size state.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import AttentionInputError, fmt_shape
from ..registry import Impl, MethodSpec, register
from . import _linear, linear


def feature_map(weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], activation: str = "softmax"):
    """Hedgehog's φ as a callable on ``(B, H, N, D)`` (``weight (H, D, F)``, ``bias (H, F)``)."""
    if activation not in ("softmax", "exp"):
        raise AttentionInputError(f"activation must be 'softmax' or 'exp', got {activation!r}")

    def phi(x):
        z = x if weight is None else torch.einsum("bhnd,hdf->bhnf", x, weight.to(x.dtype))
        if weight is not None and z.shape[1] != weight.shape[0]:  # pragma: no cover - einsum already checks
            raise AttentionInputError(f"weight {fmt_shape(weight)} does not match {z.shape[1]} heads")
        if bias is not None:
            z = z + bias.to(x.dtype).unsqueeze(-2)
        if activation == "softmax":
            return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)
        return torch.cat([torch.exp(z), torch.exp(-z)], dim=-1)

    return phi


def _check_params(q, weight, bias):
    H, D = q.shape[1], q.shape[3]
    if weight is not None and (weight.dim() != 3 or tuple(weight.shape[:2]) != (H, D)):
        raise AttentionInputError(f"weight must have shape (Hq, D, F) = ({H}, {D}, F), got {fmt_shape(weight)}")
    if bias is not None:
        F = D if weight is None else weight.shape[2]
        if tuple(bias.shape) != (H, F):
            raise AttentionInputError(f"bias must have shape (Hq, F) = ({H}, {F}), got {fmt_shape(bias)}")


def reference(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
              return_weights=False, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
              activation: str = "softmax", eps: float = 1e-6):
    """Explicit N×N weights ``φ(Q)φ(K)ᵀ`` normalised per row.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    _check_params(q, weight, bias)
    return linear.reference(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                            return_weights=return_weights, feature_map=feature_map(weight, bias, activation), eps=eps)


def chunk_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                    return_weights=False, weight=None, bias=None, activation="softmax", eps=1e-6,
                    chunk: int = _linear.DEFAULT_CHUNK):
    """``linear``'s chunked form with the Hedgehog feature map."""
    _check_params(q, weight, bias)
    return linear.chunk_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
                                  feature_map=feature_map(weight, bias, activation), eps=eps, chunk=chunk)


def init_state(batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None, weight=None,
               bias=None, activation="softmax", eps=1e-6, chunk=_linear.DEFAULT_CHUNK):
    return linear.LinearState()


def step(state, q, k, v, *, scale, impl="auto", weight=None, bias=None, activation="softmax", eps=1e-6,
         chunk=_linear.DEFAULT_CHUNK):
    return linear.step(state, q, k, v, scale=scale, feature_map=feature_map(weight, bias, activation), eps=eps,
                       chunk=chunk)


class HedgehogAttention(torch.nn.Module):
    """Hedgehog attention with its trainable per-head feature maps.

    Args:
        heads: query heads (k is repeated to them for GQA, and mapped per query head).
        head_dim: D. ``feature_dim``: F (default D; the map gives 2F features).
        activation: ``"softmax"`` (default) or ``"exp"``.
    """

    def __init__(self, heads: int, head_dim: int, kv_heads: Optional[int] = None, v_dim: Optional[int] = None,
                 impl: str = "auto", feature_dim: Optional[int] = None, activation: str = "softmax"):
        super().__init__()
        F = feature_dim or head_dim
        w = torch.eye(head_dim, F).repeat(heads, 1, 1) if F == head_dim else torch.randn(heads, head_dim, F) / math.sqrt(head_dim)
        self.weight = torch.nn.Parameter(w)
        self.bias = torch.nn.Parameter(torch.zeros(heads, F))
        self.activation, self.impl = activation, impl

    def forward(self, q, k, v, **kwargs):
        from ..api import attention

        kwargs.setdefault("impl", self.impl)
        return attention(q, k, v, method="hedgehog", weight=self.weight, bias=self.bias, activation=self.activation,
                         **kwargs)

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None):
        return linear.LinearState()

    def step(self, state, q, k, v, *, scale=None, impl="auto"):
        return step(state, q, k, v, scale=q.shape[-1] ** -0.5 if scale is None else scale, weight=self.weight,
                    bias=self.bias, activation=self.activation)


def softmax_weights(q, k, causal=False, scale=None):
    """Reference softmax attention weights ``(B, Hq, Nq, Nk)`` (the distillation target)."""
    from .softmax import reference as softmax_reference

    v = torch.zeros(k.shape[0], k.shape[1], k.shape[2], 1, dtype=q.dtype, device=q.device)
    return softmax_reference(q, k, v, causal=causal, scale=scale, return_weights=True)[1]


def attention_kl(target: torch.Tensor, weights: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean over rows of ``KL(target || weights)`` for row-stochastic ``(..., Nq, Nk)`` matrices."""
    t = target.clamp_min(0)
    kl = (t * (torch.log(t + eps) - torch.log(weights.clamp_min(0) + eps))).sum(-1)
    return kl.mean()


def distill_hedgehog(q: torch.Tensor, k: torch.Tensor, module: Optional[HedgehogAttention] = None, *,
                     causal: bool = False, steps: int = 300, lr: float = 0.05, feature_dim: Optional[int] = None,
                     activation: str = "softmax", progress: bool = False) -> dict:
    """Train Hedgehog feature maps so linear attention of ``q, k`` mimics their softmax weights.

    Minimises the cross-entropy ``-Σ_ij P_ij log Â_ij`` between softmax weights ``P`` and
    Hedgehog's ``Â`` (the paper's distillation loss) with Adam. ``q (B, Hq, N, D)``,
    ``k (B, Hkv, N, D)``. Returns ``{"module", "kl_before", "kl_after", "losses"}`` where the
    KLs are the mean row ``KL(P || Â)`` — the fidelity reached.
    """
    if module is None:
        module = HedgehogAttention(q.shape[1], q.shape[-1], k.shape[1], feature_dim=feature_dim,
                                   activation=activation).to(q.device)
    q, k = q.detach().float(), k.detach().float()
    target = softmax_weights(q, k, causal)
    v = torch.zeros(k.shape[0], k.shape[1], k.shape[2], 1, device=q.device)

    def current():
        return reference(q, k, v, causal=causal, weight=module.weight, bias=module.bias,
                         activation=module.activation, return_weights=True)[1]

    with torch.no_grad():
        kl_before = float(attention_kl(target, current()))
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = -(target * torch.log(current().clamp_min(1e-12))).sum(-1).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress and (i % max(1, steps // 10) == 0 or i == steps - 1):
            print(f"distill_hedgehog: step {i + 1}/{steps} cross-entropy {losses[-1]:.4f}")
    with torch.no_grad():
        kl_after = float(attention_kl(target, current()))
    return {"module": module, "kl_before": kl_before, "kl_after": kl_after, "losses": losses}


register(
    MethodSpec(
        name="hedgehog",
        family="linear",
        summary="linear attention with trainable softmax-mimicking feature maps [softmax(Wx), softmax(-Wx)]",
        paper="The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry",
        reference=reference,
        impls=[Impl("chunk", chunk_attention, description="linear's φ(K)ᵀV-first / chunked causal scan")],
        exact=False,
        time="O(N D^2)",
        memory="O(N D)",
        learnable=True,
        masks=False,
        decoding=True,
        state_size="2F·(Dv+1) per query head, constant in N",
        module=HedgehogAttention,
        init_state=init_state,
        step=step,
    )
)
