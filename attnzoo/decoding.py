"""Decoding: the cache / recurrent-state protocol shared by all methods.

A method that has a causal form implements two functions and names them in its
:class:`~attnzoo.registry.MethodSpec`::

    state = spec.init_state(batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, **options)
    out   = spec.step(state, q, k, v, *, scale, impl, **options)

``step`` takes the new tokens' projections — ``q: (B, Hq, T, D)``,
``k: (B, Hkv, T, D)``, ``v: (B, Hkv, T, Dv)`` with ``T >= 1`` (``T > 1`` is a
chunked prefill) — appends ``k, v`` to the state, and returns
``(B, Hq, T, Dv)``: exactly the last ``T`` rows of the causal forward pass over
everything seen so far. Softmax-type methods keep a :class:`KVCache`; linear
methods keep a constant-size recurrent state.

Exact split-K decoding (:func:`split_k_attention`) is here too: the cached keys
are split into chunks, each chunk gives a partial softmax result with its
log-sum-exp, and the partials are merged exactly (LeanAttention /
flash-decoding).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import registry

from .api import check_options, check_qkv
from .registry import method_options
from .errors import AttentionInputError, fmt_shape


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
        return (self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()) if self.length else 0


def init_state(method: str, batch_size: int, kv_heads: int, head_dim: int, v_dim: Optional[int] = None, *,
               dtype=torch.float32, device=None, max_len: Optional[int] = None, **options):
    """A fresh decoding state for ``method`` (see the module docstring)."""
    spec = registry.get(method)
    _require_decoding(spec)
    opts = _options_for(spec, spec.init_state, options)
    return spec.init_state(batch_size, kv_heads, head_dim, v_dim or head_dim, dtype=dtype, device=device,
                           max_len=max_len, **opts)


def step(method: str, state, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
         impl: str = "auto", **options) -> torch.Tensor:
    """Append ``k, v`` to ``state`` and attend the new queries ``q`` causally over
    everything so far. Shapes: ``q (B, Hq, T, D)``, ``k (B, Hkv, T, D)``, ``v (B, Hkv, T, Dv)``."""
    spec = registry.get(method)
    _require_decoding(spec)
    check_qkv(q, k, v, gqa=spec.gqa)
    if spec.query == "learned":
        if q.shape[2] != 1:
            raise AttentionInputError(f"method {method!r} steps with its one learned query: q must be (B, Hq, 1, D), got {fmt_shape(q)}")
    elif q.shape[2] != k.shape[2]:
        raise AttentionInputError(
            f"step takes as many new queries as new keys, got q {fmt_shape(q)} and k {fmt_shape(k)} (dim 2)"
        )
    if impl != "auto" and impl not in spec.step_impls:
        from .errors import UnsupportedImpl, closest

        choices = ", ".join(repr(i) for i in ("auto", *spec.step_impls))
        raise UnsupportedImpl(f"method {method!r} has no decoding impl {impl!r}.{closest(impl, spec.step_impls)} "
                              f"Choose from: {choices}")
    shape = _check_shapes(state, q, k, v)
    opts = _options_for(spec, spec.step, options)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    out = spec.step(state, q, k, v, scale=scale, impl=impl, **opts)
    try:
        state._attnzoo_shape = shape  # bound once a step has succeeded
    except AttributeError:  # pragma: no cover - a state type that refuses attributes
        pass
    return out


def _check_shapes(state, q, k, v) -> tuple:
    """A state serves one (B, Hq, Hkv, D, Dv): the first successful step records it and
    later steps must match (a recurrent state would otherwise broadcast silently against
    another batch). Returns the call's shape."""
    shape = (q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3])
    bound = getattr(state, "_attnzoo_shape", None)
    if bound is not None and bound != shape:
        raise AttentionInputError(
            "this decoding state was made for (B, Hq, Hkv, D, Dv) = "
            f"{bound}, got {shape} (q {fmt_shape(q)}, k {fmt_shape(k)}, v {fmt_shape(v)})"
        )
    return shape


_PROTOCOL_KWARGS = ("dtype", "device", "max_len", "scale", "impl")


def _options_for(spec, fn, given: dict) -> dict:
    """The method options ``fn`` takes, defaults filled in; a name that is neither a
    method option nor one of ``fn``'s own (e.g. ``num_splits``) is an error."""
    own = {n: d for n, d in method_options(fn).items() if n not in _PROTOCOL_KWARGS}
    known = {**spec.options, **own}
    check_options(spec, given, known)
    return {name: given.get(name, default) for name, default in known.items() if name in own}


def _require_decoding(spec) -> None:
    if not spec.decoding or spec.step is None:
        from .errors import UnsupportedPattern

        raise UnsupportedPattern(f"method {spec.name!r} has no causal decoding form (its spec has decoding=False)")


# ----------------------------------------------------------------------------- split-K


def merge_partials(outs: torch.Tensor, lses: torch.Tensor, dim: int) -> torch.Tensor:
    """Merge partial softmax-attention results exactly.

    ``outs[..., s, :]`` is chunk ``s``'s normalised output and ``lses[..., s]`` its
    log-sum-exp of scores (``-inf`` for a chunk with nothing visible). The full
    result is ``sum_s exp(lse_s - lse) * out_s`` with ``lse = logsumexp_s lse_s``;
    rows with nothing visible anywhere give zeros.
    """
    lse = torch.logsumexp(lses, dim=dim, keepdim=True)
    weights = torch.exp(lses - lse.masked_fill(torch.isinf(lse), 0.0))
    weights = weights.masked_fill(torch.isinf(lses), 0.0)
    return (weights.unsqueeze(-1) * outs).sum(dim=dim)


def split_k_attention(q, k, v, *, scale: float, num_splits: Optional[int] = None, split_size: Optional[int] = None,
                      score_fn=None, allowed_fn=None) -> torch.Tensor:
    """Softmax attention of few queries over a long KV sequence, split along the keys.

    ``q (B, Hq, T, D)``, ``k (B, Hkv, L, D)``, ``v (B, Hkv, L, Dv)``. The keys are cut
    into ``num_splits`` chunks (or chunks of ``split_size``); all chunks are processed
    at once (on a GPU, in parallel) giving ``(out_s, lse_s)``, merged with
    :func:`merge_partials`. ``score_fn(s, key_idx)`` may modify scores (ALiBi,
    soft-capping); ``allowed_fn(key_idx) -> bool (T, L')`` masks them (causal for T > 1).
    """
    B, Hq, T, D = q.shape
    Hkv, L, Dv = k.shape[1], k.shape[2], v.shape[3]
    if split_size is None:
        splits = max(1, min(L, num_splits or max(1, L // 256)))
        split_size = -(-L // splits)
    splits = -(-L // split_size)
    pad = splits * split_size - L
    ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    G = Hq // Hkv
    qg = q.to(ct).view(B, Hkv, G, T, D)
    kc = torch.nn.functional.pad(k.to(ct), (0, 0, 0, pad)).view(B, Hkv, 1, splits, split_size, D)
    vc = torch.nn.functional.pad(v.to(ct), (0, 0, 0, pad)).view(B, Hkv, 1, splits, split_size, Dv)
    # scores per chunk: (B, Hkv, G, splits, T, split_size)
    s = torch.einsum("bhgtd,bhgscd->bhgstc", qg * scale, kc)
    key_idx = torch.arange(splits * split_size, device=q.device).view(splits, 1, split_size)
    if score_fn is not None:
        s = score_fn(s, key_idx)
    allowed = key_idx < L
    if allowed_fn is not None:
        allowed = allowed & allowed_fn(key_idx)
    s = s.masked_fill(~allowed, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - m.masked_fill(torch.isinf(m), 0.0))
    denom = p.sum(dim=-1, keepdim=True)
    out_s = torch.einsum("bhgstc,bhgscd->bhgstd", p, vc.expand(B, Hkv, 1, splits, split_size, Dv))
    out_s = out_s / denom.clamp(min=torch.finfo(ct).tiny)
    lse_s = (m + torch.log(denom)).squeeze(-1)  # -inf where nothing visible
    out = merge_partials(out_s.transpose(3, 4), lse_s.transpose(3, 4), dim=4)  # (B, Hkv, G, T, Dv)
    return out.reshape(B, Hq, T, Dv).to(q.dtype)
