"""Every attention call of a model, intercepted without editing the model.

:func:`intercept` ``(model, handler)`` is a context manager; while it is open each
attention call of ``model`` goes through ``handler``, which sees the call's ``q, k, v``,
its output and (when it asks for them) its weights, and may replace both. Capture
(:mod:`~attnzoo.analysis.capture`) records; steering (:mod:`~attnzoo.analysis.steering`)
edits. Two kinds of model:

* **attnzoo layers** (:class:`attnzoo.layers.Attention`, e.g. the benchmark's task
  models): a forward pre-hook on the layer's method module (``layer.attn``) asks it for
  ``return_weights`` when a handler wants weights, and a forward hook hands the result
  to the handlers and returns what the caller asked for. Layer ``i`` is the ``i``-th
  ``Attention`` module in ``model.modules()`` order.
* **Hugging Face models**: the model's configs are switched, for the duration, to the
  attention implementation ``"attnzoo:analysis"`` (registered in transformers'
  ``AttentionInterface`` and, with SDPA's boolean masks, ``AttentionMaskInterface``).
  It runs the implementation the model had through
  :func:`attnzoo.integrations.hf.attention_forward` — softmax for ``eager`` / ``sdpa`` /
  flash, the method and options of an ``"attnzoo:<method>"`` key — so padding,
  causality, soft-capping and an attached ``attnzoo_module`` act as they do outside,
  and asks it for the weights only when a handler wants them. Layer ``i`` is the
  ``i``-th attention module called (for a stack of layers, layer ``i``). The configs
  get their implementation back on exit.

Sessions nest (a capture inside a steering context sees the steered weights): the
handlers of a call run in the order their sessions were entered.

A handler implements ``wants_weights(site) -> bool`` and ``__call__(site, q, k, v, out,
weights) -> (out, weights)`` with ``q (B, Hq, Nq, D)``, ``k, v (B, Hkv, Nk, ·)``, ``out
(B, Hq, Nq, Dv)`` and ``weights (B, Hq, Nq, Nk)`` or None; :class:`Site` says which call.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..api import MethodModule
from ..errors import AttentionInputError
from ..layers import Attention

KEY = "attnzoo:analysis"
#: transformers' own implementations that compute exact softmax attention.
SOFTMAX_KEYS = (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class Site:
    """One attention call: which layer, and what is needed to recompute its softmax weights.

    ``index``: the layer (see the module doc); ``name``: the module's qualified name;
    ``method``: the attnzoo method computing it; ``scale``; ``causal`` (lower-right);
    ``mask``: a bool (True = may attend) or float (added) tensor broadcastable to
    ``(B, Hq, Nq, Nk)``, or None; ``key_mask``: ``(B, Nk)``, True = a real key, or None;
    ``dense_softmax``: whether the weights are exactly ``softmax(scale·QKᵀ + mask)``, so a
    handler may recompute them itself, a chunk of queries at a time.
    """

    index: int
    name: str
    method: str
    scale: float
    causal: bool = False
    mask: Optional[torch.Tensor] = None
    key_mask: Optional[torch.Tensor] = None
    dense_softmax: bool = False


def softmax_weights(site: Site, q: torch.Tensor, k: torch.Tensor, rows: Optional[slice] = None) -> torch.Tensor:
    """The weights ``(B, Hq, R, Nk)`` of the query rows ``rows`` (default all) of a
    ``dense_softmax`` site, in float32 (float64 stays): ``O(R · Nk)`` memory per head."""
    from ..kernels.dense import masked_softmax

    Nq, Nk = q.shape[2], k.shape[2]
    rows = rows or slice(0, Nq)
    start, stop = rows.start or 0, min(rows.stop if rows.stop is not None else Nq, Nq)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc = q[:, :, start:stop].to(ct)
    kk = k.to(ct).repeat_interleave(q.shape[1] // k.shape[1], dim=1) if k.shape[1] != q.shape[1] else k.to(ct)
    s = (qc @ kk.transpose(-1, -2)) * site.scale
    allowed = None
    if site.mask is not None:
        m = site.mask
        m = m[..., start:stop, :] if m.dim() >= 2 and m.shape[-2] == Nq else m
        if m.dtype == torch.bool:
            allowed = m
        else:
            s = s + m.to(ct)
    elif site.causal:
        qi = torch.arange(start, stop, device=q.device)[:, None] + (Nk - Nq)
        allowed = torch.arange(Nk, device=q.device)[None, :] <= qi
    if site.key_mask is not None:
        km = site.key_mask.bool()[:, None, None, :]
        allowed = km if allowed is None else allowed & km
    return masked_softmax(s, None if allowed is None else allowed.expand_as(s))


def expand_heads(v: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, Hkv, N, ·)`` repeated to ``heads`` query heads (grouped-query attention)."""
    return v if v.shape[1] == heads else v.repeat_interleave(heads // v.shape[1], dim=1)


# ------------------------------------------------------------------------- sessions


class _Session:
    """One open :func:`intercept`: its handler and its layer numbering."""

    def __init__(self, handler):
        self.handler = handler
        self.order: dict = {}  # id(module) -> layer index (HF: first-call order)
        self.names: dict = {}

    def index(self, module) -> int:
        return self.order.setdefault(id(module), len(self.order))


def _run(entries, make_site, q, k, v, out, weights):
    for session, site in ((s, make_site(s)) for s in entries):
        out, weights = session.handler(site, q, k, v, out, weights)
    return out, weights


# ---------------------------------------------------------------- attnzoo layers

_LAYER_SESSIONS: dict = {}  # id(method module) -> [_Session]
_LAYER_HOOKS: dict = {}  # id(method module) -> (pre handle, post handle, caller-flag stack)


def attnzoo_layers(model: nn.Module) -> list:
    """``[(name, Attention)]`` of the attnzoo layers in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention)]


def _layer_site(session, layer_index, name, layer, q, kwargs) -> Site:
    mask = kwargs.get("attn_mask")
    mask = kwargs.get("mask") if mask is None else mask
    key_mask = kwargs.get("key_mask")
    if kwargs.get("key_padding_mask") is not None:
        key_mask = ~kwargs["key_padding_mask"].bool()
    scale = kwargs.get("scale") or q.shape[-1] ** -0.5
    dense = (layer.method == "softmax" and not callable(mask) and kwargs.get("score_mod") is None
             and not getattr(layer.attn, "options", {}))
    return Site(layer_index, name, layer.method, float(scale), bool(kwargs.get("causal", False)),
                mask if isinstance(mask, torch.Tensor) else None, key_mask, dense)


def _install_layer_hooks(layer_index, name, layer):
    inner = layer.attn
    stack: list = []

    def entries():
        return list(_LAYER_SESSIONS.get(id(inner), ()))

    def pre(module, args, kwargs):
        caller = bool(kwargs.get("return_weights", False))
        stack.append(caller)
        q = args[0] if args else kwargs["q"]
        need = any(s.handler.wants_weights(_layer_site(s, layer_index, name, layer, q, kwargs)) for s in entries())
        if need and not caller:
            kwargs = {**kwargs, "return_weights": True}
            if isinstance(module, MethodModule) and "impl" not in kwargs and module.impl != "auto":
                # a named impl (the task models train softmax with "sdpa") may not return weights;
                # "auto" picks one that does (every impl is tested equal to the reference)
                kwargs["impl"] = "auto"
        return args, kwargs

    def post(module, args, kwargs, output):
        caller = stack.pop()
        q, k, v = (list(args) + [kwargs.get(n) for n in ("q", "k", "v")][len(args):])[:3]
        out, weights = output if kwargs.get("return_weights") else (output, None)
        out, weights = _run(entries(), lambda s: _layer_site(s, layer_index, name, layer, q, kwargs), q, k, v, out,
                            weights)
        return (out, weights) if caller else out

    h1 = inner.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = inner.register_forward_hook(post, with_kwargs=True)
    _LAYER_HOOKS[id(inner)] = (h1, h2)


@contextlib.contextmanager
def _intercept_layers(model, session):
    layers = attnzoo_layers(model)
    for i, (name, layer) in enumerate(layers):
        session.order[id(layer.attn)] = i
        session.names[id(layer.attn)] = name
        lst = _LAYER_SESSIONS.setdefault(id(layer.attn), [])
        if not lst:
            _install_layer_hooks(i, name, layer)
        lst.append(session)
    try:
        yield
    finally:
        for _, layer in layers:
            lst = _LAYER_SESSIONS.get(id(layer.attn), [])
            if session in lst:
                lst.remove(session)
            if not lst:
                _LAYER_SESSIONS.pop(id(layer.attn), None)
                for h in _LAYER_HOOKS.pop(id(layer.attn), ()):
                    h.remove()


# ------------------------------------------------------------------ Hugging Face

_HF_SESSIONS: dict = {}  # id(config) -> [_Session]
_HF_ORIGINAL: dict = {}  # id(config) -> (config, its implementation before the first session)


def is_hf_model(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - depends on the environment
        return False
    return isinstance(model, PreTrainedModel)


def _base_of(key) -> tuple:
    """``(method, options)`` that compute the implementation ``key``."""
    if key in SOFTMAX_KEYS:
        return "softmax", {}
    from transformers import AttentionInterface

    from ..integrations.hf import attention_forward

    fn = AttentionInterface._global_mapping.get(key)
    if isinstance(fn, functools.partial) and fn.func is attention_forward:
        return fn.keywords["method"], dict(fn.keywords.get("options", {}))
    raise AttentionInputError(
        f"the model's attention implementation {key!r} is neither transformers' softmax (eager, sdpa, flash) nor an "
        "attnzoo backend; attnzoo.analysis cannot read its weights (load it with attn_implementation='eager' or "
        "'attnzoo:<method>')")


def _hf_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
                  **kwargs):
    """The ``"attnzoo:analysis"`` attention function (transformers' signature)."""
    from ..integrations.hf import attention_forward

    cfg = getattr(module, "config", None)
    entries = list(_HF_SESSIONS.get(id(cfg), ()))
    original = _HF_ORIGINAL.get(id(cfg), (None, None))[1]
    method, options = _base_of(original)
    caller = bool(kwargs.get("output_attentions"))
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    dense = method == "softmax" and not options and kwargs.get("softcap") is None and \
        (attention_mask is None or isinstance(attention_mask, torch.Tensor))

    def make_site(session):
        return Site(session.index(module), session.names.get(id(module), type(module).__name__), method, scale,
                    causal, attention_mask if isinstance(attention_mask, torch.Tensor) else None, None, dense)

    need = caller or any(s.handler.wants_weights(make_site(s)) for s in entries)
    kwargs = {**kwargs, "output_attentions": need}
    out, weights = attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                     method=method, options=options, **kwargs)
    if not entries:
        return out, weights
    o, weights = _run(entries, make_site, query, key, value, out.transpose(1, 2), weights)
    return o.transpose(1, 2).contiguous(), (weights if caller else None)


def register_hf() -> str:
    """Register the ``"attnzoo:analysis"`` implementation with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(KEY, _hf_attention)
    AttentionMaskInterface.register(KEY, sdpa_mask)
    return KEY


def _configs(model) -> list:
    """The distinct transformers configs of ``model`` and its submodules, parents first."""
    from transformers import PretrainedConfig

    found: dict = {}
    for m in model.modules():
        c = getattr(m, "config", None)
        if isinstance(c, PretrainedConfig):
            found.setdefault(id(c), c)

    def depth(c, seen=()):
        parents = [p for p in found.values() if p is not c and
                   any(getattr(p, k, None) is c for k in getattr(p, "sub_configs", {}) or {})]
        return 0 if not parents or id(c) in seen else 1 + max(depth(p, seen + (id(c),)) for p in parents)

    return sorted(found.values(), key=depth)


@contextlib.contextmanager
def _intercept_hf(model, session):
    register_hf()
    session.names.update({id(m): n for n, m in model.named_modules()})
    configs = _configs(model)
    for c in configs:
        if id(c) not in _HF_ORIGINAL:
            _base_of(c._attn_implementation)  # refuse now an implementation whose weights we cannot read
    entered = []
    try:
        for c in configs:
            lst = _HF_SESSIONS.setdefault(id(c), [])
            if not lst:
                _HF_ORIGINAL[id(c)] = (c, c._attn_implementation)
            lst.append(session)
            entered.append(c)
        for c in configs:
            c._attn_implementation = KEY
        yield
    finally:
        restore = []
        for c in entered:
            lst = _HF_SESSIONS.get(id(c), [])
            if session in lst:
                lst.remove(session)
            if not lst:
                _HF_SESSIONS.pop(id(c), None)
                restore.append(_HF_ORIGINAL.pop(id(c)))
        for c, key in restore:  # parents first: the setter also sets the sub-configs
            c._attn_implementation = key


@contextlib.contextmanager
def intercept(model: nn.Module, handler: Any):
    """Route every attention call of ``model`` through ``handler`` while the context is open
    (see the module doc). ``model``: a module with attnzoo :class:`~attnzoo.layers.Attention`
    layers, or a Hugging Face ``PreTrainedModel``."""
    session = _Session(handler)
    if attnzoo_layers(model):
        cm = _intercept_layers(model, session)
    elif is_hf_model(model):
        cm = _intercept_hf(model, session)
    else:
        raise AttentionInputError(
            f"{type(model).__name__} has no attnzoo Attention layers and is not a Hugging Face PreTrainedModel; "
            "attnzoo.analysis reads the attention of those two kinds of model")
    with cm:
        yield session
