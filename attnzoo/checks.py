"""Input checks of an attention call, and :class:`Call`, what an implementation receives.

The checks read metadata only (ranks, shapes, dtypes, devices), so they are always on
and cost microseconds. The NaN/Inf scan reads the data — a full pass, and a device
sync on a GPU — so it is opt-in: ``nan_policy="raise"`` per call, or for a block of
code ``with attnzoo.detect_nan(): ...`` (as ``torch.autograd.detect_anomaly``).

Every problem raises :class:`~attnzoo.errors.AttentionInputError` naming the argument,
the expected and the actual value.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple, Optional

import torch

from .errors import AttentionInputError, UnsupportedPattern, fmt_shape
from .kernels.masking import Masker, and_masks, tensor_mask
from .kernels.score_mods import compose as _compose
from .kernels.score_mods import tensor_bias

#: Process-wide defaults: ``nan_policy`` is "propagate" (no scan) or "raise".
config = {"nan_policy": "propagate"}

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

PATTERNS = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")


def pattern_name(causal: bool, cross: bool) -> str:
    return ("causal" if causal else "noncausal") + ("_cross" if cross else "_self")


@contextmanager
def detect_nan(enabled: bool = True) -> Iterator[None]:
    """Scan q, k, v of every attention call in the block for NaN/Inf and raise on one."""
    before = config["nan_policy"]
    config["nan_policy"] = "raise" if enabled else "propagate"
    try:
        yield
    finally:
        config["nan_policy"] = before


class Call(NamedTuple):
    """One attention call, checked: what an implementation's ``fn(q, k, v, call)`` and
    ``supports(call)`` receive.

    Shapes: ``batch, q_heads, kv_heads, q_len, kv_len, head_dim, v_dim``; ``dtype``,
    ``device``. Semantics: ``causal`` (lower-right when ``q_len != kv_len``), ``cross``,
    ``mask`` (None, a bool tensor broadcastable to ``(B, Hq, Nq, Nk)`` made 4-D, or a
    mask_mod), ``key_mask`` (None or ``(B, Nk)`` bool, True = real key), ``score_mod``
    (None or the caller's score_mod, e.g. a float mask), ``scale`` (a float),
    ``dropout_p``, ``return_weights``, ``requires_grad``. ``options``: the method's
    validated options (its options dataclass); ``given``: the option names the caller set.
    """

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_dim: int
    dtype: torch.dtype
    device: torch.device
    causal: bool
    cross: bool
    mask: Any
    key_mask: Optional[torch.Tensor]
    score_mod: Any
    scale: float
    dropout_p: float
    return_weights: bool
    requires_grad: bool
    options: Any
    given: tuple

    @property
    def pattern(self) -> str:
        return pattern_name(self.causal, self.cross)

    @property
    def offset(self) -> int:
        """``kv_len - q_len``: query ``i`` sits at key position ``i + offset``."""
        return self.kv_len - self.q_len

    @property
    def has_mask(self) -> bool:
        return self.mask is not None

    @property
    def masker(self) -> Masker:
        """The call's combined mask (causal, ``mask``, ``key_mask``), evaluated per block."""
        return Masker(causal=self.causal, mask=self.mask, key_mask=self.key_mask, batch=self.batch,
                      heads=self.q_heads, q_len=self.q_len, kv_len=self.kv_len, device=self.device)

    def replace(self, **changes) -> "Call":
        """A copy with some fields changed (e.g. a method running a kernel on new lengths)."""
        return self._replace(**changes)

    def __repr__(self) -> str:
        return (f"Call({self.pattern}, B={self.batch}, Hq={self.q_heads}, Hkv={self.kv_heads}, Nq={self.q_len}, "
                f"Nk={self.kv_len}, D={self.head_dim}, Dv={self.v_dim}, {self.dtype}, {self.device}, "
                f"options={self.options})")


def _check_tensor(name: str, t, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise AttentionInputError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != 4:
        raise AttentionInputError(f"{name} must be 4-D {layout}, got {t.dim()}-D tensor of shape {fmt_shape(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise AttentionInputError(
            f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {t.dtype}")


_FLOAT_SET = frozenset(FLOAT_DTYPES)


def check_qkv(q, k, v, *, gqa: bool = True) -> None:
    """Shapes, dtypes and devices of q ``(B, Hq, Nq, D)``, k ``(B, Hkv, Nk, D)``,
    v ``(B, Hkv, Nk, Dv)``."""
    # the common case in one expression (this runs on every call, every decoding step);
    # anything unusual falls through to the checks below, which say what is wrong
    if type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor:
        qs, ks, vs = q.shape, k.shape, v.shape
        if (len(qs) == 4 and len(ks) == 4 and len(vs) == 4 and q.dtype in _FLOAT_SET and q.dtype == k.dtype == v.dtype
                and qs[0] == ks[0] == vs[0] and ks[1] == vs[1] and ks[2] == vs[2] and ks[3] == qs[3]
                and ks[1] > 0 and qs[1] % ks[1] == 0 and (gqa or qs[1] == ks[1])
                and qs[0] and qs[2] and qs[3] and ks[2] and vs[3] and q.device == k.device == v.device):
            return
    _check_qkv_slow(q, k, v, gqa)


def _check_qkv_slow(q, k, v, gqa: bool) -> None:
    _check_tensor("q", q, "(B, Hq, Nq, D)")
    _check_tensor("k", k, "(B, Hkv, Nk, D)")
    _check_tensor("v", v, "(B, Hkv, Nk, Dv)")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionInputError(
            f"q, k, v must share one dtype, got q: {q.dtype}, k: {k.dtype}, v: {v.dtype}; "
            "cast them first (e.g. k.to(q.dtype))")
    if not (q.device == k.device == v.device):
        raise AttentionInputError(f"q, k, v must be on one device, got q: {q.device}, k: {k.device}, v: {v.device}")
    qs, ks, vs = q.shape, k.shape, v.shape
    if ks[0] != qs[0] or vs[0] != qs[0]:
        raise AttentionInputError(
            f"batch sizes differ: q {fmt_shape(q)}, k {fmt_shape(k)}, v {fmt_shape(v)}; expected the same B in dim 0")
    if ks[1] != vs[1]:
        raise AttentionInputError(
            f"k and v must have the same number of heads (dim 1), got k {fmt_shape(k)}, v {fmt_shape(v)}")
    if ks[2] != vs[2]:
        raise AttentionInputError(f"k and v must have the same length Nk (dim 2), got k {fmt_shape(k)}, v {fmt_shape(v)}")
    if ks[3] != qs[3]:
        raise AttentionInputError(
            f"q and k must have the same head dim D (dim 3), got q {fmt_shape(q)}, k {fmt_shape(k)}")
    Hq, Hkv = qs[1], ks[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise AttentionInputError(
            f"q heads must be a multiple of k/v heads (grouped-query attention), got Hq={Hq} (q {fmt_shape(q)}) "
            f"and Hkv={Hkv} (k {fmt_shape(k)})")
    if Hq != Hkv and not gqa:
        raise AttentionInputError(f"this method needs as many k/v heads as q heads, got Hq={Hq}, Hkv={Hkv}")
    if 0 in qs or 0 in ks or 0 in vs:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if 0 in t.shape:
                raise AttentionInputError(f"{name} is empty: shape {fmt_shape(t)}; every dimension must be >= 1")


def check_finite(q, k, v) -> None:
    """Raise if q, k or v holds NaN or Inf (a full pass over the data)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type == "meta":
            raise AttentionInputError(f"{name} is on the meta device, which holds no values to scan for NaN/Inf; "
                                      "pass nan_policy='propagate'")
        if not bool(torch.isfinite(t).all()):
            raise AttentionInputError(
                f"{name} contains NaN or Inf ({int((~torch.isfinite(t)).sum())} of {t.numel()} values); "
                "drop nan_policy='raise' (or leave attnzoo.detect_nan()) to let them propagate")


def _broadcastable(shape, target) -> bool:
    shape = (1,) * (len(target) - len(shape)) + tuple(shape)
    return all(s == 1 or s == t for s, t in zip(shape, target))


def check_mask(mask, B: int, Hq: int, Nq: int, Nk: int, device):
    """A bool tensor broadcastable to ``(B, Hq, Nq, Nk)`` (returned 4-D) or a mask_mod."""
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool:
            raise AttentionInputError(f"mask must be a bool tensor (True = may attend), got dtype {mask.dtype}")
        if mask.dim() > 4 or not _broadcastable(mask.shape, (B, Hq, Nq, Nk)):
            raise AttentionInputError(
                f"mask of shape {fmt_shape(mask)} does not broadcast to (B, Hq, Nq, Nk) = {fmt_shape((B, Hq, Nq, Nk))}")
        if mask.device != device:
            raise AttentionInputError(f"mask is on {mask.device} but q is on {device}")
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        return mask
    if not callable(mask):
        raise AttentionInputError(f"mask must be a bool tensor or a mask_mod function, got {type(mask).__name__}")
    return mask


def check_key_mask(key_mask, B: int, Nk: int, device, name: str = "key_mask") -> torch.Tensor:
    """A ``(B, Nk)`` bool tensor on ``device``."""
    if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
        raise AttentionInputError(
            f"{name} must be a bool tensor of shape (B, Nk) = {fmt_shape((B, Nk))}, "
            f"got {getattr(key_mask, 'dtype', type(key_mask).__name__)}")
    if tuple(key_mask.shape) != (B, Nk):
        raise AttentionInputError(f"{name} must have shape (B, Nk) = {fmt_shape((B, Nk))}, got {fmt_shape(key_mask)}")
    if key_mask.device != device:
        raise AttentionInputError(f"{name} is on {key_mask.device} but q is on {device}")
    return key_mask


def _top_left_causal(b, h, q_idx, kv_idx):
    """SDPA's ``is_causal`` for ``Nq != Nk``: query ``i`` sees keys ``j <= i`` (upper-left)."""
    return kv_idx <= q_idx


_top_left_causal.cache_key = ("top_left_causal",)


def sdpa_arguments(spec, q, k, attn_mask, mask, is_causal, causal, key_padding_mask, key_mask, score_mod,
                   enable_gqa):
    """SDPA's and ``nn.MultiheadAttention``'s arguments in attnzoo's terms: returns
    ``(causal, mask, key_mask, score_mod)``.

    * ``attn_mask`` (alias ``mask``): a bool tensor (True = may attend) or a mask_mod is a
      mask; a float tensor is added to the scores (a score_mod, for methods that take one).
    * ``is_causal``: SDPA's meaning — with ``Nq != Nk`` the mask is *upper-left* aligned
      (query ``i`` sees keys ``j <= i``); ``causal`` is attnzoo's lower-right alignment (what
      decoding with a cache needs). For ``Nq == Nk`` they are the same.
    * ``key_padding_mask``: ``nn.MultiheadAttention``'s meaning, ``(B, Nk)``, True = padding
      (ignored), or a float mask added to the scores; ``key_mask``: ``(B, Nk)``, True = a
      real key (the ``attention_mask`` of Hugging Face tokenizers).
    * ``enable_gqa``: as in SDPA, False refuses ``Hq != Hkv``; None (attnzoo's default)
      allows grouped-query attention.
    """
    B, Hq, Nq = q.shape[0], q.shape[1], q.shape[2]
    Hkv, Nk = k.shape[1], k.shape[2]
    if attn_mask is not None and mask is not None:
        raise AttentionInputError("give attn_mask or its alias mask, not both")
    m = attn_mask if attn_mask is not None else mask
    if isinstance(m, torch.Tensor) and m.is_floating_point():
        if not spec.score_mods:
            raise AttentionInputError(
                f"method {spec.name!r} cannot take a float attn_mask (an additive bias; its spec has "
                "score_mods=False); pass a bool mask (True = may attend) instead")
        if m.dim() > 4 or not _broadcastable(m.shape, (B, Hq, Nq, Nk)):
            raise AttentionInputError(
                f"attn_mask of shape {fmt_shape(m)} does not broadcast to (B, Hq, Nq, Nk) = {fmt_shape((B, Hq, Nq, Nk))}")
        if m.device != q.device:
            raise AttentionInputError(f"attn_mask is on {m.device} but q is on {q.device}")
        score_mod = _compose(tensor_bias(m), score_mod)
        m = None
    if is_causal is not True and is_causal is not False:
        raise AttentionInputError(f"is_causal must be a bool, got {is_causal!r}")
    if causal is None:
        causal = False
    if is_causal:
        if Nq == Nk:
            causal = True
        elif causal:
            raise AttentionInputError(
                f"is_causal=True (SDPA: upper-left aligned) and causal=True (attnzoo: lower-right aligned) disagree "
                f"for Nq={Nq} != Nk={Nk}; give one of them")
        else:
            if not spec.masks:
                raise AttentionInputError(
                    f"is_causal=True with Nq={Nq} != Nk={Nk} is SDPA's upper-left causal mask, and method "
                    f"{spec.name!r} takes no masks; pass causal=True for attnzoo's lower-right alignment")
            m = _top_left_causal if m is None else and_masks(
                _top_left_causal, tensor_mask(m) if isinstance(m, torch.Tensor) else m)
    if key_padding_mask is not None:
        if key_mask is not None:
            raise AttentionInputError("give key_padding_mask (True = padding) or key_mask (True = real key), not both")
        if isinstance(key_padding_mask, torch.Tensor) and key_padding_mask.is_floating_point():
            if tuple(key_padding_mask.shape) != (B, Nk):
                raise AttentionInputError(
                    f"key_padding_mask must have shape (B, Nk) = {fmt_shape((B, Nk))}, got {fmt_shape(key_padding_mask)}")
            if not spec.score_mods:
                raise AttentionInputError(
                    f"method {spec.name!r} cannot take a float key_padding_mask (an additive bias); pass a bool one "
                    "(True = padding)")
            score_mod = _compose(tensor_bias(key_padding_mask.view(B, 1, 1, Nk)), score_mod)
        else:
            key_mask = ~check_key_mask(key_padding_mask, B, Nk, q.device, "key_padding_mask")
    if enable_gqa is False and Hq != Hkv:
        raise AttentionInputError(
            f"enable_gqa=False but q has {Hq} heads and k/v {Hkv} (as in SDPA, grouped-query attention needs "
            "enable_gqa=True, or leave it None)")
    return causal, m, key_mask, score_mod


def make_call(spec, q, k, v, causal: bool, mask, key_mask, score_mod, scale, dropout_p: float,
              return_weights: bool, cross: Optional[bool], nan_policy: Optional[str], options, given) -> Call:
    """Check a call against ``spec`` (a :class:`~attnzoo.registry.MethodSpec`) and return
    its :class:`Call`. ``options`` are already validated by the spec."""
    if (mask is None and key_mask is None and score_mod is None and not dropout_p and not return_weights
            and scale is None and nan_policy is None and cross is None and (causal is True or causal is False)
            and type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor):
        # the common case (no mask, defaults) in one pass over the metadata: this runs on every
        # call and every decoding step; anything unusual takes the full path below, which
        # says what is wrong
        qs, ks, vs = q.shape, k.shape, v.shape
        dtype = q.dtype
        if (len(qs) == 4 and len(ks) == 4 and len(vs) == 4 and dtype in _FLOAT_SET and dtype == k.dtype == v.dtype
                and qs[0] == ks[0] == vs[0] and ks[1] == vs[1] and ks[2] == vs[2] and ks[3] == qs[3]
                and ks[1] > 0 and qs[1] % ks[1] == 0 and (spec.gqa or qs[1] == ks[1])
                and qs[0] and qs[2] and qs[3] and ks[2] and vs[3] and spec.query == "tokens"
                and config["nan_policy"] == "propagate"):
            device = q.device
            if device == k.device == v.device:
                B, Hq, Nq, D = qs
                cross = Nq != ks[2]
                if spec.allows(causal, cross):
                    requires_grad = (q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled()
                    return Call(B, Hq, ks[1], Nq, ks[2], D, vs[3], dtype, device, causal, cross, None, None, None,
                                D ** -0.5, 0.0, False, requires_grad, options, given)
    check_qkv(q, k, v, gqa=spec.gqa)
    B, Hq, Nq, D = q.shape
    ks = k.shape
    Hkv, Nk, Dv = ks[1], ks[2], v.shape[3]
    if causal is not True and causal is not False:
        raise AttentionInputError(f"causal must be a bool, got {causal!r}")
    if spec.query == "learned":
        if Nq != 1:
            raise AttentionInputError(
                f"method {spec.name!r} attends with one learned query per head: q must have shape (B, Hq, 1, D), "
                f"got {fmt_shape(q)}; it returns one output per key")
        cross = False if cross is None else cross
    if cross is None:
        cross = Nq != Nk
    if pattern_name(causal, cross) not in spec.patterns:
        raise UnsupportedPattern(
            f"method {spec.name!r} does not support the {pattern_name(causal, cross)} pattern "
            f"(q length {Nq}, k length {Nk}, causal={causal}); it supports: {', '.join(spec.patterns)}")
    if mask is not None:
        mask = check_mask(mask, B, Hq, Nq, Nk, q.device)
        if not spec.masks:
            raise AttentionInputError(
                f"method {spec.name!r} does not take a mask (its spec has masks=False); "
                "pass key_padding_mask (or key_mask) for padding")
    if key_mask is not None:
        key_mask = check_key_mask(key_mask, B, Nk, q.device, "key_mask")
    if score_mod is not None and not spec.score_mods:
        raise AttentionInputError(
            f"method {spec.name!r} cannot take a score_mod or a float mask (its spec has score_mods=False)")
    dropout_p = float(dropout_p)
    if not (0.0 <= dropout_p < 1.0):
        raise AttentionInputError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and not spec.dropout:
        raise AttentionInputError(f"method {spec.name!r} does not support attention dropout, got dropout_p={dropout_p}")
    if return_weights and not spec.weights:
        raise AttentionInputError(f"method {spec.name!r} cannot return attention weights (its spec has weights=False)")
    if scale is None:
        scale = D ** -0.5
    else:
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise AttentionInputError(f"scale must be a number, got {scale!r}") from None
        if scale != scale or scale in (float("inf"), float("-inf")):
            raise AttentionInputError(f"scale must be finite, got {scale}")
    policy = nan_policy or config["nan_policy"]
    if policy == "raise":
        if not torch.compiler.is_compiling():
            check_finite(q, k, v)
    elif policy != "propagate":
        raise AttentionInputError(f"nan_policy must be 'raise' or 'propagate', got {policy!r}")
    requires_grad = (q.requires_grad or k.requires_grad or v.requires_grad) and torch.is_grad_enabled()
    return Call(B, Hq, Hkv, Nq, Nk, D, Dv, q.dtype, q.device, causal, cross, mask, key_mask, score_mod, scale,
                dropout_p, bool(return_weights), requires_grad, options, given)
