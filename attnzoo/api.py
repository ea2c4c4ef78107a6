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
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    method: str = "softmax",
    causal: bool = False,
    mask: Union[torch.Tensor, Callable, None] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    impl: str = "auto",
    return_weights: bool = False,
    cross: Optional[bool] = None,
    nan_policy: Optional[str] = None,
    score_mod: Optional[Callable] = None,
    **options,
):
    """Attention with any registered method.

    Args:
        q, k, v: ``(B, Hq, Nq, D)``, ``(B, Hkv, Nk, D)``, ``(B, Hkv, Nk, Dv)``.
        method: a registered method name (see :func:`attnzoo.list_methods`).
        causal: causal masking, aligned lower-right when ``Nq != Nk``.
        mask: bool tensor broadcastable to ``(B, Hq, Nq, Nk)`` (True = may attend),
            or a mask_mod ``f(b, h, q_idx, kv_idx)`` (see :mod:`attnzoo.masks`).
        key_padding_mask: bool ``(B, Nk)``, True = real token.
        scale: score scale, default ``D ** -0.5``.
        dropout_p: attention dropout probability (methods whose spec allows it).
        impl: ``"auto"`` (best implementation that supports the call), ``"reference"``,
            or a fast implementation's name (``spec.impl_names``). A named impl that
            cannot serve the call raises :class:`UnsupportedImpl`; it never falls back.
        return_weights: also return the ``(B, Hq, Nq, Nk)`` attention weights.
        cross: whether this is cross-attention (default: ``Nq != Nk``). Only used
            to check the method supports the pattern.
        nan_policy: ``"raise"`` scans q, k, v for NaN/Inf first (a full pass over the
            data); ``"propagate"`` (the default, ``config["nan_policy"]``) does not.
        score_mod: a score_mod ``f(score, b, h, q_idx, kv_idx)`` applied to the scaled
            scores (methods whose spec has ``score_mods``).
        **options: method options (``spec.options``), e.g. ``softcap=30.0``.

    Returns:
        ``out: (B, Hq, Nq, Dv)`` in the dtype of ``q``, or ``(out, weights)``.
    """
    return registry.get(method).dispatch(q, k, v, causal, mask, key_padding_mask, scale, dropout_p, impl,
                                         return_weights, cross, nan_policy, score_mod, options)


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
