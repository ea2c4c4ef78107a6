"""The method registry: one :class:`MethodSpec` per attention mechanism, declared once.

A method is one file, ``attnzoo/methods/<family>/<name>.py``; the folder is its family.
Its registration sits on its reference, the function that defines it::

    @dataclass(frozen=True)
    class WindowOptions(MethodOptions):
        window: int = 256

        @classmethod
        def for_length(cls, n):            # the options that make sense at length n
            return {"window": max(2, n // 4)}

    @method("sliding_window", options=WindowOptions, summary=..., paper=..., time="O(N w D)", memory="O(N w)")
    def sliding_window(q, k, v, call):     # the reference: q (B, Hq, Nq, D) ... -> (B, Hq, Nq, Dv)
        ...

    @sliding_window.impl("block", description="...")
    def block_attention(q, k, v, call):
        ...

``call`` is a :class:`~attnzoo.checks.Call`: the checked shapes and flags, the resolved
scale and the validated options (``call.options.window``). The spec itself is the
method's entry point: ``sliding_window(q, k, v, causal=True, window=64)`` checks the
input, validates the options once, picks the implementation and runs it — what
:func:`attnzoo.attention` does by name.

Method files are discovered from the folders of :mod:`attnzoo.methods`: no list to edit.
Everything else — :func:`attnzoo.attention`, :func:`attnzoo.build`, ``attnzoo list``,
the docs, the contract tests and the benchmark — reads the registry, so a method is
usable, documented, tested and benchmarked the moment its file exists.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .checks import PATTERNS, Call, check_qkv, make_call, pattern_name, sdpa_arguments
from .errors import AttentionInputError, UnknownMethod, UnsupportedImpl, UnsupportedPattern, closest, fmt_shape
from .kernels.caches import Decoder

__all__ = ["PATTERNS", "MethodOptions", "NoOptions", "Impl", "MethodSpec", "method", "register", "get",
           "list_methods", "pattern_name"]

# ---------------------------------------------------------------------------- options


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if tp is torch.Tensor:
        return "a tensor"
    if tp in (int, float, bool, str):
        return {"int": "an int", "float": "a number", "bool": "a bool", "str": "a string"}[tp.__name__]
    if origin in (tuple, list) or tp in (tuple, list):
        return "a tuple or list"
    return getattr(tp, "__name__", str(tp))


def _matches(value, tp) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (unknown annotations accept anything:
    the method's own ``validate`` checks those)."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is torch.Tensor:
        return isinstance(value, torch.Tensor)
    if origin in (tuple, list) or tp in (tuple, list):
        return isinstance(value, (tuple, list))
    if tp is typing.Callable or origin is typing.Callable or str(origin) == "collections.abc.Callable":
        return callable(value)
    return True


_HINTS: dict = {}


class MethodOptions:
    """Base of a method's options: subclass it as a ``@dataclass(frozen=True)``.

    Each field is an option with its default; its annotation is checked when the
    options are made (an ``int`` option refuses ``2.5`` and ``True``; ``Optional[...]``,
    ``Union[...]`` and ``Literal[...]`` work), then :meth:`validate` checks the values.
    The options are validated once per call, at the boundary; implementations read them
    as attributes (``call.options.window``).
    """

    def __post_init__(self) -> None:
        cls = type(self)
        hints = _HINTS.get(cls)
        if hints is None:
            hints = _HINTS[cls] = typing.get_type_hints(cls)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            tp = hints.get(f.name, Any)
            if not _matches(value, tp):
                raise AttentionInputError(f"option {f.name}={value!r} must be {_describe(tp)}")
        self.validate()

    def validate(self) -> None:
        """Check the values together (e.g. ``window >= 1``); raise AttentionInputError."""

    @classmethod
    def for_length(cls, n: int) -> dict:
        """The options a user would pick for sequences of about ``n`` tokens (windows,
        blocks, clusters sized so the method is really local or sparse at ``n``): the one
        sizing hook the tests, the benchmark and the tasks use. Default: none."""
        return {}

    @classmethod
    def names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class NoOptions(MethodOptions):
    """A method without options."""


# ------------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class Impl:
    """One implementation of a method: ``fn(q, k, v, call)`` with the reference's contract.

    ``supports(call) -> None | str``: None when it can serve the call, else why not
    (shown when the user asks for this impl by name; ``impl="auto"`` skips it quietly).
    ``options``: names of the method options only this implementation takes (e.g.
    tiled's ``block_q``); a call that sets one is served only by the impls that take it.
    ``weights``: it can return the attention weights. ``fudge``: tolerance factor of
    the three-way test rule (default: the spec's).
    """

    name: str
    fn: Callable
    supports: Optional[Callable[[Call], Optional[str]]] = None
    description: str = ""
    weights: bool = False
    fudge: Optional[float] = None
    options: tuple = ()


class MethodSpec:
    """Everything the library knows about one attention mechanism.

    Attributes:
        name: registry key, e.g. ``"softmax"``.
        family: the folder of its file under ``attnzoo/methods`` (``softmax``, ``linear``,
            ``local``, ``sparse``, ...).
        summary: one line for tables. ``paper``: title of the paper that defines it.
        reference: the defining implementation ``fn(q, k, v, call)`` (plain PyTorch that
            reads like the paper). ``impls``: the fast ones, in the order ``impl="auto"``
            tries them.
        options_cls: the options dataclass (a :class:`MethodOptions`).
        patterns: which of :data:`PATTERNS` the maths allows.
        exact: equals exact softmax attention (up to rounding).
        time / memory: complexity in sequence length N (and head dim D).
        masks: accepts dense boolean masks and mask_mods (otherwise only key padding).
        score_mods: accepts a caller's score_mod (e.g. a float additive mask).
        gqa: supports ``Hq`` a multiple of ``Hkv``. ``dropout``: attention dropout.
        grid: takes 2-D inputs with ``grid=(H, W)``. ``weights``: the reference can return
            the attention weights.
        decoder: a :class:`~attnzoo.kernels.caches.Decoder` (token-by-token decoding), or None.
        module: ``nn.Module`` class holding the method's parameters (built by
            :func:`attnzoo.build`), or None.
        fudge: tolerance factor of the three-way test rule.
        query: ``"tokens"`` (one query per position) or ``"learned"`` (one learned query per
            head, ``q (B, Hq, 1, D)``, one output per key: e.g. Aaren).
        rows_independent: each output row depends only on its own query and the keys.
            False when queries are pooled or normalised together (Agent, Flowformer) or a
            row's pattern depends on its aligned position (windows): such a method cannot
            decode cross-attention one query at a time.
        causal_leak: empty when the causal forms are strictly causal; otherwise why not
            (key choices that see later tokens). Checked both ways by the contract tests.
        mask_mods: the method's own mask_mod factories (re-exported by :mod:`attnzoo.masks`).
        short_impl: the implementation fastest at short lengths (tens to hundreds of
            tokens), which small models (the benchmark's tasks) train with; default the
            reference (the fast forms' blocking pays only at long lengths).
        layer_options: the :class:`~attnzoo.Attention` options the method's paper trains
            it with (e.g. sigmoid's QK-norm); the benchmark's task models use them, so each
            method is trained with its own recipe. ``Attention`` itself takes them only when
            asked.
    """

    def __init__(self, *, name: str, reference: Callable, summary: str, paper: str, family: Optional[str] = None,
                 options: type = NoOptions, impls=(), patterns: tuple = PATTERNS, exact: bool = False,
                 time: str = "O(N^2 D)", memory: str = "O(N^2)", masks: bool = True, score_mods: bool = False,
                 gqa: bool = True, dropout: bool = False, grid: bool = False, weights: bool = True,
                 decoder: Optional[Decoder] = None, module: Optional[type] = None, fudge: float = 3.0,
                 query: str = "tokens", rows_independent: bool = True, causal_leak: str = "",
                 mask_mods: tuple = (), short_impl: str = "reference", layer_options: Optional[dict] = None):
        unknown = set(patterns) - set(PATTERNS)
        if unknown:
            raise ValueError(f"{name}: unknown patterns {sorted(unknown)}; choose from {PATTERNS}")
        if not (isinstance(options, type) and issubclass(options, MethodOptions) and dataclasses.is_dataclass(options)):
            raise TypeError(f"{name}: options must be a MethodOptions dataclass, got {options!r}")
        self.name, self.summary, self.paper = name, summary, paper
        self.family = family or _family_of(reference)
        self.reference = reference
        self.options_cls = options
        self.impls: list = []
        self.patterns = tuple(patterns)
        self.exact, self.time, self.memory = exact, time, memory
        self.masks, self.score_mods, self.gqa, self.dropout = masks, score_mods, gqa, dropout
        self.grid, self.weights = grid, weights
        self.decoder = decoder
        self.module = module
        self.fudge, self.query = fudge, query
        self.rows_independent, self.causal_leak = rows_independent, causal_leak
        self.mask_mods = tuple(mask_mods)
        self.short_impl = short_impl
        self.layer_options = dict(layer_options or {})
        self._option_names = frozenset(options.names())
        self._pattern_table = {(c, x): pattern_name(c, x) in self.patterns for c in (False, True) for x in (False, True)}
        self._defaults = options()
        self._impl_only: frozenset = frozenset()
        self._reference_impl = Impl("reference", reference, description="the defining implementation",
                                    weights=weights)
        for i in impls:
            self._add_impl(i)
        if decoder is not None:
            self._refresh_impl_only()

    # ---------------------------------------------------------------- declaration
    def _add_impl(self, impl: Impl) -> Impl:
        names = [i.name for i in self.impls]
        if impl.name == "reference" or impl.name in names:
            raise ValueError(f"{self.name}: impl names must be unique and not 'reference', got {impl.name!r}")
        unknown = [o for o in impl.options if o not in self._option_names]
        if unknown:
            raise ValueError(f"{self.name}:{impl.name} names options its options class lacks: {unknown}")
        self.impls.append(impl)
        self._refresh_impl_only()
        return impl

    def _refresh_impl_only(self) -> None:
        own = {o for i in self.impls for o in i.options}
        if self.decoder is not None:
            own |= set(self.decoder.options)
        self._impl_only = frozenset(own)

    def impl(self, name: str, *, description: str, supports: Optional[Callable] = None, weights: bool = False,
             fudge: Optional[float] = None, options: tuple = ()):
        """Decorator: register ``fn(q, k, v, call)`` as the fast implementation ``name``."""

        def deco(fn):
            self._add_impl(Impl(name, fn, supports, description, weights, fudge, tuple(options)))
            return fn

        return deco

    def decodes(self, decoder):
        """Decorator (on a :class:`Decoder` subclass or instance): the method's decoding form."""
        self.decoder = decoder() if isinstance(decoder, type) else decoder
        unknown = [o for o in self.decoder.options if o not in self._option_names]
        if unknown:
            raise ValueError(f"{self.name}: the decoder names options its options class lacks: {unknown}")
        self._refresh_impl_only()
        return decoder

    def module_class(self, cls):
        """Decorator (on an ``nn.Module`` class): the module holding the method's parameters."""
        self.module = cls
        return cls

    # ------------------------------------------------------------------ properties
    @property
    def learnable(self) -> bool:
        return self.module is not None

    @property
    def decoding(self) -> bool:
        return self.decoder is not None

    @property
    def state_size(self) -> Optional[str]:
        return self.decoder.state_size if self.decoder is not None else None

    @property
    def step_impls(self) -> tuple:
        return tuple(self.decoder.impls) if self.decoder is not None else ()

    @property
    def options(self) -> dict:
        """The options and their defaults."""
        return self._defaults.as_dict()

    @property
    def impl_names(self) -> tuple:
        """All implementation names, ``"reference"`` first."""
        return ("reference",) + tuple(i.name for i in self.impls)

    def get_impl(self, name: str) -> Impl:
        if name == "reference":
            return self._reference_impl
        for i in self.impls:
            if i.name == name:
                return i
        raise KeyError(name)

    def impl_options(self, impl: Impl) -> tuple:
        """The option names ``impl`` takes."""
        return tuple(n for n in self.options_cls.names() if n not in self._impl_only or n in impl.options)

    def supports_pattern(self, causal: bool, cross: bool) -> bool:
        return pattern_name(causal, cross) in self.patterns

    def allows(self, causal: bool, cross: bool) -> bool:
        """:meth:`supports_pattern` from a table (it runs on every call)."""
        return self._pattern_table[(causal, cross)]

    def sized_options(self, n: int, *, module: bool = False) -> dict:
        """The options :meth:`MethodOptions.for_length` gives for length ``n``; with
        ``module=True`` only those the method's module constructor takes (a module sets
        its call options itself)."""
        sized = dict(self.options_cls.for_length(int(n)))
        return self.split_module_options(sized)[0] if module and self.module is not None else sized

    def split_module_options(self, options: dict) -> tuple:
        """``(constructor options, call options)`` for the method's module: the options its
        constructor takes (e.g. routing's ``num_clusters``) build it, the rest go to the call."""
        import inspect

        if self.module is None:
            return {}, dict(options)
        ctor = set(inspect.signature(self.module.__init__).parameters) - {"self", "heads", "kv_heads", "head_dim",
                                                                          "v_dim"}
        return ({n: v for n, v in options.items() if n in ctor}, {n: v for n, v in options.items() if n not in ctor})

    # --------------------------------------------------------------------- calling
    def resolve_options(self, given: dict) -> MethodOptions:
        """The validated options: unknown names get the closest-name error, values are
        checked by the options class."""
        if not given:
            return self._defaults
        for name in given:
            if name not in self._option_names:
                valid = ", ".join(sorted(self._option_names)) or "none"
                raise AttentionInputError(
                    f"method {self.name!r} has no option {name!r}.{closest(name, self._option_names)} "
                    f"Its options: {valid}")
        try:
            return self.options_cls(**given)
        except AttentionInputError as e:
            raise AttentionInputError(f"method {self.name!r}: {e}") from None

    def check(self, q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, scale=None,
              enable_gqa: Optional[bool] = None, *, causal: Optional[bool] = None, mask=None, key_padding_mask=None,
              key_mask=None, score_mod=None, return_weights: bool = False, cross: Optional[bool] = None,
              nan_policy: Optional[str] = None, **options) -> Call:
        """The :class:`~attnzoo.checks.Call` of a call (its checks, without running it)."""
        opts = self.resolve_options(options)
        causal, mask, key_mask, score_mod = self._arguments(q, k, attn_mask, mask, is_causal, causal,
                                                            key_padding_mask, key_mask, score_mod, enable_gqa)
        return make_call(self, q, k, v, causal, mask, key_mask, score_mod, scale, dropout_p, return_weights,
                         cross, nan_policy, opts, tuple(options))

    def _arguments(self, q, k, attn_mask, mask, is_causal, causal, key_padding_mask, key_mask, score_mod,
                   enable_gqa):
        """SDPA's and MultiheadAttention's arguments in attnzoo's terms (only when any is given)."""
        if (attn_mask is not None or is_causal is not False or key_padding_mask is not None
                or enable_gqa is not None or (isinstance(mask, torch.Tensor) and mask.is_floating_point())):
            return sdpa_arguments(self, q, k, attn_mask, mask, is_causal, causal, key_padding_mask, key_mask,
                                  score_mod, enable_gqa)
        return (False if causal is None else causal), mask, key_mask, score_mod

    def why_not(self, impl: Impl, call: Call) -> Optional[str]:
        """Why ``impl`` cannot serve ``call``, or None."""
        if call.given:
            foreign = [n for n in call.given if n in self._impl_only and n not in impl.options]
            if foreign:
                return f"it does not take the option(s) {', '.join(foreign)}"
        if call.return_weights and not impl.weights:
            return "it cannot return attention weights"
        return None if impl.supports is None else impl.supports(call)

    def select(self, impl: str, call: Call) -> Impl:
        """The implementation that serves ``call``: the named one (or an error saying why
        it cannot), or for ``"auto"`` the first fast one that can, else the reference."""
        if impl == "auto":
            for candidate in self.impls:
                if self.why_not(candidate, call) is None:
                    return candidate
            reason = self.why_not(self._reference_impl, call)
            if reason is not None:
                raise UnsupportedImpl(
                    f"no implementation of method {self.name!r} can serve this call (the reference: {reason}; "
                    + "; ".join(f"{i.name}: {self.why_not(i, call)}" for i in self.impls) + ")")
            return self._reference_impl
        if impl == "reference":
            chosen = self._reference_impl
        else:
            for chosen in self.impls:
                if chosen.name == impl:
                    break
            else:
                raise UnsupportedImpl(
                    f"impl={impl!r} is not an implementation of method {self.name!r}.{closest(impl, self.impl_names)} "
                    f"Choose from: 'auto', {', '.join(repr(n) for n in self.impl_names)}")
        reason = self.why_not(chosen, call)
        if reason is not None:
            can = [i.name for i in [*self.impls, self._reference_impl] if self.why_not(i, call) is None]
            raise UnsupportedImpl(
                f"impl={impl!r} of method {self.name!r} cannot serve this call: {reason}. "
                f"Implementations that can: {', '.join(repr(c) for c in can) or 'none'} (or impl='auto')")
        return chosen

    def __call__(self, query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                 scale=None, enable_gqa: Optional[bool] = None, *, causal: Optional[bool] = None, mask=None,
                 key_padding_mask=None, key_mask=None, impl: str = "auto", return_weights: bool = False,
                 cross: Optional[bool] = None, nan_policy: Optional[str] = None, score_mod=None, **options):
        """Run the method: ``query (B, Hq, Nq, D)``, ``key (B, Hkv, Nk, D)``, ``value (B, Hkv, Nk, Dv)``
        -> ``(B, Hq, Nq, Dv)`` (see :func:`attnzoo.attention` for the arguments)."""
        return self.dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal, mask,
                             key_padding_mask, key_mask, impl, return_weights, cross, nan_policy, score_mod, options)

    def dispatch(self, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, causal, mask, key_padding_mask,
                 key_mask, impl, return_weights, cross, nan_policy, score_mod, options: dict):
        """The call path, positional (it runs on every call and every decoding step): read
        SDPA's arguments, validate the options once, check the call, choose the
        implementation, run it."""
        if (attn_mask is not None or is_causal is not False or key_padding_mask is not None
                or enable_gqa is not None or (mask is not None and isinstance(mask, torch.Tensor)
                                              and mask.is_floating_point())):
            causal, mask, key_mask, score_mod = sdpa_arguments(self, q, k, attn_mask, mask, is_causal, causal,
                                                               key_padding_mask, key_mask, score_mod, enable_gqa)
        elif causal is None:
            causal = False
        if options:
            opts, given = self.resolve_options(options), tuple(options)
        else:
            opts, given = self._defaults, ()
        call = make_call(self, q, k, v, causal, mask, key_mask, score_mod, scale, dropout_p, return_weights, cross,
                         nan_policy, opts, given)
        chosen = None
        if impl == "auto" and not given and not return_weights:
            for candidate in self.impls:  # the common case: the first impl whose supports() agrees
                if candidate.supports is None or candidate.supports(call) is None:
                    chosen = candidate
                    break
        if chosen is None:
            chosen = self.select(impl, call)
        try:
            return chosen.fn(q, k, v, call)
        except (NotImplementedError, RuntimeError) as e:  # free unless something failed
            if call.device.type == "meta":
                raise AttentionInputError(
                    f"q, k, v are on the meta device, which holds shapes but no values, and impl "
                    f"{chosen.name!r} of method {self.name!r} needs the values (it chooses or gathers keys by "
                    f"them): {type(e).__name__}: {e}") from e
            raise

    def run(self, q, k, v, *, causal: bool, scale: float, options: MethodOptions, impl: str = "auto",
            key_mask=None):
        """The method on inputs already checked (decoders run it over their caches)."""
        B, Hq, Nq, D = q.shape
        call = Call(B, Hq, k.shape[1], Nq, k.shape[2], D, v.shape[3], q.dtype, q.device, causal, Nq != k.shape[2],
                    None, key_mask, None, float(scale), 0.0, False,
                    torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad),
                    options, ())
        return self.select(impl, call).fn(q, k, v, call)

    # -------------------------------------------------------------------- decoding
    def _require_decoder(self) -> Decoder:
        if self.decoder is None:
            raise UnsupportedPattern(f"method {self.name!r} has no causal decoding form (its spec has decoding=False)")
        return self.decoder

    def init_state(self, batch_size: int, kv_heads: int, head_dim: int, v_dim: Optional[int] = None, *,
                   dtype=torch.float32, device=None, max_len: Optional[int] = None, **options):
        """A fresh decoding state (see :mod:`attnzoo.decoding`)."""
        decoder = self._require_decoder()
        return decoder.init_state(batch_size, kv_heads, head_dim, v_dim or head_dim, dtype=dtype, device=device,
                                  max_len=max_len, options=self.resolve_options(options))

    def step(self, state, q, k, v, *, scale: Optional[float] = None, impl: str = "auto", **options):
        """Append ``k, v`` (``(B, Hkv, T, D)``, ``(B, Hkv, T, Dv)``) to ``state`` and attend the
        new queries ``q (B, Hq, T, D)`` causally over everything so far: ``(B, Hq, T, Dv)``,
        the last T rows of the causal forward pass."""
        decoder = self._require_decoder()
        check_qkv(q, k, v, gqa=self.gqa)
        if self.query == "learned":
            if q.shape[2] != 1:
                raise AttentionInputError(
                    f"method {self.name!r} steps with its one learned query: q must be (B, Hq, 1, D), "
                    f"got {fmt_shape(q)}")
        elif q.shape[2] != k.shape[2]:
            raise AttentionInputError(
                f"step takes as many new queries as new keys, got q {fmt_shape(q)} and k {fmt_shape(k)} (dim 2)")
        if impl != "auto" and impl not in decoder.impls:
            choices = ", ".join(repr(i) for i in ("auto", *decoder.impls))
            raise UnsupportedImpl(f"method {self.name!r} has no decoding impl {impl!r}."
                                  f"{closest(impl, decoder.impls)} Choose from: {choices}")
        shape = (q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3])
        bound = getattr(state, "_attnzoo_shape", None)
        if bound is not None and bound != shape:  # a recurrent state would otherwise broadcast silently
            raise AttentionInputError(
                "this decoding state was made for (B, Hq, Hkv, D, Dv) = "
                f"{bound}, got {shape} (q {fmt_shape(q)}, k {fmt_shape(k)}, v {fmt_shape(v)})")
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        out = decoder.step(self.run, state, q, k, v, scale=scale, impl=impl, options=self.resolve_options(options))
        try:
            state._attnzoo_shape = shape  # bound once a step has succeeded
        except AttributeError:  # pragma: no cover - a state type that refuses attributes
            pass
        return out

    # ---------------------------------------------------------------------- tables
    def row(self) -> dict:
        """A flat description for tables (``attnzoo list``)."""
        short = {"noncausal_self": "self", "causal_self": "causal", "noncausal_cross": "cross",
                 "causal_cross": "causal-cross"}
        return {
            "method": self.name,
            "family": self.family,
            "patterns": " ".join(short[p] for p in PATTERNS if p in self.patterns),
            "exact": "exact" if self.exact else "approx",
            "time": self.time,
            "memory": self.memory,
            "impls": ", ".join(self.impl_names),
            "learnable": "yes" if self.learnable else "",
            "masks": "any" if self.masks else "padding",
            "gqa": "yes" if self.gqa else "",
            "decoding": "yes" if self.decoding else "",
            "strictly causal": ("" if not any(p.startswith("causal") for p in self.patterns)
                                else "no: key choice sees later tokens" if self.causal_leak else "yes"),
            "paper": self.paper,
        }

    def __repr__(self) -> str:
        return f"<method {self.name!r} ({self.family}): impls {', '.join(self.impl_names)}>"


def _family_of(fn: Callable) -> str:
    parts = getattr(fn, "__module__", "").split(".")
    if len(parts) >= 4 and parts[-3] == "methods":
        return parts[-2]
    raise ValueError(f"cannot tell the family of {fn!r} (not in attnzoo/methods/<family>/): pass family=")


# --------------------------------------------------------------------------- registry

_REGISTRY: dict = {}
_LOADED = [False]


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (its name must be new)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"a method named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def method(name: str, **spec_fields) -> Callable[[Callable], MethodSpec]:
    """Decorator on a method's reference ``fn(q, k, v, call)``: build its
    :class:`MethodSpec` (the keyword arguments are its fields) and register it. The
    decorated name is bound to the spec, the method's entry point."""

    def deco(reference: Callable) -> MethodSpec:
        return register(MethodSpec(name=name, reference=reference, **spec_fields))

    return deco


def _ensure_loaded() -> None:
    if not _LOADED[0]:
        _LOADED[0] = True
        importlib.import_module(__package__ + ".methods")


def get(name: str) -> MethodSpec:
    """The spec of a registered method; a misspelled name gets the closest suggestion."""
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is not None:
        return spec
    if not _LOADED[0]:
        _ensure_loaded()
        return get(name)
    if not isinstance(name, str):
        raise UnknownMethod(f"method must be a method name (str), got {type(name).__name__}")
    raise UnknownMethod(
        f"method={name!r} is not registered.{closest(name, _REGISTRY)} "
        f"Registered methods: {', '.join(sorted(_REGISTRY))}")


def list_methods(family: Optional[str] = None) -> list:
    """All registered :class:`MethodSpec`, sorted by family then name."""
    _ensure_loaded()
    specs = sorted(_REGISTRY.values(), key=lambda s: (s.family, s.name))
    return [s for s in specs if family is None or s.family == family]
