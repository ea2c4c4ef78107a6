"""The functional API: ``attention(q, k, v, method=..., causal=..., **options)``.

Layout (the layout of ``torch.nn.functional.scaled_dot_product_attention``)::

    q: (B, Hq, Nq, D)   k: (B, Hkv, Nk, D)   v: (B, Hkv, Nk, Dv)   ->   out: (B, Hq, Nq, Dv)

with ``Hq % Hkv == 0`` (grouped-query attention; ``Hkv == 1`` is MQA). "Causal"
with ``Nq != Nk`` is aligned lower-right: query ``i`` sees key ``j`` iff
``j <= i + (Nk - Nq)``.

Dispatch only: the method's spec checks the call (:mod:`attnzoo.checks`), validates
its options once and runs the implementation it picks.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from . import registry
from .checks import config, detect_nan  # noqa: F401  (re-exported)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Union[torch.Tensor, Callable, None] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: Optional[bool] = None,
    *,
    method: str = "softmax",
    impl: str = "auto",
    causal: Optional[bool] = None,
    mask: Union[torch.Tensor, Callable, None] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    key_mask: Optional[torch.Tensor] = None,
    return_weights: bool = False,
    cross: Optional[bool] = None,
    nan_policy: Optional[str] = None,
    score_mod: Optional[Callable] = None,
    **options,
):
    """Attention with any registered method, called like
    ``torch.nn.functional.scaled_dot_product_attention``: a call written for SDPA runs
    unchanged with ``method=`` added.

    Args:
        query: ``(B, Hq, Nq, D)``.
        key: ``(B, Hkv, Nk, D)``.
        value: ``(B, Hkv, Nk, Dv)``.
        attn_mask: SDPA's: a bool tensor broadcastable to ``(B, Hq, Nq, Nk)`` (True = may
            attend), a float tensor added to the scores (methods with ``score_mods``), or
            a mask_mod ``f(b, h, q_idx, kv_idx)`` (:mod:`attnzoo.masks`). ``mask`` is an alias.
        dropout_p: attention dropout probability (methods whose spec allows it).
        is_causal: SDPA's causal mask: for ``Nq != Nk`` *upper-left* aligned, as in SDPA.
        scale: score scale, default ``D ** -0.5``.
        enable_gqa: as SDPA's (False refuses ``Hq != Hkv``); None, the default, allows
            grouped-query attention (``Hq`` a multiple of ``Hkv``).
        method: a registered method name (see :func:`attnzoo.list_methods`).
        impl: ``"auto"`` (best implementation that supports the call), ``"reference"``,
            or a fast implementation's name (``spec.impl_names``). A named impl that
            cannot serve the call raises :class:`UnsupportedImpl`; it never falls back.
        causal: attnzoo's causal mask, aligned *lower-right* when ``Nq != Nk`` (query ``i``
            sees key ``j`` iff ``j <= i + Nk - Nq``: what decoding with a cache needs).
        key_padding_mask: ``nn.MultiheadAttention``'s: ``(B, Nk)``, True = padding (ignored).
        key_mask: ``(B, Nk)``, True = a real key (a tokenizer's ``attention_mask``).
        return_weights: also return the ``(B, Hq, Nq, Nk)`` attention weights.
        cross: whether this is cross-attention (default: ``Nq != Nk``). Only used
            to check the method supports the pattern.
        nan_policy: ``"raise"`` scans q, k, v for NaN/Inf first (a full pass over the
            data); ``"propagate"`` (the default, ``config["nan_policy"]``) does not.
        score_mod: a score_mod ``f(score, b, h, q_idx, kv_idx)`` applied to the scaled
            scores (methods whose spec has ``score_mods``).
        **options: method options (``spec.options``), e.g. ``softcap=30.0``.

    Returns:
        ``out: (B, Hq, Nq, Dv)`` in the dtype of ``query``, or ``(out, weights)``.
    """
    return registry.get(method).dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                         causal, mask, key_padding_mask, key_mask, impl, return_weights, cross,
                                         nan_policy, score_mod, options)


def build(name: str, **options) -> torch.nn.Module:
    """A ready ``nn.Module`` for a method.

    Methods with parameters return their own module class (``spec.module``);
    the others return a :class:`MethodModule` that holds the options. Either way
    ``module(q, k, v, causal=..., mask=..., impl=...)`` runs the method and
    ``module.init_state`` / ``module.step`` decode (where the method can).
    """
    spec = registry.get(name)
    if spec.module is not None:
        return spec.module(**options)
    return MethodModule(name, **options)


class MethodModule(torch.nn.Module):
    """A parameter-free method with fixed options, as a module."""

    def __init__(self, method: str, impl: str = "auto", **options):
        super().__init__()
        self.spec = registry.get(method)
        self.spec.resolve_options(options)  # fail now, not at the first forward
        self.method, self.impl, self.options = method, impl, options

    def forward(self, q, k, v, **kwargs):
        kwargs.setdefault("impl", self.impl)
        return self.spec(q, k, v, **{**self.options, **kwargs})

    def init_state(self, batch_size: int, kv_heads: int, head_dim: int, v_dim: int, **kwargs):
        return self.spec.init_state(batch_size, kv_heads, head_dim, v_dim, **{**self.options, **kwargs})

    def step(self, state, q, k, v, **kwargs):
        return self.spec.step(state, q, k, v, **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"method={self.method!r}, impl={self.impl!r}" + (", " + opts if opts else "")
