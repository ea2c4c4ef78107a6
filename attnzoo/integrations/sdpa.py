"""``with attnzoo.use("linear", **options):`` — every ``scaled_dot_product_attention`` call
made inside runs through an attnzoo method, without editing the model.

A :class:`torch.overrides.TorchFunctionMode` sees each call of
``torch.nn.functional.scaled_dot_product_attention`` (nanoGPT-style models, Hugging Face's
``sdpa`` attention, ``nn.MultiheadAttention`` with ``need_weights=False``) and hands its
arguments — SDPA's, with SDPA's meaning (:func:`attnzoo.attention` takes them as they
are) — to the method. Other torch functions run untouched.

``nn.MultiheadAttention``: while the mode is active its C++ fast path is off (a mode
counts as a ``__torch_function__`` override), so it takes
``F.multi_head_attention_forward``, whose SDPA call is routed (for the length of that
call the module-level name ``F.scaled_dot_product_attention`` points at the method: not
thread-safe, like any such patch). With ``need_weights=True``
(its default) that function computes the softmax itself; the mode then raises rather
than silently leaving the layer on softmax: call it with ``need_weights=False``.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import registry
from ..api import attention
from ..errors import AttentionInputError

_SDPA = F.scaled_dot_product_attention
_MHA = F.multi_head_attention_forward


class use(TorchFunctionMode):  # noqa: N801 - used as ``with attnzoo.use(...)``, like torch's modes
    """Route every ``F.scaled_dot_product_attention`` call inside the block through ``method``.

    Args:
        method: a registered method name.
        impl: its implementation (default ``"auto"``).
        causal: override the calls' causality: None keeps each call's own ``is_causal`` /
            ``attn_mask``; True or False forces attnzoo's (lower-right) causal flag.
        **options: the method's options (checked now, not at the first call).

    The mode counts the calls it routed in ``calls``. Nested ``use`` blocks: the innermost wins.
    """

    def __init__(self, method: str, *, impl: str = "auto", causal: Optional[bool] = None, **options):
        super().__init__()
        self.spec = registry.get(method)
        self.spec.resolve_options(options)  # fail now with the closest-name error, not inside the model
        if impl != "auto" and impl not in self.spec.impl_names:
            raise AttentionInputError(f"impl={impl!r} is not an implementation of method {method!r}; choose from "
                                      f"'auto', {', '.join(repr(n) for n in self.spec.impl_names)}")
        self.method, self.impl, self.causal, self.options = method, impl, causal, options
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            return self._route(args, kwargs)
        if func is _MHA:
            need_weights = kwargs.get("need_weights", args[14] if len(args) > 14 else True)
            if need_weights:
                raise AttentionInputError(
                    f"nn.MultiheadAttention with need_weights=True (its default) computes the softmax itself, so "
                    f"attnzoo.use({self.method!r}) cannot route it; call it with need_weights=False")
            # the function calls SDPA by its module-level name, with this mode off (it is inside
            # the mode's handler): point that name at the method for the length of the call
            F.scaled_dot_product_attention = lambda *a, **kw: self._route(a, kw)
            try:
                return func(*args, **kwargs)
            finally:
                F.scaled_dot_product_attention = _SDPA
        return func(*args, **kwargs)

    def _route(self, args, kwargs):
        self.calls += 1
        if self.causal is not None:
            kwargs = {**kwargs, "is_causal": False, "causal": self.causal}
        return attention(*args, method=self.method, impl=self.impl, **self.options, **kwargs)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"attnzoo.use({self.method!r}, impl={self.impl!r}{opts})"


def routed(fn, method: str, **options):
    """``fn`` wrapped so that each call runs inside ``use(method, **options)``."""

    def wrapper(*args, **kwargs):
        with use(method, **options):
            return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    return wrapper


__all__ = ["use", "routed"]
