"""The functional API: ``attention(q, k, v, method=..., causal=..., **options)``.

Layout (the layout of ``torch.nn.functional.scaled_dot_product_attention``)::

    q: (B, Hq, Nq, D)   k: (B, Hkv, Nk, D)   v: (B, Hkv, Nk, Dv)   ->   out: (B, Hq, Nq, Dv)

with ``Hq % Hkv == 0`` (grouped-query attention; ``Hkv == 1`` is MQA). "Causal"
with ``Nq != Nk`` is aligned lower-right: query ``i`` sees key ``j`` iff
``j <= i + (Nk - Nq)``.

Every input problem raises :class:`~attnzoo.errors.AttentionInputError` naming
the argument, the expected and the actual value, before any maths runs.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from . import registry
from .errors import AttentionInputError, UnsupportedImpl, UnsupportedPattern, closest, fmt_shape
from .registry import CallInfo, MethodSpec, pattern_name

#: What to do with NaN/Inf in q, k, v: "raise" (default) or "propagate" (skip the check,
#: e.g. for speed on an accelerator where the check forces a sync). Change it globally
#: with ``attnzoo.api.config["nan_policy"] = "propagate"`` or per call with ``nan_policy=``.
config = {"nan_policy": "raise"}

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
    **options,
):
    """Attention with any registered method.

    Args:
        q, k, v: ``(B, Hq, Nq, D)``, ``(B, Hkv, Nk, D)``, ``(B, Hkv, Nk, Dv)``.
        method: a registered method name (see :func:`attnzoo.methods`).
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
        nan_policy: ``"raise"`` or ``"propagate"`` (default ``config["nan_policy"]``).
        **options: method options (``spec.options``), e.g. ``softcap=30.0``.

    Returns:
        ``out: (B, Hq, Nq, Dv)`` in the dtype of ``q``, or ``(out, weights)``.
    """
    spec = registry.get(method)
    call = check_inputs(
        spec,
        q,
        k,
        v,
        causal=causal,
        mask=mask,
        key_padding_mask=key_padding_mask,
        dropout_p=dropout_p,
        return_weights=return_weights,
        cross=cross,
        nan_policy=nan_policy,
        options=options,
    )
    chosen = select_impl(spec, impl, call)
    if mask is not None and not isinstance(mask, torch.Tensor) and not chosen.mask_mod:
        from .masks import dense_mask

        mask = dense_mask(mask, call.batch, call.q_heads, call.q_len, call.kv_len, q.device)
    elif isinstance(mask, torch.Tensor):
        mask = normalize_mask(mask)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return chosen.fn(
        q,
        k,
        v,
        causal=causal,
        mask=mask,
        key_padding_mask=key_padding_mask,
        scale=float(scale),
        dropout_p=float(dropout_p),
        return_weights=return_weights,
        **{name: value for name, value in call.options.items() if name in chosen.options},
    )


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
        check_options(self.spec, options)
        self.method, self.impl, self.options = method, impl, options

    def forward(self, q, k, v, **kwargs):
        kwargs.setdefault("impl", self.impl)
        return attention(q, k, v, method=self.method, **{**self.options, **kwargs})

    def init_state(self, batch_size: int, kv_heads: int, head_dim: int, v_dim: int, **kwargs):
        from .decoding import init_state

        return init_state(self.method, batch_size, kv_heads, head_dim, v_dim, **{**self.options, **kwargs})

    def step(self, state, q, k, v, **kwargs):
        from .decoding import step

        return step(self.method, state, q, k, v, **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"method={self.method!r}, impl={self.impl!r}" + (", " + opts if opts else "")


# --------------------------------------------------------------------------- checks


def check_options(spec: MethodSpec, options: dict, known: Optional[dict] = None) -> dict:
    """Reject unknown option names (with a suggestion); return options with defaults filled.

    ``known``: the valid options and defaults (default ``spec.options``)."""
    known = spec.options if known is None else known
    for name in options:
        if name not in known:
            valid = ", ".join(sorted(known)) or "none"
            raise AttentionInputError(
                f"method {spec.name!r} has no option {name!r}.{closest(name, known)} Its options: {valid}"
            )
    return {**known, **options}


def _check_tensor(name: str, t, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise AttentionInputError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != 4:
        raise AttentionInputError(f"{name} must be 4-D {layout}, got {t.dim()}-D tensor of shape {fmt_shape(t)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise AttentionInputError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def check_qkv(q, k, v, *, gqa: bool = True) -> None:
    """Shapes, dtypes and devices of q, k, v (see the module docstring for the layout)."""
    _check_tensor("q", q, "(B, Hq, Nq, D)")
    _check_tensor("k", k, "(B, Hkv, Nk, D)")
    _check_tensor("v", v, "(B, Hkv, Nk, Dv)")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionInputError(
            f"q, k, v must share one dtype, got q: {q.dtype}, k: {k.dtype}, v: {v.dtype}; cast them first (e.g. k.to(q.dtype))"
        )
    if not (q.device == k.device == v.device):
        raise AttentionInputError(f"q, k, v must be on one device, got q: {q.device}, k: {k.device}, v: {v.device}")
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise AttentionInputError(
            f"batch sizes differ: q {fmt_shape(q)}, k {fmt_shape(k)}, v {fmt_shape(v)}; expected the same B in dim 0"
        )
    if k.shape[1] != v.shape[1]:
        raise AttentionInputError(f"k and v must have the same number of heads (dim 1), got k {fmt_shape(k)}, v {fmt_shape(v)}")
    if k.shape[2] != v.shape[2]:
        raise AttentionInputError(f"k and v must have the same length Nk (dim 2), got k {fmt_shape(k)}, v {fmt_shape(v)}")
    if k.shape[3] != D:
        raise AttentionInputError(f"q and k must have the same head dim D (dim 3), got q {fmt_shape(q)}, k {fmt_shape(k)}")
    Hkv = k.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise AttentionInputError(
            f"q heads must be a multiple of k/v heads (grouped-query attention), got Hq={Hq} (q {fmt_shape(q)}) "
            f"and Hkv={Hkv} (k {fmt_shape(k)})"
        )
    if Hq != Hkv and not gqa:
        raise AttentionInputError(f"this method needs as many k/v heads as q heads, got Hq={Hq}, Hkv={Hkv}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if 0 in t.shape:
            raise AttentionInputError(f"{name} is empty: shape {fmt_shape(t)}; every dimension must be >= 1")


def normalize_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask as a 4-D tensor broadcastable to (B, H, Nq, Nk)."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def check_inputs(
    spec: MethodSpec,
    q,
    k,
    v,
    *,
    causal: bool,
    mask=None,
    key_padding_mask=None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
    cross: Optional[bool] = None,
    nan_policy: Optional[str] = None,
    options: Optional[dict] = None,
) -> CallInfo:
    """Validate a call against the method's spec; return what impls need to decide."""
    check_qkv(q, k, v, gqa=spec.gqa)
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if not isinstance(causal, bool):
        raise AttentionInputError(f"causal must be a bool, got {causal!r}")
    if spec.query == "learned":
        if Nq != 1:
            raise AttentionInputError(
                f"method {spec.name!r} attends with one learned query per head: q must have shape (B, Hq, 1, D), "
                f"got {fmt_shape(q)}; it returns one output per key"
            )
        cross = False if cross is None else cross
    if cross is None:
        cross = Nq != Nk
    if not spec.supports_pattern(causal, cross):
        raise UnsupportedPattern(
            f"method {spec.name!r} does not support the {pattern_name(causal, cross)} pattern "
            f"(q length {Nq}, k length {Nk}, causal={causal}); it supports: {', '.join(spec.patterns)}"
        )
    if mask is not None:
        if isinstance(mask, torch.Tensor):
            if mask.dtype != torch.bool:
                raise AttentionInputError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
            if mask.dim() > 4 or not _broadcastable(mask.shape, (B, Hq, Nq, Nk)):
                raise AttentionInputError(
                    f"mask of shape {fmt_shape(mask)} does not broadcast to (B, Hq, Nq, Nk) = {fmt_shape((B, Hq, Nq, Nk))}"
                )
            if mask.device != q.device:
                raise AttentionInputError(f"mask is on {mask.device} but q is on {q.device}")
        elif not callable(mask):
            raise AttentionInputError(f"mask must be a bool tensor or a mask_mod function, got {type(mask).__name__}")
        if not spec.masks:
            raise AttentionInputError(
                f"method {spec.name!r} does not take a dense mask (its spec has masks=False); "
                "pass key_padding_mask for padding"
            )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise AttentionInputError(
                f"key_padding_mask must be a bool tensor of shape (B, Nk) = {fmt_shape((B, Nk))}, "
                f"got {getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}"
            )
        if tuple(key_padding_mask.shape) != (B, Nk):
            raise AttentionInputError(
                f"key_padding_mask must have shape (B, Nk) = {fmt_shape((B, Nk))}, got {fmt_shape(key_padding_mask)}"
            )
        if key_padding_mask.device != q.device:
            raise AttentionInputError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise AttentionInputError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and not spec.dropout:
        raise AttentionInputError(f"method {spec.name!r} does not support attention dropout, got dropout_p={dropout_p}")
    if return_weights and not spec.weights:
        raise AttentionInputError(f"method {spec.name!r} cannot return attention weights (its spec has weights=False)")
    policy = nan_policy or config["nan_policy"]
    if policy not in ("raise", "propagate"):
        raise AttentionInputError(f"nan_policy must be 'raise' or 'propagate', got {policy!r}")
    if policy == "raise" and not _is_tracing():
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not bool(torch.isfinite(t).all()):
                raise AttentionInputError(
                    f"{name} contains NaN or Inf ({int((~torch.isfinite(t)).sum())} of {t.numel()} values); "
                    "pass nan_policy='propagate' to skip this check"
                )
    opts = check_options(spec, options or {})
    requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return CallInfo(
        batch=B,
        q_heads=Hq,
        kv_heads=Hkv,
        q_len=Nq,
        kv_len=Nk,
        head_dim=D,
        v_dim=Dv,
        dtype=q.dtype,
        device=q.device,
        causal=causal,
        cross=cross,
        has_mask=mask is not None,
        mask_is_mod=mask is not None and not isinstance(mask, torch.Tensor),
        has_key_padding=key_padding_mask is not None,
        requires_grad=requires_grad,
        dropout_p=float(dropout_p),
        return_weights=return_weights,
        options=opts,
        given=tuple(options or {}),
    )


def _reason(impl, call: CallInfo) -> Optional[str]:
    """Why ``impl`` cannot serve ``call``, or None."""
    foreign = [name for name in call.given if name not in impl.options]
    if foreign:
        return f"it does not take the option(s) {', '.join(foreign)}"
    if call.return_weights and not impl.weights:
        return "it cannot return attention weights"
    return impl.supports(call)


def select_impl(spec: MethodSpec, impl: str, call: CallInfo):
    """The implementation that serves ``call``: the named one (or an error saying why it
    cannot), or for ``"auto"`` the first fast one that can, else the reference."""
    if impl == "auto":
        for candidate in spec.impls:
            if _reason(candidate, call) is None:
                return candidate
        reference = spec.get_impl("reference")
        reason = _reason(reference, call)
        if reason is not None:
            raise UnsupportedImpl(
                f"no implementation of method {spec.name!r} can serve this call (the reference: {reason}; "
                + "; ".join(f"{i.name}: {_reason(i, call)}" for i in spec.impls) + ")"
            )
        return reference
    if impl not in spec.impl_names:
        raise UnsupportedImpl(
            f"impl={impl!r} is not an implementation of method {spec.name!r}.{closest(impl, spec.impl_names)} "
            f"Choose from: 'auto', {', '.join(repr(n) for n in spec.impl_names)}"
        )
    chosen = spec.get_impl(impl)
    reason = _reason(chosen, call)
    if reason is not None:
        can = [i.name for i in [*spec.impls, spec.get_impl("reference")] if _reason(i, call) is None]
        raise UnsupportedImpl(
            f"impl={impl!r} of method {spec.name!r} cannot serve this call: {reason}. "
            f"Implementations that can: {', '.join(repr(c) for c in can)} (or impl='auto')"
        )
    return chosen


def _broadcastable(shape, target) -> bool:
    shape = (1,) * (len(target) - len(shape)) + tuple(shape)
    return all(s == 1 or s == t for s, t in zip(shape, target))


def _is_tracing() -> bool:
    # torch.compiler.is_compiling() is cheap; importing torch._dynamo to ask it would
    # cost ~1 s on the first call of a process (every benchmark worker)
    return torch.compiler.is_compiling() or torch.jit.is_tracing()

