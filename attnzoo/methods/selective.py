"""Selective attention: query- and position-dependent temperature.

    τ_i = t_i · (1 + α · log n_i)                 (inverse temperature of query i)
    O_i = softmax(τ_i · scale · q_i Kᵀ) (V ⊙ u)   (u_j: value temperature of key j)

"Selective Attention: Enhancing Transformer through Principled Context
Control" (Zhang et al., NeurIPS 2024), the Selective Self-Attention (SSA) layer.
Softmax treats every query alike; SSA gives each query its own inverse
temperature so it can control how sparse (spiky) or diffuse its attention is,
from its content (``t_i``) and its position (``α log n_i``, with ``n_i`` the
number of keys it can see — longer contexts need a lower temperature to avoid
attention dilution). A value temperature ``u_j`` lets the layer suppress
irrelevant or noisy tokens.

The functional form takes the temperatures as inputs:
``query_temperature`` ``(B, Hq, Nq, 1)``, ``value_temperature`` ``(B, Hkv, Nk, 1)``
and ``position_scale`` α (a float or ``(Hq,)``). :class:`SelectiveAttention`
(``attnzoo.build("selective", heads=..., head_dim=...)``) computes them with the
paper's light weight-shared parametrisation [J]: ``t_i = 1 + tanh(w_h · q_i)``,
``u_j = 2 · sigmoid(w'_h · v_j)`` and ``α_h = softplus(a_h)``, i.e. a few
parameters per head, initialised so the layer starts as plain softmax.

Because scaling the query row by τ_i scales its scores, the fast forms are the
softmax ones (``sdpa``, ``tiled``) run on ``τ ⊙ q`` and ``u ⊙ v``: exact, with
the same complexity as softmax attention (O(N² D) time).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..errors import AttentionInputError, fmt_shape
from ..registry import Impl, MethodSpec, register
from . import softmax
from ._common import compute_dtype, visible_counts


def _temperatures(q, v, causal, kv_len, query_temperature, value_temperature, position_scale, q_offset=0):
    """``τ ⊙ q`` and ``u ⊙ v`` for the given temperatures (computed in float32 or float64)."""
    B, Hq, Nq, _ = q.shape
    ct = compute_dtype(q.dtype)
    tau = None
    if query_temperature is not None:
        _check_temp("query_temperature", query_temperature, (B, Hq, Nq, 1))
        tau = query_temperature.to(ct)
    alpha = position_scale
    if isinstance(alpha, torch.Tensor) or alpha:
        n = visible_counts(causal, Nq, kv_len, q.device, dtype=ct)  # (Nq, 1)
        a = torch.as_tensor(alpha, device=q.device).to(ct)
        a = a.view(1, -1, 1, 1) if a.dim() == 1 else a
        pos = 1 + a * torch.log(n)
        tau = pos if tau is None else tau * pos
    if tau is not None:
        q = (q.to(ct) * tau).to(q.dtype)
    if value_temperature is not None:
        _check_temp("value_temperature", value_temperature, (B, v.shape[1], v.shape[2], 1))
        v = (v.to(ct) * value_temperature.to(ct)).to(v.dtype)
    return q, v


def _check_temp(name, t, shape):
    if not isinstance(t, torch.Tensor):
        raise AttentionInputError(f"{name} must be a tensor broadcastable to {fmt_shape(shape)}, got {type(t).__name__}")
    try:
        torch.broadcast_shapes(t.shape, shape)
    except RuntimeError:
        raise AttentionInputError(f"{name} of shape {fmt_shape(t)} does not broadcast to {fmt_shape(shape)}") from None
    if t.dim() > 4 or torch.broadcast_shapes(t.shape, shape) != torch.Size(shape):
        raise AttentionInputError(f"{name} of shape {fmt_shape(t)} does not broadcast to {fmt_shape(shape)}")


def reference(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
              return_weights=False, query_temperature: Optional[torch.Tensor] = None,
              value_temperature: Optional[torch.Tensor] = None, position_scale: Union[float, torch.Tensor] = 0.0):
    """Softmax of temperature-scaled scores with explicit N×N weights.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    q, v = _temperatures(q, v, causal, k.shape[2], query_temperature, value_temperature, position_scale)
    return softmax.reference(q, k, v, causal=causal, mask=mask, key_padding_mask=key_padding_mask, scale=scale,
                             dropout_p=dropout_p, return_weights=return_weights)


def _via(fast):
    def selective_fast(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                       return_weights=False, query_temperature=None, value_temperature=None, position_scale=0.0):
        q, v = _temperatures(q, v, causal, k.shape[2], query_temperature, value_temperature, position_scale)
        return fast(q, k, v, causal=causal, mask=mask, key_padding_mask=key_padding_mask, scale=scale,
                    dropout_p=dropout_p)

    selective_fast.__doc__ = f"Selective attention through softmax's ``{fast.__name__}``."
    return selective_fast


class SelectiveAttention(torch.nn.Module):
    """SSA's temperature modules with a handful of parameters per head; call it like
    the functional form: ``module(q, k, v, causal=..., mask=..., impl=...)``.

    Args:
        heads, kv_heads: query and key/value heads (``kv_heads`` defaults to ``heads``).
        head_dim: D. ``v_dim``: Dv (default D).
        value_temperature: learn the value temperature too (default True).
        position: learn the position term ``α_h log n`` (default True).
    """

    def __init__(self, heads: int, head_dim: int, kv_heads: Optional[int] = None, v_dim: Optional[int] = None,
                 value_temperature: bool = True, position: bool = True, impl: str = "auto"):
        super().__init__()
        kv_heads = kv_heads or heads
        self.heads, self.kv_heads, self.impl = heads, kv_heads, impl
        self.query_weight = torch.nn.Parameter(torch.zeros(heads, head_dim))
        self.value_weight = torch.nn.Parameter(torch.zeros(kv_heads, v_dim or head_dim)) if value_temperature else None
        # softplus(a) with a = -inf would be exactly 0; start small so the layer is ~softmax
        self.position_logit = torch.nn.Parameter(torch.full((heads,), -6.0)) if position else None

    def temperatures(self, q, v):
        """``(query_temperature (B, Hq, Nq, 1), value_temperature (B, Hkv, Nk, 1) | None, α (Hq,) | 0)``."""
        t = 1 + torch.tanh(torch.einsum("bhnd,hd->bhn", q, self.query_weight.to(q.dtype))).unsqueeze(-1)
        u = None
        if self.value_weight is not None:
            u = 2 * torch.sigmoid(torch.einsum("bhnd,hd->bhn", v, self.value_weight.to(v.dtype))).unsqueeze(-1)
        alpha = F.softplus(self.position_logit) if self.position_logit is not None else 0.0
        return t, u, alpha

    def forward(self, q, k, v, **kwargs):
        from ..api import attention

        t, u, alpha = self.temperatures(q, v)
        kwargs.setdefault("impl", self.impl)
        return attention(q, k, v, method="selective", query_temperature=t, value_temperature=u,
                         position_scale=alpha, **kwargs)

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None):
        return softmax.init_state(batch_size, kv_heads, head_dim, v_dim, dtype=dtype, device=device, max_len=max_len)

    def step(self, state, q, k, v, *, scale=None, impl="auto"):
        t, u, alpha = self.temperatures(q, v)
        return step(state, q, k, v, scale=q.shape[-1] ** -0.5 if scale is None else scale, impl=impl,
                    query_temperature=t, value_temperature=u, position_scale=alpha)


def init_state(batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None,
               query_temperature=None, value_temperature=None, position_scale=0.0):
    return softmax.init_state(batch_size, kv_heads, head_dim, v_dim, dtype=dtype, device=device, max_len=max_len)


def step(cache, q, k, v, *, scale, impl="auto", query_temperature=None, value_temperature=None, position_scale=0.0,
         num_splits=None):
    """Scale the new query by its temperature at its position (``n = cache length``)
    and the new values by theirs, then decode as softmax."""
    T = q.shape[2]
    L = cache.length + T
    # the new queries are the last T of an L-long causal sequence
    q, v = _temperatures(q, v, True, L, query_temperature, value_temperature, position_scale)
    return softmax.step(cache, q, k, v, scale=scale, impl=impl, num_splits=num_splits)


register(
    MethodSpec(
        name="selective",
        family="softmax-variant",
        summary="softmax with query/position-dependent temperature and value temperature (SSA)",
        paper="Selective Attention: Enhancing Transformer through Principled Context Control",
        reference=reference,
        impls=[
            Impl("sdpa", _via(softmax.sdpa_attention), description="softmax's SDPA on temperature-scaled q, v",
                 fudge=softmax.SDPA_FUDGE),
            Impl("tiled", _via(softmax.tiled_attention), mask_mod=True,
                 description="softmax's tiled path on temperature-scaled q, v"),
        ],
        exact=False,
        time="O(N^2 D)",
        memory="O(N·block) tiled, O(N^2) reference",
        learnable=True,
        dropout=True,
        decoding=True,
        step_impls=("kv", "split_k"),
        state_size="KV cache: 2·Hkv·N·D per sequence",
        module=SelectiveAttention,
        init_state=init_state,
        step=step,
        test_options={"position_scale": 0.5},
    )
)
