"""Decoding: the state-in, state-out protocol shared by every method with a causal form.

    state = init_state(method, batch_size, kv_heads, head_dim, v_dim, dtype=..., device=..., max_len=..., **options)
    out   = step(method, state, q, k, v, scale=..., impl=..., **options)

``step`` takes the new tokens' projections — ``q: (B, Hq, T, D)``, ``k: (B, Hkv, T, D)``,
``v: (B, Hkv, T, Dv)`` with ``T >= 1`` (``T > 1`` is a chunked prefill) — appends ``k, v``
to the state, and returns ``(B, Hq, T, Dv)``: exactly the last ``T`` rows of the causal
forward pass over everything seen so far. Each method's decoder (its spec's
``decoder``, built from :mod:`attnzoo.kernels.caches`) keeps a KV cache, a window or a
constant-size recurrent state. Dispatch only: ``init_state`` / ``step`` are the spec's
(:meth:`attnzoo.registry.MethodSpec.init_state`, :meth:`~attnzoo.registry.MethodSpec.step`).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import registry
from .kernels.caches import KVCache, RecurrentState, WindowCache  # noqa: F401  (the states, for users)
from .kernels.splitk import merge_partials, split_k_attention  # noqa: F401


def init_state(method: str, batch_size: int, kv_heads: int, head_dim: int, v_dim: Optional[int] = None, *,
               dtype=torch.float32, device=None, max_len: Optional[int] = None, **options):
    """A fresh decoding state for ``method`` (see the module docstring)."""
    return registry.get(method).init_state(batch_size, kv_heads, head_dim, v_dim, dtype=dtype, device=device,
                                           max_len=max_len, **options)


def step(method: str, state, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
         impl: str = "auto", **options) -> torch.Tensor:
    """Append ``k, v`` to ``state`` and attend the new queries ``q`` causally over
    everything so far. Shapes: ``q (B, Hq, T, D)``, ``k (B, Hkv, T, D)``, ``v (B, Hkv, T, Dv)``."""
    return registry.get(method).step(state, q, k, v, scale=scale, impl=impl, **options)
