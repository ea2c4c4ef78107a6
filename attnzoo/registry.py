"""The method registry: one :class:`MethodSpec` per attention mechanism.

A method registers itself once, at the bottom of its file in
``attnzoo/methods/``::

    register(MethodSpec(name="softmax", family="softmax", reference=reference,
                        impls=[Impl("sdpa", sdpa_attention, supports=...), ...], ...))

Everything else — :func:`attnzoo.attention`, :func:`attnzoo.build`, the
``attnzoo list`` table, the README, the contract tests and the benchmark — reads
the registry, so a method is usable, documented, tested and benchmarked the
moment it is registered.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import UnknownMethod, closest

#: The four attention patterns (the CAB benchmark's taxonomy).
PATTERNS = ("noncausal_self", "causal_self", "noncausal_cross", "causal_cross")

#: Keyword arguments every implementation function takes (the rest are method options).
COMMON_KWARGS = ("causal", "mask", "key_padding_mask", "scale", "dropout_p", "return_weights")


def pattern_name(causal: bool, cross: bool) -> str:
    return ("causal" if causal else "noncausal") + ("_cross" if cross else "_self")


@dataclass(frozen=True)
class CallInfo:
    """What an implementation needs to know to say whether it can serve a call."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_dim: int
    dtype: Any
    device: Any
    causal: bool
    cross: bool
    has_mask: bool
    mask_is_mod: bool
    has_key_padding: bool
    requires_grad: bool
    dropout_p: float
    return_weights: bool
    options: dict
    given: tuple = ()  # option names the caller set explicitly

    @property
    def pattern(self) -> str:
        return pattern_name(self.causal, self.cross)


@dataclass(frozen=True)
class Impl:
    """One fast implementation of a method.

    ``fn`` has the reference's signature. ``supports(call) -> None | str`` returns
    None when it can serve the call, otherwise the reason it cannot (shown to the
    user when they ask for this impl by name). ``mask_mod``: the function takes a
    mask_mod callable directly (evaluated block by block) instead of a dense mask.
    """

    name: str
    fn: Callable
    supports: Callable[[CallInfo], Optional[str]] = lambda call: None
    description: str = ""
    mask_mod: bool = False
    weights: bool = False
    fudge: Optional[float] = None  # tolerance factor of the three-way test rule (default: the spec's)

    @property
    def options(self) -> tuple:
        """Names of the method options this implementation accepts."""
        return tuple(method_options(self.fn))


@dataclass
class MethodSpec:
    """Everything the library knows about one attention mechanism.

    Attributes:
        name: registry key, e.g. ``"softmax"``.
        family: ``"softmax"``, ``"softmax-variant"``, ``"linear"``, ``"sparse"``, ...
        summary: one line for tables.
        paper: title of the paper that defines the mechanism.
        reference: the defining implementation (plain PyTorch, reads like the paper).
        impls: fast implementations, in the order ``impl="auto"`` tries them.
        patterns: which of :data:`PATTERNS` the maths allows.
        exact: equals exact softmax attention (up to rounding).
        time / memory: complexity in sequence length N (and head dim D).
        learnable: the mechanism has parameters of its own (see ``module``).
        masks: accepts arbitrary dense boolean masks / mask_mods (otherwise only
            ``key_padding_mask``).
        gqa: supports ``Hq`` a multiple of ``Hkv``.
        dropout: supports attention dropout.
        decoding: token-by-token decoding via ``init_state`` / ``step``.
        grid: takes 2-D inputs with ``grid=(H, W)``.
        weights: the reference can return the attention weights.
        state_size: size of the decoding state, in words.
        module: ``nn.Module`` class holding the parameters, built by :func:`attnzoo.build`.
        init_state / step: the decoding protocol (see :mod:`attnzoo.decoding`).
        options: method options and their defaults, read from the reference's signature.
        test_options: options the contract tests use in addition to the defaults.
        fudge: tolerance factor of the three-way test rule.
        rows_independent: each output row depends only on its own query and the keys
            (softmax and most methods). False when the queries are pooled or normalised
            together (Agent's agents, Flowformer's flows) or when a row's pattern depends
            on its aligned position ``i + Nk - Nq`` and so on the number of queries
            (sliding windows, dilated windows): such a method cannot decode
            cross-attention one query at a time.
        causal_leak: empty when the causal forms are strictly causal (output ``i`` depends
            on no input after ``i``). Otherwise why not: methods that pick keys from pooled
            query blocks, regions or a balanced clustering (as their papers do for a known
            prompt) mask later keys out of the sums, but the *choice* of keys sees later
            tokens, so a model trained with them can read the future a little. Checked
            both ways by the contract tests (:func:`attnzoo.bench.check.causal_leak`).
        query: ``"tokens"`` (one query per position, the usual) or ``"learned"``: the
            method attends with one learned query per head, passed as ``q (B, Hq, 1, D)``,
            and returns one output per key, ``(B, Hq, Nk, Dv)`` (e.g. Aaren).
    """

    name: str
    family: str
    summary: str
    paper: str
    reference: Callable
    impls: list = field(default_factory=list)
    patterns: tuple = PATTERNS
    exact: bool = False
    time: str = "O(N^2 D)"
    memory: str = "O(N^2)"
    learnable: bool = False
    masks: bool = True
    gqa: bool = True
    dropout: bool = False
    decoding: bool = False
    grid: bool = False
    weights: bool = True
    state_size: Optional[str] = None
    module: Optional[type] = None
    init_state: Optional[Callable] = None
    step: Optional[Callable] = None
    options: dict = field(default_factory=dict)
    test_options: dict = field(default_factory=dict)
    fudge: float = 3.0
    query: str = "tokens"
    rows_independent: bool = True
    step_impls: tuple = ()  # named decoding implementations ``step(impl=...)`` accepts besides "auto"
    bench_options: dict = field(default_factory=dict)  # options the benchmark needs (e.g. a block layout)
    causal_leak: str = ""  # why the causal forms' outputs depend on later tokens ("" = strictly causal)

    def __post_init__(self) -> None:
        unknown = set(self.patterns) - set(PATTERNS)
        if unknown:
            raise ValueError(f"{self.name}: unknown patterns {sorted(unknown)}; choose from {PATTERNS}")
        if not self.options:
            self.options = method_options(self.reference)
            for impl in self.impls:  # impl-specific options (e.g. tiled's block sizes)
                for name, default in method_options(impl.fn).items():
                    self.options.setdefault(name, default)
        names = [i.name for i in self.impls]
        if "reference" in names or len(set(names)) != len(names):
            raise ValueError(f"{self.name}: impl names must be unique and not 'reference', got {names}")

    @property
    def impl_names(self) -> tuple:
        """All implementation names, ``"reference"`` first."""
        return ("reference",) + tuple(i.name for i in self.impls)

    def get_impl(self, name: str) -> Impl:
        if name == "reference":
            return Impl("reference", self.reference, description="the defining implementation", weights=self.weights)
        for i in self.impls:
            if i.name == name:
                return i
        raise KeyError(name)

    def supports_pattern(self, causal: bool, cross: bool) -> bool:
        return pattern_name(causal, cross) in self.patterns

    def row(self) -> dict:
        """A flat description for tables (``attnzoo list``)."""
        short = {"noncausal_self": "self", "causal_self": "causal", "noncausal_cross": "cross", "causal_cross": "causal-cross"}
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


_REGISTRY: dict[str, MethodSpec] = {}


def method_options(fn: Callable) -> dict:
    """The method options of an implementation: its keyword-only parameters other than
    the common ones, with their defaults."""
    opts = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in COMMON_KWARGS:
            opts[p.name] = None if p.default is inspect.Parameter.empty else p.default
    return opts


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (its name must be new)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"a method named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> MethodSpec:
    """The spec of a registered method; a misspelled name gets the closest suggestion."""
    _load_builtin()
    if not isinstance(name, str):
        raise UnknownMethod(f"method must be a method name (str), got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethod(
            f"method={name!r} is not registered.{closest(name, _REGISTRY)} "
            f"Registered methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def methods(family: Optional[str] = None) -> list:
    """All registered :class:`MethodSpec`, sorted by family then name."""
    _load_builtin()
    specs = sorted(_REGISTRY.values(), key=lambda s: (s.family, s.name))
    return [s for s in specs if family is None or s.family == family]


def _load_builtin() -> None:
    # importing the package registers the built-in methods (a plain `from . import methods`
    # would find the function `attnzoo.methods` instead of the subpackage)
    importlib.import_module(__package__ + ".methods")
