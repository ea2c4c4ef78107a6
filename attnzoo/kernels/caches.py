"""Decoding states and the decoders built on them.

The decoding protocol (:mod:`attnzoo.decoding`) is *state in, state out*::

    state = decoder.init_state(batch_size, kv_heads, head_dim, v_dim, dtype=..., device=..., max_len=..., options=...)
    out   = decoder.step(run, state, q, k, v, scale=..., impl=..., options=...)

``step`` takes the new tokens' projections — ``q: (B, Hq, T, D)``, ``k: (B, Hkv, T, D)``,
``v: (B, Hkv, T, Dv)`` — appends ``k, v`` to the state and returns ``(B, Hq, T, Dv)``:
exactly the last ``T`` rows of the causal forward pass over everything seen so far.
``run(q, k, v, causal=..., scale=..., options=...)`` is the method's own forward (no
input checks), which a cache-based decoder calls on the cached keys.

States: :class:`KVCache` (every key, growing), :class:`WindowCache` (sinks plus a
window, constant size) and :class:`RecurrentState` (a constant-size recurrent state).
Decoders: :class:`KVCacheDecoder` (any method whose rows are independent: the new
queries attend the whole cache causally) and :class:`Decoder`, the base a method
subclasses for its own state.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..errors import AttentionInputError, fmt_shape
from .dense import softmax_attention


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class KVCache:
    """Keys and values seen so far, in buffers ``(B, Hkv, capacity, D)`` that grow by
    doubling, so appending one token is amortised O(1) and the hot loop never
    reallocates. ``keys`` / ``values`` are views of the filled part."""

    def __init__(self, batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, capacity=None):
        cap = int(capacity or 256)
        self.k = torch.empty(batch_size, kv_heads, cap, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(batch_size, kv_heads, cap, v_dim, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if k.dtype != self.k.dtype:
            raise AttentionInputError(f"k has dtype {k.dtype} but the cache was made for {self.k.dtype}")
        if k.shape[:2] != self.k.shape[:2] or k.shape[3] != self.k.shape[3] or v.shape[3] != self.v.shape[3]:
            raise AttentionInputError(
                f"new k {fmt_shape(k)} / v {fmt_shape(v)} do not match the cache "
                f"(B, Hkv, *, D) = {fmt_shape(self.k.shape[:2] + (-1, self.k.shape[3]))}, Dv = {self.v.shape[3]}"
            )
        n = k.shape[2]
        need = self.length + n
        if need > self.capacity:
            cap = max(need, 2 * self.capacity)
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_empty(old.shape[0], old.shape[1], cap, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(self, name, new)
        self.k[:, :, self.length : need] = k
        self.v[:, :, self.length : need] = v
        self.length = need

    @property
    def keys(self) -> torch.Tensor:
        return self.k[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self.v[:, :, : self.length]

    def nbytes(self) -> int:
        return _nbytes(self.k, self.v) if self.length else 0


class WindowCache:
    """The first ``sinks`` tokens and the last ``window`` ones, with their global
    positions: ``window + sinks`` tokens, constant in the generated length."""

    def __init__(self, batch, kv_heads, head_dim, v_dim, window, sinks, dtype, device):
        self.window, self.sinks = int(window), int(sinks)
        self.k = torch.zeros(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, kv_heads, 0, v_dim, dtype=dtype, device=device)
        self.pos = torch.zeros(0, dtype=torch.long, device=device)  # global positions of the kept tokens
        self.length = 0  # tokens seen

    def nbytes(self) -> int:
        return _nbytes(self.k, self.v)

    @property
    def tokens(self) -> int:
        return self.k.shape[2]

    def attend(self, q, k, v, pattern: Callable, scale: float) -> torch.Tensor:
        """Append the T new tokens, attend the new queries over the kept tokens and the new
        ones with ``pattern`` (a mask_mod evaluated at global positions), then keep only the
        sinks and the last ``window`` tokens."""
        T, Hq = q.shape[2], q.shape[1]
        new_pos = torch.arange(self.length, self.length + T, device=q.device)
        keys = torch.cat([self.k, k], dim=2)
        values = torch.cat([self.v, v], dim=2)
        pos = torch.cat([self.pos, new_pos])
        heads = torch.arange(Hq, device=q.device).view(1, -1, 1, 1)
        allowed = pattern(0, heads, new_pos.view(1, 1, -1, 1), pos.view(1, 1, 1, -1))
        out = softmax_attention(q, keys, values, mask=allowed, scale=scale)
        kept = (pos < self.sinks) | (pos > self.length + T - 1 - self.window)
        self.k, self.v, self.pos = keys[:, :, kept], values[:, :, kept], pos[kept]
        self.length += T
        return out


class RecurrentState:
    """A constant-size recurrent state: named tensors (None until the first step) and the
    number of tokens seen (``position``)."""

    def __init__(self, **tensors):
        self.position = 0
        for name, value in tensors.items():
            setattr(self, name, value)
        self._names = tuple(tensors)

    def nbytes(self) -> int:
        return _nbytes(*(getattr(self, n) for n in self._names))

    def __repr__(self) -> str:
        parts = [f"{n}={tuple(getattr(self, n).shape) if isinstance(getattr(self, n), torch.Tensor) else None}"
                 for n in self._names]
        return f"RecurrentState(position={self.position}, {', '.join(parts)})"


class Decoder:
    """A method's decoding form. Subclass it and override :meth:`init_state` and :meth:`step`.

    Attributes:
        state_size: what the state holds, for tables (e.g. "KV cache: 2·Hkv·N·D").
        impls: named decoding implementations ``step(impl=...)`` accepts besides "auto".
        options: names of options only the decoder takes (e.g. ``num_splits``).
    """

    state_size: str = ""
    impls: tuple = ()
    options: tuple = ()

    def init_state(self, batch_size: int, kv_heads: int, head_dim: int, v_dim: int, *, dtype, device,
                   max_len: Optional[int], options):
        raise NotImplementedError

    def step(self, run: Callable, state, q, k, v, *, scale: float, impl: str, options):
        raise NotImplementedError


class KVCacheDecoder(Decoder):
    """Append to a :class:`KVCache`; the new queries attend the whole cache with the
    method's causal forward (lower-right aligned). Exact for any method whose output
    rows depend only on their own query and the keys."""

    state_size = "KV cache: 2·Hkv·N·D per sequence"

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, options):
        return KVCache(batch_size, kv_heads, head_dim, v_dim, dtype=dtype, device=device, capacity=max_len)

    def step(self, run, state, q, k, v, *, scale, impl, options):
        state.append(k, v)
        return run(q, state.keys, state.values, causal=True, scale=scale, options=options)
