"""``Attention``: a multi-head attention layer over any registered method.

Projections, grouped-query heads, rotary embeddings, QK-norm and the output gate
live here; the attention maths lives in the methods (``attnzoo/methods``).

    attn = Attention(dim=512, heads=8, kv_heads=2, method="softmax", causal=True, rotary=True)
    y = attn(x)                                  # self-attention, x: (B, N, dim)
    y = attn(x, context=memory)                  # cross-attention, memory: (B, M, context_dim)
    cache = attn.init_cache(batch_size=B)
    y_t = attn.step(x[:, t:t+1], cache)          # equals attn(x)[:, t:t+1]
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .. import registry
from ..api import build
from ..errors import AttentionInputError, UnsupportedPattern, closest, fmt_shape


_WARNED: set = set()


def _warn_causal_leak(spec) -> None:
    """Warn once per method that its causal form is not strictly causal."""
    if spec.name in _WARNED:
        return
    _WARNED.add(spec.name)
    warnings.warn(
        f"method {spec.name!r} is not strictly causal: {spec.causal_leak}. A causal model trained with it can read "
        "a little of the future; pass allow_causal_leak=True to Attention to silence this warning",
        CausalLeakWarning, stacklevel=3)


class CausalLeakWarning(UserWarning):
    """A causal layer uses a method whose key choice sees later tokens."""


def _check_module_options(spec, options: dict) -> None:
    """The options a learnable method's module takes: its constructor's (checked here, with
    the closest-name suggestion) — the module sets its call options itself."""
    import inspect

    ctor = set(inspect.signature(spec.module.__init__).parameters) - {"self", "heads", "kv_heads", "head_dim",
                                                                      "v_dim", "impl"}
    for name in options:
        if name not in ctor:
            raise AttentionInputError(
                f"method {spec.name!r} (module {spec.module.__name__}) has no constructor option {name!r}."
                f"{closest(name, ctor)} Its options: {', '.join(sorted(ctor)) or 'none'}")


class RotaryEmbedding(nn.Module):
    """Rotary position embedding ("RoFormer: Enhanced Transformer with Rotary Position
    Embedding"), rotate-half layout: channel ``i`` pairs with ``i + D/2``."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise AttentionInputError(f"rotary embeddings need an even head dim, got head_dim={head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, N, D), positions: (N,) -> x rotated by its positions."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # (N, D/2)
        cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)
        sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


@dataclass
class LayerCache:
    """Decoding state of one :class:`Attention` layer."""

    batch_size: int
    position: int = 0
    state: Any = None  # the method's state (self-attention)
    context_k: Optional[torch.Tensor] = None  # projected memory (cross-attention)
    context_v: Optional[torch.Tensor] = None
    context_key_mask: Optional[torch.Tensor] = None  # True = a real token
    extra: dict = field(default_factory=dict)


class Attention(nn.Module):
    """Multi-head attention with any registered method.

    Args:
        dim: model width of the input ``x: (B, N, dim)``.
        heads: query heads. ``kv_heads``: key/value heads (GQA; 1 = MQA; default ``heads``).
        dim_head: per-head width (default ``dim // heads``).
        method: a registered method name; ``impl``: its implementation (default ``"auto"``).
        causal: causal self-attention (and lower-right causal cross-attention).
        context_dim: width of the cross-attention memory (default ``dim``).
        rotary: rotary position embeddings on q and k (self-attention only).
        qk_norm: RMS-normalise q and k per head (a stabiliser the sigmoid-attention paper recommends).
        gate: gated attention ("Quantizable Transformers"): each head's output is multiplied
            by ``sigmoid(W_g x)``, letting a head output exactly nothing.
        dropout: attention dropout in training mode (methods that support it).
        bias: biases in the projections.
        allow_causal_leak: silence the warning a causal layer gives for a method whose
            causal form chooses keys with later tokens (its spec's ``causal_leak``).
        **method_options: options of the method (e.g. ``softcap=30.0``), or of its module's
            constructor for methods with parameters.

    Every argument and method option is checked here, at construction: a bad one raises
    :class:`~attnzoo.AttentionInputError` now, not at the first forward.
    """

    def __init__(self, dim: int, heads: int = 8, kv_heads: Optional[int] = None, dim_head: Optional[int] = None, *,
                 method: str = "softmax", causal: bool = False, context_dim: Optional[int] = None,
                 rotary: bool = False, rotary_base: float = 10000.0, qk_norm: bool = False, gate: bool = False,
                 dropout: float = 0.0, bias: bool = False, impl: str = "auto", allow_causal_leak: bool = False,
                 **method_options):
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("kv_heads", kv_heads), ("dim_head", dim_head),
                            ("context_dim", context_dim)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise AttentionInputError(f"{name} must be a positive int, got {value!r}")
        kv_heads = kv_heads or heads
        if heads % kv_heads:
            raise AttentionInputError(f"heads must be a multiple of kv_heads, got heads={heads}, kv_heads={kv_heads}")
        if dim_head is None:
            if dim % heads:
                raise AttentionInputError(
                    f"dim={dim} is not divisible by heads={heads}; pass dim_head= explicitly (the projections then "
                    f"map {dim} -> heads * dim_head) or choose heads dividing dim")
            dim_head = dim // heads
        if not (0.0 <= float(dropout) < 1.0):
            raise AttentionInputError(f"dropout must be in [0, 1), got {dropout}")
        self.dim, self.heads, self.kv_heads, self.dim_head = dim, heads, kv_heads, dim_head
        self.causal, self.dropout, self.method = causal, dropout, method
        self.spec = registry.get(method)
        if dropout and not self.spec.dropout:
            raise AttentionInputError(f"method {method!r} does not support attention dropout, got dropout={dropout}")
        if impl != "auto" and impl not in self.spec.impl_names:
            raise AttentionInputError(f"impl={impl!r} is not an implementation of method {method!r}; choose from "
                                      f"'auto', {', '.join(repr(n) for n in self.spec.impl_names)}")
        patterns = self.spec.patterns
        want = ("causal_self" if causal else "noncausal_self", "causal_cross" if causal else "noncausal_cross")
        if not any(p in patterns for p in want):
            raise UnsupportedPattern(f"method {method!r} has no {'causal' if causal else 'noncausal'} form; it "
                                     f"supports: {', '.join(patterns)}")
        if causal and self.spec.causal_leak and not allow_causal_leak:
            _warn_causal_leak(self.spec)
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, heads * dim_head, bias=bias)
        self.to_k = nn.Linear(context_dim, kv_heads * dim_head, bias=bias)
        self.to_v = nn.Linear(context_dim, kv_heads * dim_head, bias=bias)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=bias)
        self.rotary = RotaryEmbedding(dim_head, rotary_base) if rotary else None
        self.q_norm = nn.RMSNorm(dim_head, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(dim_head, eps=1e-6) if qk_norm else None
        self.gate = nn.Linear(dim, heads, bias=True) if gate else None
        if self.spec.module is not None:
            _check_module_options(self.spec, method_options)
            self.attn = build(method, heads=heads, kv_heads=kv_heads, head_dim=dim_head, v_dim=dim_head, impl=impl,
                              **method_options)
        else:
            self.attn = build(method, impl=impl, **method_options)

    # ------------------------------------------------------------------ projections
    def _split(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        B, N, _ = t.shape
        return t.view(B, N, heads, self.dim_head).transpose(1, 2)

    def _queries(self, x, positions):
        q = self._split(self.to_q(x), self.heads)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.rotary is not None and positions is not None:
            q = self.rotary(q, positions)
        return q

    def _keys_values(self, src, positions):
        k = self._split(self.to_k(src), self.kv_heads)
        v = self._split(self.to_v(src), self.kv_heads)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if self.rotary is not None and positions is not None:
            k = self.rotary(k, positions)
        return k, v

    def _output(self, x, out):
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(x)).transpose(1, 2).unsqueeze(-1)
        B, H, N, Dh = out.shape
        return self.to_out(out.transpose(1, 2).reshape(B, N, H * Dh))

    def _check_x(self, x, name="x", width=None):
        width = width or self.dim
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != width:
            shape = fmt_shape(x) if isinstance(x, torch.Tensor) else type(x).__name__
            raise AttentionInputError(f"{name} must have shape (B, N, {width}), got {shape}")

    # ---------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, *, attn_mask=None, mask=None,
                key_padding_mask: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None,
                return_weights: bool = False):
        """x: (B, N, dim); context: (B, M, context_dim) for cross-attention.

        ``attn_mask`` (alias ``mask``): bool broadcastable to (B, heads, N, M) (True = may
        attend), a float bias, or a mask_mod; ``key_padding_mask``: (B, M), True = padding
        (as in ``nn.MultiheadAttention``); ``key_mask``: (B, M), True = a real token.
        Returns (B, N, dim), or (y, weights) with ``return_weights``.
        """
        self._check_x(x)
        cross = context is not None
        if cross:
            self._check_x(context, "context", self.to_k.in_features)
        positions = None if cross else torch.arange(x.shape[1], device=x.device)
        q = self._queries(x, positions)
        k, v = self._keys_values(context if cross else x, positions)
        res = self.attn(q, k, v, causal=self.causal, attn_mask=attn_mask, mask=mask,
                        key_padding_mask=key_padding_mask, key_mask=key_mask,
                        dropout_p=self.dropout if self.training else 0.0, return_weights=return_weights, cross=cross)
        if return_weights:
            out, weights = res
            return self._output(x, out), weights
        return self._output(x, res)

    # --------------------------------------------------------------------- decoding
    def init_cache(self, batch_size: int, max_len: Optional[int] = None, *, context: Optional[torch.Tensor] = None,
                   context_padding_mask: Optional[torch.Tensor] = None, context_key_mask: Optional[torch.Tensor] = None,
                   dtype=None, device=None) -> LayerCache:
        """State for :meth:`step`. For cross-attention give the ``context`` once here; its
        keys and values are projected and kept. ``context_padding_mask``: (B, M), True =
        padding; ``context_key_mask``: (B, M), True = a real token."""
        p = self.to_q.weight
        dtype, device = dtype or p.dtype, device or p.device
        cache = LayerCache(batch_size)
        if context is not None:
            if self.causal:
                raise UnsupportedPattern(
                    "step() decodes noncausal cross-attention only: with causal=True the alignment of a new "
                    "query to the memory depends on the final query length; run the full forward instead"
                )
            if not self.spec.rows_independent:
                raise UnsupportedPattern(
                    f"method {self.method!r} computes each output row from the other queries too, or from its "
                    "position among them (its spec has rows_independent=False), so cross-attention cannot be "
                    "decoded one query at a time; run the full forward instead"
                )
            self._check_x(context, "context", self.to_k.in_features)
            cache.context_k, cache.context_v = self._keys_values(context, None)
            if context_padding_mask is not None and context_key_mask is not None:
                raise AttentionInputError("give context_padding_mask (True = padding) or context_key_mask "
                                          "(True = real token), not both")
            cache.context_key_mask = ~context_padding_mask if context_padding_mask is not None else context_key_mask
            return cache
        if not self.causal:
            raise UnsupportedPattern("step() needs a causal layer (causal=True) for self-attention decoding")
        if not self.spec.decoding:
            raise UnsupportedPattern(f"method {self.method!r} has no decoding form (its spec has decoding=False)")
        cache.state = self.attn.init_state(batch_size, self.kv_heads, self.dim_head, self.dim_head, dtype=dtype,
                                           device=device, max_len=max_len)
        return cache

    def step(self, x: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """Decode ``x: (B, T, dim)`` (usually T = 1) given everything before it in ``cache``;
        returns ``(B, T, dim)``, equal to the matching rows of the full forward pass."""
        self._check_x(x)
        if x.shape[0] != cache.batch_size:
            raise AttentionInputError(f"x has batch {x.shape[0]} but the cache was made for batch {cache.batch_size}")
        T = x.shape[1]
        if cache.context_k is not None:
            q = self._queries(x, None)
            out = self.attn(q, cache.context_k, cache.context_v, causal=False,
                            key_mask=cache.context_key_mask, cross=True)
            return self._output(x, out)
        positions = torch.arange(cache.position, cache.position + T, device=x.device)
        q = self._queries(x, positions)
        k, v = self._keys_values(x, positions)
        out = self.attn.step(cache.state, q, k, v)
        cache.position += T
        return self._output(x, out)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, dim_head={self.dim_head}, "
                f"method={self.method!r}, causal={self.causal}")
