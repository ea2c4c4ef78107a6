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
the mask_mod :func:`attnzoo.masks.per_head_window_mask`; the reference is dense masked
softmax built from it.

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
* [J] A dense ``mask`` / mask_mod and ``key_padding_mask`` are combined by AND with the
  pattern; a query with nothing visible returns zeros.

Implementations:

* ``reference`` — dense masked softmax with the pattern from ``dense_mask`` (O(N²)).
* ``block`` — the block-sparse kernel over a per-head block layout ``(Hq, nqb, nkb)``
  computed from the block bounds (:func:`moa_layout`, exact: the blocks the element
  pattern touches), with the same mask_mod as the element mask. Time O(N·w_max·D),
  memory O(N·w_max) (the kernel pads every head to the longest span's block count);
  never N×N, forward or backward.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..errors import AttentionInputError, fmt_shape
from ..masks import dense_mask, per_head_window_mask
from ..registry import Impl, MethodSpec, register
from . import softmax
from ._blocksparse import block_indices, block_sparse_attention
from .sliding_window import WindowCache

DEFAULT_ALPHA = (64, 128, 256, 512)


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


def _check(alpha, beta, sinks, block_size: Optional[int] = None):
    a, b = _values(alpha, "alpha"), _values(beta, "beta")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise AttentionInputError(f"moa: sinks must be an int >= 0, got {sinks!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise AttentionInputError(f"moa: block_size must be a positive int, got {block_size!r}")
    return a, b


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


def _pattern(causal, spans, sinks, q_len, kv_len):
    return per_head_window_mask(spans, int(sinks), causal, q_len, kv_len)


def reference(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
              return_weights=False, alpha=DEFAULT_ALPHA, beta=0.0, sinks: int = 0):
    """Dense softmax masked by each head's window (the definition).

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> (B, Hq, Nq, Dv).
    """
    _check(alpha, beta, sinks)
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    spans = head_spans(alpha, beta, Hq, Nk)
    allowed = dense_mask(_pattern(causal, spans, sinks, Nq, Nk), B, Hq, Nq, Nk, q.device)
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            mask = dense_mask(mask, B, Hq, Nq, Nk, q.device)
        allowed = allowed & mask
    return softmax.reference(q, k, v, causal=causal, mask=allowed, key_padding_mask=key_padding_mask, scale=scale,
                             dropout_p=dropout_p, return_weights=return_weights)


def moa_layout(q_len: int, kv_len: int, block: int, spans: torch.Tensor, sinks: int, causal: bool,
               device=None) -> torch.Tensor:
    """Block layout ``(H, nqb, nkb)`` of the per-head windows ``spans (H,)`` and the sinks,
    from the block bounds only (no element-level N×N evaluation); exact: it equals
    :func:`attnzoo.masks.block_layout` of the mask_mod."""
    nqb, nkb = -(-q_len // block), -(-kv_len // block)
    off = kv_len - q_len
    qf = torch.arange(nqb, device=device) * block + off
    ql = torch.clamp(qf + block - 1, max=q_len - 1 + off)
    kf = torch.arange(nkb, device=device) * block
    kl = torch.clamp(kf + block - 1, max=kv_len - 1)
    qf, ql = qf.view(1, -1, 1), ql.view(1, -1, 1)
    kf, kl = kf.view(1, 1, -1), kl.view(1, 1, -1)
    w = spans.to(device=device, dtype=torch.long).view(-1, 1, 1)
    if causal:  # differences d = i' - j fill [qf - kl, ql - kf]; need 0 <= d < w
        layout = (qf - kl).clamp(min=0) <= torch.minimum(ql - kf, w - 1)
        if sinks:
            layout = layout | ((kf < sinks) & (kf <= ql))
    else:  # need |d| <= w // 2
        layout = torch.maximum(qf - kl, -(w // 2)) <= torch.minimum(ql - kf, w // 2)
        if sinks:
            layout = layout | (kf < sinks)
    return layout


def block_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                    return_weights=False, alpha=DEFAULT_ALPHA, beta=0.0, sinks: int = 0, block_size: int = 64):
    """The block-sparse kernel over the key blocks each head's window (and the sinks) touch."""
    _check(alpha, beta, sinks, block_size)
    Hq, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    spans = head_spans(alpha, beta, Hq, Nk)
    lay_spans = spans[:1] if bool((spans == spans[0]).all()) else spans  # one span for all heads: one layout
    layout = moa_layout(Nq, Nk, block_size, lay_spans, int(sinks), causal, q.device)
    idx, valid = block_indices(layout)
    return block_sparse_attention(q, k, v, idx=idx, valid=valid, block=block_size, scale=scale, causal=causal,
                                  mask=mask, key_padding_mask=key_padding_mask,
                                  element_mask=_pattern(causal, spans, sinks, Nq, Nk))


# ---------------------------------------------------------------------------- decoding


class MoACache(WindowCache):
    """The sinks and the last ``max_h w_h`` tokens; ``max_len`` fixes the spans when β != 0."""

    def __init__(self, *args, max_len: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_len = max_len


def flex_attention(q, k, v, *, causal=False, mask=None, key_padding_mask=None, scale=None, dropout_p=0.0,
                   return_weights=False, alpha=DEFAULT_ALPHA, beta=0.0, sinks: int = 0):
    """FlexAttention with the same mask_mod (inference on CPU)."""
    _check(alpha, beta, sinks)
    spans = head_spans(alpha, beta, q.shape[1], k.shape[2], q.device)
    pattern = _pattern(causal, spans, sinks, q.shape[2], k.shape[2])
    return softmax.flex_with_pattern(q, k, v, pattern, causal=causal, mask=mask, key_padding_mask=key_padding_mask,
                                     scale=scale)


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


def init_state(batch_size, kv_heads, head_dim, v_dim, *, dtype=torch.float32, device=None, max_len=None,
               alpha=DEFAULT_ALPHA, beta=0.0, sinks=0, block_size=64):
    _check(alpha, beta, sinks, block_size)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise AttentionInputError(f"moa: max_len must be a positive int, got {max_len!r}")
    window = _cache_tokens(alpha, beta, max_len)
    return MoACache(batch_size, kv_heads, head_dim, v_dim, window, int(sinks), dtype, device, max_len=max_len)


def step(cache: MoACache, q, k, v, *, scale, impl="auto", alpha=DEFAULT_ALPHA, beta=0.0, sinks=0, block_size=64):
    """Attend the T new queries over the kept tokens plus the new ones, each head with its
    own span (by global positions) and the sinks; then keep the sinks and the last
    ``max_h w_h`` tokens."""
    _check(alpha, beta, sinks, block_size)
    Hq, T = q.shape[1], q.shape[2]
    if int(sinks) != cache.sinks or _cache_tokens(alpha, beta, cache.max_len) != cache.window:
        raise AttentionInputError("moa: step options (alpha, beta, sinks) differ from those the state was made with; "
                                  "pass the same options to init_state and step")
    if cache.max_len is not None and cache.length + T > cache.max_len:
        raise AttentionInputError(
            f"moa: decoding {T} more token(s) after {cache.length} goes past max_len={cache.max_len} given to init_state "
            f"(the spans were fixed for that length); make the state with a larger max_len"
        )
    spans = _decode_spans(alpha, beta, Hq, cache.max_len)
    return cache.attend(q, k, v, _pattern(True, spans, sinks, None, None), scale)


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


register(
    MethodSpec(
        name="moa",
        family="local",
        summary="a causal sliding window whose span differs per head, span_h(N) = α_h + β_h·N (MoA)",
        paper="MoA: Mixture of Sparse Attention for Automatic Large Language Model Compression",
        reference=reference,
        impls=[Impl("block", block_attention, mask_mod=True,
                    description="block-sparse kernel over a per-head layout of the key blocks each head's "
                                "window touches, O(N·w_max)"),
               Impl("flex", flex_attention, supports=softmax._flex_supports, mask_mod=True,
                    description="FlexAttention with the same mask_mod (CPU: inference only)")],
        exact=False,
        time="O(N w_max D)",
        memory="O(N w_max)",
        decoding=True,
        state_size="sinks + last max_h(w_h) tokens: ·2·Hkv·D per sequence, constant in N",
        init_state=init_state,
        step=step,
        # spans from 5 to 100 (one longer than the kernel's 64-token block) cycled over 2 or 4
        # heads, and sinks, so N = 63..1000 exercise the sparsity; beta stays 0 (decodable)
        test_options={"alpha": (5, 100, 17), "sinks": 2},
        rows_independent=False,  # a row's window depends on its lower-right aligned position
    )
)
