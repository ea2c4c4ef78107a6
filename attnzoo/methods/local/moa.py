"""MoA: a sliding window whose span differs per head, with the elastic rule span(N) = α + β·N.

    head h:  w_h = clamp(round(α_h + β_h · Nk), 1, Nk)          (Nk: the number of keys)
    causal:    query i sees  i' - w_h < j <= i'     (i' = i + Nk - Nq), or j < s (and j <= i')
    noncausal: query i sees  |j - i'| <= w_h // 2,                      or j < s
    O_i = sum_j softmax_j(scale · q_i·k_j) v_j  over the visible j

Paper: "MoA: Mixture of Sparse Attention for Automatic Large Language Model
Compression" (Fu et al., 2024). MoA observes that heads differ in how far back they
look and that the best span of a head grows with the input length; it gives every head
its own causal sliding window with the *elastic* span ``α_h + β_h·N`` and chooses the
``(α_h, β_h)`` by profiling the attention of a calibration set under an average-span
budget. :func:`fit_spans` is that profiler in its simplest form (one length, β = 0): it
measures, per head and candidate span, the attention mass the window keeps, and
allocates the budget across heads greedily by mass gained per extra token. The pattern is
the mask_mod :func:`per_head_window_mask` (also ``attnzoo.masks.per_head_window_mask``);
the reference is dense masked softmax built from it.

Judgement calls:

* [J] ``alpha`` and ``beta``: a number or a list/tuple/1-D tensor of per-head values,
  *cycled* over the query heads (head ``h`` uses ``alpha[h % len(alpha)]``). Defaults
  ``alpha=(64, 128, 256, 512)``, ``beta=0.0`` (a fixed span per head).
* [J] N in the elastic rule is the number of keys ``Nk`` of the call (the paper's rule for
  a sequence of length N); the span is rounded half-to-even (``torch.round``) and clamped
  to ``[1, Nk]``. ``alpha``, ``beta`` must be finite and ``>= 0``.
* [J] ``sinks`` (default 0): the first ``sinks`` tokens stay visible to every query (MoA
  keeps the initial tokens too, after StreamingLLM); causal sinks stay causal.
* [J] All four patterns. Noncausal: ``w_h // 2`` keys on each side (the convention of
  ``sliding_window``). Cross attention aligns queries lower-right, so a row depends on
  its position among the queries: ``rows_independent=False`` (the layer refuses to decode
  noncausal cross-attention one query at a time).
* [J] Decoding: a cache of the sinks and the last ``max_h w_h`` tokens (constant memory);
  each head masks its own span. With ``beta == 0`` the span does not depend on N and
  decoding equals the causal forward exactly. With ``beta != 0`` the span depends on the
  final length, which a decoder does not know: ``init_state`` then needs
  ``max_len=...`` and every step uses ``span(max_len)``, so decoding equals the causal
  forward over ``max_len`` tokens; without ``max_len`` it raises
  :class:`AttentionInputError`, and decoding past ``max_len`` raises too.
* [J] A dense ``mask`` / mask_mod and the key padding are combined by AND with the
  pattern; a query with nothing visible returns zeros.

Implementations:

* ``reference`` — dense masked softmax with the pattern from ``dense_mask`` (O(N²)).
* ``block`` — the block-sparse kernel over a per-head block layout ``(Hq, nqb, nkb)``
  computed from the block bounds (:func:`attnzoo.kernels.windows.window_layout`, exact:
  the blocks the element pattern touches), with the same mask_mod as the element mask. Time O(N·w_max·D),
  memory O(N·w_max) (the kernel pads every head to the longest span's block count);
  never N×N, forward or backward.
* ``flex`` — FlexAttention with the same mask_mod (CPU: inference only).
* decoding — a :class:`MoACache` (a :class:`~attnzoo.kernels.caches.WindowCache`): the sinks and the last
  ``max_h w_h`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from ...errors import AttentionInputError, fmt_shape
from ...kernels.caches import Decoder, WindowCache
from ...kernels.flex import flex_unsupported
from ...kernels.masking import MaskMod, head_values, offset_of, take_head
from ...kernels.windows import one_if_shared, pattern_blocks, pattern_flex, pattern_reference, window_layout
from ...registry import MethodOptions, method

DEFAULT_ALPHA = (64, 128, 256, 512)


def per_head_window_mask(
    spans, sinks: int = 0, causal: bool = True, q_len: Optional[int] = None, kv_len: Optional[int] = None
) -> MaskMod:
    """A sliding window whose span differs per head (MoA, "MoA: Mixture of Sparse Attention
    for Automatic Large Language Model Compression"), plus ``sinks`` initial tokens.

    Head ``h`` uses ``w = spans[h % len(spans)]``. Causal: query ``i`` sees the last ``w``
    keys up to its aligned position ``i' = i + kv_len - q_len`` (its own included),
    ``i' - w < j <= i'``, or ``j < sinks`` with ``j <= i'``. Noncausal: ``|j - i'| <= w // 2``
    or ``j < sinks``. ``spans``: an int or a list/tuple/1-D tensor of positive ints. The
    returned function carries ``spans`` (the long tensor), ``sinks``, ``causal``, ``offset``
    and ``cache_key`` as attributes.
    """
    widths = head_values(spans, "spans")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise AttentionInputError(f"sinks must be an int >= 0, got {sinks!r}")
    offset = offset_of(q_len, kv_len)

    if causal:

        def per_head_window_causal(b, h, q_idx, kv_idx):
            w = take_head(widths, h)
            back = q_idx + offset - kv_idx
            return (back >= 0) & ((back < w) | (kv_idx < sinks))

        mod = per_head_window_causal
    else:

        def per_head_window(b, h, q_idx, kv_idx):
            w = take_head(widths, h)
            return ((q_idx + offset - kv_idx).abs() <= w // 2) | (kv_idx < sinks)

        mod = per_head_window

    mod.spans, mod.sinks, mod.causal, mod.offset = widths, sinks, bool(causal), offset  # type: ignore[attr-defined]
    mod.cache_key = ("per_head_window", tuple(widths.tolist()), sinks, bool(causal), offset)  # type: ignore
    return mod


def _values(x, name: str) -> torch.Tensor:
    """A number or per-head sequence / 1-D tensor as a float64 CPU tensor (finite, >= 0)."""
    try:
        t = torch.as_tensor(x.detach() if isinstance(x, torch.Tensor) else x, dtype=torch.float64).flatten().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise AttentionInputError(f"moa: {name} must be a number or a list/tuple/1-D tensor of numbers (one per head), "
                                  f"got {x!r}") from None
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise AttentionInputError(f"moa: {name} must be finite numbers >= 0 (one per head, cycled), got {t.tolist()}")
    return t


@dataclass(frozen=True)
class MoAOptions(MethodOptions):
    """Options of ``moa``.

    Attributes:
        alpha, beta: the elastic span ``α_h + β_h·Nk`` per head (numbers or per-head
            lists/tuples/1-D tensors, cycled over the query heads).
        sinks: initial tokens every query also sees.
        block_size: tile size of ``block``.
    """

    alpha: Union[float, tuple, torch.Tensor] = DEFAULT_ALPHA
    beta: Union[float, tuple, torch.Tensor] = 0.0
    sinks: int = 0
    block_size: int = 64

    def validate(self) -> None:
        _values(self.alpha, "alpha")
        _values(self.beta, "beta")
        if self.sinks < 0:
            raise AttentionInputError(f"moa: sinks must be an int >= 0, got {self.sinks!r}")
        if self.block_size < 1:
            raise AttentionInputError(f"moa: block_size must be a positive int, got {self.block_size!r}")

    @classmethod
    def for_length(cls, n: int) -> dict:
        # spans N/8, N/4, N/4, N/2 (a quarter of the keys on average), the defaults from N = 1024
        return {"alpha": tuple(min(a, max(2, n // d)) for a, d in zip(DEFAULT_ALPHA, (8, 4, 4, 2)))}


def head_spans(alpha, beta, heads: int, n: Optional[int], device=None) -> torch.Tensor:
    """The span of each of ``heads`` query heads, ``(heads,)`` long: ``clamp(round(α_h + β_h·n),
    1, n)`` with α, β cycled over the heads; ``n=None`` (only with β = 0) leaves the spans
    unclamped above (``max(1, round(α_h))``)."""
    a, b = _values(alpha, "alpha"), _values(beta, "beta")
    h = torch.arange(heads)
    raw = a[h % a.numel()] + b[h % b.numel()] * (0 if n is None else n)
    spans = torch.round(raw).clamp(min=1)
    if n is not None:
        spans = spans.clamp(max=max(1, int(n)))
    return spans.to(torch.long).to(device)


def _pattern(call, spans):
    return per_head_window_mask(spans, call.options.sinks, call.causal, call.q_len, call.kv_len)


@method("moa", options=MoAOptions,
        paper="MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression",
        summary="a causal sliding window whose span differs per head, span_h(N) = α_h + β_h·N (MoA)",
        time="O(N w_max D)", memory="O(N w_max)", score_mods=True,
        rows_independent=False,  # a row's window depends on its lower-right aligned position
        mask_mods=(per_head_window_mask,))
def moa(q, k, v, call):
    """Dense softmax masked by each head's window (the definition).

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    o = call.options
    spans = head_spans(o.alpha, o.beta, call.q_heads, call.kv_len)
    return pattern_reference(q, k, v, call, _pattern(call, spans))


@moa.impl("block", options=("block_size",),
          description="block-sparse kernel over a per-head layout of the key blocks each head's window touches, "
                      "O(N·w_max)")
def block_attention(q, k, v, call):
    """The block-sparse kernel over the key blocks each head's window (and the sinks) touch."""
    o = call.options
    spans = head_spans(o.alpha, o.beta, call.q_heads, call.kv_len)
    layout = window_layout(call.q_len, call.kv_len, o.block_size, one_if_shared(spans), o.sinks, call.causal,
                           q.device)  # one span for all heads: one layout
    return pattern_blocks(q, k, v, call, layout, o.block_size, _pattern(call, spans))


@moa.impl("flex", supports=flex_unsupported, description="FlexAttention with the same mask_mod (CPU: inference only)")
def flex(q, k, v, call):
    """FlexAttention with the same mask_mod (inference on CPU)."""
    o = call.options
    spans = head_spans(o.alpha, o.beta, call.q_heads, call.kv_len, q.device)
    return pattern_flex(q, k, v, call, _pattern(call, spans))


# ---------------------------------------------------------------------------- decoding


class MoACache(WindowCache):
    """The sinks and the last ``max_h w_h`` tokens (MoA's per-head spans); ``max_len``
    fixes the spans when they grow with the length (β != 0)."""

    def __init__(self, *args, max_len: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_len = max_len


def _decode_spans(alpha, beta, heads: int, max_len: Optional[int]) -> torch.Tensor:
    if bool((_values(beta, "beta") != 0).any()):
        if max_len is None:
            raise AttentionInputError(
                f"moa: decoding with beta={beta!r} != 0 needs init_state(..., max_len=N): the elastic span "
                "alpha + beta·N depends on the final length N, so the steps use span(max_len) (decoding then "
                "equals the causal forward over max_len tokens); pass max_len, or use beta=0"
            )
        return head_spans(alpha, beta, heads, int(max_len))
    return head_spans(alpha, beta, heads, None)  # beta = 0: the span does not depend on N


def _cache_tokens(alpha, beta, max_len) -> int:
    """The largest span any head can have (α and β cycled together: lcm of their lengths)."""
    a, b = _values(alpha, "alpha"), _values(beta, "beta")
    period = a.numel() * b.numel() // math.gcd(a.numel(), b.numel())
    return int(_decode_spans(alpha, beta, period, max_len).max())


@moa.decodes
class MoADecoder(Decoder):
    """The sinks and the last ``max_h w_h`` tokens (a :class:`MoACache`);
    each head masks its own span."""

    state_size = "sinks + last max_h(w_h) tokens: ·2·Hkv·D per sequence, constant in N"

    def init_state(self, batch_size, kv_heads, head_dim, v_dim, *, dtype, device, max_len, options):
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise AttentionInputError(f"moa: max_len must be a positive int, got {max_len!r}")
        window = _cache_tokens(options.alpha, options.beta, max_len)
        return MoACache(batch_size, kv_heads, head_dim, v_dim, window, options.sinks, dtype, device, max_len=max_len)

    def step(self, run, cache, q, k, v, *, scale, impl, options):
        """Attend the T new queries over the kept tokens plus the new ones, each head with its
        own span (by global positions) and the sinks; then keep the sinks and the last
        ``max_h w_h`` tokens."""
        alpha, beta, sinks = options.alpha, options.beta, options.sinks
        Hq, T = q.shape[1], q.shape[2]
        if sinks != cache.sinks or _cache_tokens(alpha, beta, cache.max_len) != cache.window:
            raise AttentionInputError("moa: step options (alpha, beta, sinks) differ from those the state was made "
                                      "with; pass the same options to init_state and step")
        if cache.max_len is not None and cache.length + T > cache.max_len:
            raise AttentionInputError(
                f"moa: decoding {T} more token(s) after {cache.length} goes past max_len={cache.max_len} given to "
                "init_state (the spans were fixed for that length); make the state with a larger max_len"
            )
        spans = _decode_spans(alpha, beta, Hq, cache.max_len)
        return cache.attend(q, k, v, per_head_window_mask(spans, sinks, True), scale)


# ---------------------------------------------------------------------------- profiler


def kept_mass(weights: torch.Tensor, spans: Sequence[int]) -> torch.Tensor:
    """``(H, len(spans))``: for each head and span ``s``, the mean over query rows of the
    attention weight inside the causal window of ``s`` keys ending at the row's (lower-right
    aligned) position. ``weights``: ``(H, Nq, Nk)``."""
    H, Nq, Nk = weights.shape
    prefix = torch.nn.functional.pad(weights.to(torch.float64).cumsum(-1), (1, 0))  # prefix[..., j] = sum_{< j}
    pos = torch.arange(Nq, device=weights.device) + (Nk - Nq)
    hi = (pos + 1).clamp(0, Nk).view(1, Nq, 1)
    s = torch.as_tensor(list(spans), dtype=torch.long, device=weights.device).view(1, 1, -1)
    lo = (hi - s).clamp(0, Nk)
    top = torch.gather(prefix, 2, hi.expand(H, Nq, 1))
    bottom = torch.gather(prefix, 2, lo.expand(H, Nq, s.shape[-1]))
    return (top - bottom).mean(dim=1)


def fit_spans(reference_attention: torch.Tensor, budget: float, candidates: Optional[Sequence[int]] = None) -> dict:
    """MoA's profiler in its simplest form: per-head spans under an average-span budget.

    ``reference_attention``: attention weights ``(B, H, N, N)`` (averaged over the batch; e.g.
    ``attnzoo.attention(q, k, v, causal=True, return_weights=True)[1]`` on a calibration
    batch) or ``(H, N, N)``; rows may be ``Nq != Nk`` (aligned lower-right). ``budget``: the
    average span allowed, in tokens. ``candidates``: the spans to choose from (default: the
    powers of two below N, and N).

    For each head and candidate, the kept mass is the mean over rows of the weight inside
    the causal window of that span (:func:`kept_mass`). Every head starts at the smallest
    candidate; then, while some upgrade keeps the mean span within ``budget``, the head
    whose upgrade (to any larger candidate) gains the most mass per extra token is
    upgraded; it stops when no affordable upgrade gains mass.

    Returns ``{"spans": (H,) long, "kept_mass": (H,) float64, "mean_span": float,
    "budget": budget}``; pass the spans as ``alpha=spans, beta=0``.
    """
    A = reference_attention
    if not isinstance(A, torch.Tensor) or A.dim() not in (3, 4) or not A.is_floating_point():
        shape = fmt_shape(A) if isinstance(A, torch.Tensor) else type(A).__name__
        raise AttentionInputError(f"fit_spans: reference_attention must be float weights (B, H, N, N) or (H, N, N), "
                                  f"got {shape}")
    if A.dim() == 4:
        A = A.mean(dim=0)
    H, _, Nk = A.shape
    if 0 in A.shape:
        raise AttentionInputError(f"fit_spans: reference_attention is empty: shape {fmt_shape(A)}")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0 or not math.isfinite(budget):
        raise AttentionInputError(f"fit_spans: budget must be a positive number of tokens, got {budget!r}")
    if candidates is None:
        cand = [1 << p for p in range(max(1, Nk.bit_length())) if (1 << p) < Nk] + [Nk]
    else:
        cand = list(candidates.tolist() if isinstance(candidates, torch.Tensor) else candidates)
        if not cand or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in cand):
            raise AttentionInputError(f"fit_spans: candidates must be positive ints, got {candidates!r}")
    cand = sorted(set(cand))
    if cand[0] > budget:
        raise AttentionInputError(f"fit_spans: the smallest candidate span {cand[0]} exceeds budget={budget}")
    mass = kept_mass(A, cand).cpu()  # (H, C)
    size = torch.tensor(cand, dtype=torch.float64)
    choice = [0] * H
    total = float(H * cand[0])
    while True:
        best = None  # (gain per token, head, candidate)
        for h in range(H):
            c0 = choice[h]
            for c in range(c0 + 1, len(cand)):
                cost = cand[c] - cand[c0]
                if (total + cost) / H > budget:
                    break  # larger candidates cost more
                rate = float(mass[h, c] - mass[h, c0]) / cost
                if rate > 0 and (best is None or rate > best[0]):
                    best = (rate, h, c)
        if best is None:
            break
        _, h, c = best
        total += cand[c] - cand[choice[h]]
        choice[h] = c
    idx = torch.tensor(choice, dtype=torch.long)
    spans = size[idx].to(torch.long)
    return {"spans": spans, "kept_mass": mass[torch.arange(H), idx],
            "mean_span": float(spans.double().mean()), "budget": budget}
