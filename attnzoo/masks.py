"""Attention masks as pure functions, with FlexAttention's signature.

A *mask_mod* is a function ``mask_mod(b, h, q_idx, kv_idx) -> bool tensor`` that
says whether query ``q_idx`` of batch ``b`` and head ``h`` may attend to key
``kv_idx`` (True = may attend). It must use only elementwise tensor operations
(no Python ``if`` on tensor values), so that the same function works

* on broadcast index grids, which is how :func:`dense_mask` builds a dense
  ``(B, H, Nq, Nk)`` boolean mask (any axis the function ignores stays of size 1),
* on one block at a time, which is how the blocked fast paths (``tiled``)
  evaluate it without ever materialising ``Nq x Nk``, and
* under ``torch.vmap`` on scalars, which is how FlexAttention's
  ``create_block_mask`` evaluates it (:func:`block_mask`).

Causal masks use PyTorch's *lower-right* alignment: with ``Nq`` queries and
``Nk`` keys, query ``i`` sees key ``j`` iff ``j <= i + (Nk - Nq)``. That is the
alignment decoding with a KV cache needs (the last query is the newest token).

Masks compose with :func:`and_masks` and :func:`or_masks`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .errors import AttentionInputError, fmt_shape

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "MaskMod",
    "causal_mask",
    "sliding_window_mask",
    "prefix_lm_mask",
    "document_mask",
    "modality_mutual_mask",
    "padding_mask",
    "full_mask",
    "and_masks",
    "or_masks",
    "dense_mask",
    "tensor_mask",
    "block_layout",
    "block_mask",
    "flex_available",
]


def full_mask() -> MaskMod:
    """Every query sees every key."""

    def full(b, h, q_idx, kv_idx):
        return (q_idx >= 0) & (kv_idx >= 0)

    return full


def causal_mask(q_len: Optional[int] = None, kv_len: Optional[int] = None) -> MaskMod:
    """Lower-right causal mask: query ``i`` sees key ``j`` iff ``j <= i + (kv_len - q_len)``.

    With no lengths (or equal lengths) this is the usual ``j <= i``.
    """
    offset = _offset(q_len, kv_len)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    causal.offset = offset  # type: ignore[attr-defined]
    return causal


def sliding_window_mask(
    window: int, causal: bool = True, q_len: Optional[int] = None, kv_len: Optional[int] = None
) -> MaskMod:
    """Sliding-window (local) mask.

    Causal: each query sees the last ``window`` keys, its own position included
    (positions aligned lower-right). Noncausal: ``window // 2`` keys on each side
    of the query's own position.
    """
    if int(window) < 1:
        raise AttentionInputError(f"window must be a positive int, got {window!r}")
    window = int(window)
    offset = _offset(q_len, kv_len)

    if causal:

        def sliding_window_causal(b, h, q_idx, kv_idx):
            pos = q_idx + offset
            return (kv_idx <= pos) & (kv_idx > pos - window)

        return sliding_window_causal

    half = window // 2

    def sliding_window(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        return (kv_idx - pos).abs() <= half

    return sliding_window


def prefix_lm_mask(prefix_len: int, q_len: Optional[int] = None, kv_len: Optional[int] = None) -> MaskMod:
    """Prefix-LM: keys in the first ``prefix_len`` positions are visible to every
    query (the prefix is bidirectional); the rest is causal (lower-right)."""
    prefix_len = int(prefix_len)
    offset = _offset(q_len, kv_len)

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_len) | (kv_idx <= q_idx + offset)

    return prefix_lm


def document_mask(segment_ids: torch.Tensor, kv_segment_ids: Optional[torch.Tensor] = None) -> MaskMod:
    """Packed sequences: a query sees only keys of the same document.

    ``segment_ids``: integer tensor ``(N,)`` or ``(B, N)`` giving each query
    position's document id; ``kv_segment_ids`` likewise for keys (defaults to the
    same tensor, i.e. self-attention). Combine with :func:`causal_mask` via
    :func:`and_masks` for causal packed training.
    """
    q_ids = _as_segment_ids(segment_ids, "segment_ids")
    kv_ids = q_ids if kv_segment_ids is None else _as_segment_ids(kv_segment_ids, "kv_segment_ids")

    def document(b, h, q_idx, kv_idx):
        return _take_ids(q_ids, b, q_idx) == _take_ids(kv_ids, b, kv_idx)

    return document


def modality_mutual_mask(
    mutual_len: int, start: int = 0, q_len: Optional[int] = None, kv_len: Optional[int] = None
) -> MaskMod:
    """Modality-mutual attention (AKI, "Seeing is Understanding: Unlocking Causal
    Attention into Modality-Mutual Attention for Multimodal LLMs").

    Queries at positions ``[start, start + mutual_len)`` — e.g. the image tokens
    that precede the text in a decoder-only MLLM — attend to the *whole*
    sequence, including later text tokens; every other query stays causal.
    Positions are query positions aligned lower-right to the keys.
    """
    mutual_len, start = int(mutual_len), int(start)
    offset = _offset(q_len, kv_len)

    def modality_mutual(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        mutual = (pos >= start) & (pos < start + mutual_len)
        return mutual | (kv_idx <= pos)

    return modality_mutual


def padding_mask(key_padding_mask: torch.Tensor) -> MaskMod:
    """Key padding as a mask_mod: ``key_padding_mask`` is ``(B, Nk)`` bool, True = real token."""
    kpm = key_padding_mask

    def padding(b, h, q_idx, kv_idx):
        return kpm[b, kv_idx]

    return padding


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """A query may attend iff *all* the given masks allow it."""
    if not mask_mods:
        raise AttentionInputError("and_masks needs at least one mask_mod, got none")

    def and_mask(b, h, q_idx, kv_idx):
        out = mask_mods[0](b, h, q_idx, kv_idx)
        for mod in mask_mods[1:]:
            out = out & mod(b, h, q_idx, kv_idx)
        return out

    return and_mask


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """A query may attend iff *any* of the given masks allows it."""
    if not mask_mods:
        raise AttentionInputError("or_masks needs at least one mask_mod, got none")

    def or_mask(b, h, q_idx, kv_idx):
        out = mask_mods[0](b, h, q_idx, kv_idx)
        for mod in mask_mods[1:]:
            out = out | mod(b, h, q_idx, kv_idx)
        return out

    return or_mask


def tensor_mask(mask: torch.Tensor) -> MaskMod:
    """A dense bool mask broadcastable to ``(B, H, Nq, Nk)`` as a mask_mod (indexing it;
    size-1 axes are broadcast), so it composes with other mask_mods and FlexAttention."""
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)

    def dense(b, h, q_idx, kv_idx):
        return m[b if m.shape[0] > 1 else 0, h if m.shape[1] > 1 else 0,
                 q_idx if m.shape[2] > 1 else 0, kv_idx if m.shape[3] > 1 else 0]

    return dense


def dense_mask(
    mask_mod: MaskMod,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    device=None,
    *,
    q_start: int = 0,
    kv_start: int = 0,
    expand: bool = False,
) -> torch.Tensor:
    """Evaluate ``mask_mod`` on a broadcast index grid.

    Returns a bool tensor broadcastable to ``(batch, heads, q_len, kv_len)``
    (axes the function ignores keep size 1 unless ``expand=True``). ``q_start``
    and ``kv_start`` offset the indices, to evaluate one block of a larger mask.
    """
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    qi = torch.arange(q_start, q_start + q_len, device=device).view(1, 1, -1, 1)
    ki = torch.arange(kv_start, kv_start + kv_len, device=device).view(1, 1, 1, -1)
    out = mask_mod(b, h, qi, ki)
    if not isinstance(out, torch.Tensor):
        out = torch.tensor(bool(out), device=device)
    out = out.to(torch.bool)
    while out.dim() < 4:
        out = out.unsqueeze(0)
    # A mod that depends only on q_idx (or only on kv_idx) gives a (.., Nq, 1) result:
    # broadcast it to the full block so every caller sees the true extent.
    out = out.expand(*out.shape[:2], q_len, kv_len)
    if expand:
        out = out.expand(batch, heads, q_len, kv_len)
    return out


def block_layout(
    mask_mod: MaskMod, batch: int, heads: int, q_len: int, kv_len: int, block_size: int = 128, device=None
) -> torch.Tensor:
    """Which ``block_size x block_size`` tiles of the mask have any True entry.

    Returns a bool tensor ``(B', H', ceil(q_len/bs), ceil(kv_len/bs))`` (B', H' are 1
    when the mask ignores them). Computed one row of tiles at a time, so its
    memory is O(block_size * kv_len), never O(q_len * kv_len).
    """
    nq, nk = -(-q_len // block_size), -(-kv_len // block_size)
    rows = []
    for i in range(nq):
        qs = i * block_size
        qlen = min(block_size, q_len - qs)
        m = dense_mask(mask_mod, batch, heads, qlen, kv_len, device, q_start=qs)
        pad = nk * block_size - kv_len
        if pad:
            m = torch.nn.functional.pad(m, (0, pad), value=False)
        rows.append(m.any(dim=2).reshape(*m.shape[:2], nk, block_size).any(dim=-1))
    bsz = max(r.shape[0] for r in rows)
    hsz = max(r.shape[1] for r in rows)
    return torch.stack([r.expand(bsz, hsz, nk) for r in rows], dim=2)


def flex_available() -> bool:
    """Whether FlexAttention can be imported in this PyTorch build."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception:  # pragma: no cover - depends on the build
        return False
    return True


def block_mask(
    mask_mod: MaskMod,
    batch: Optional[int],
    heads: Optional[int],
    q_len: int,
    kv_len: int,
    device="cpu",
    block_size: int = 128,
):
    """FlexAttention ``BlockMask`` from the same ``mask_mod`` (where FlexAttention exists).

    ``batch``/``heads`` may be None when the mask does not depend on them.
    """
    if not flex_available():  # pragma: no cover - depends on the build
        raise RuntimeError(
            "block_mask needs torch.nn.attention.flex_attention, which this PyTorch build lacks; "
            "use dense_mask(...) or block_layout(...) instead"
        )
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, batch, heads, q_len, kv_len, device=device, BLOCK_SIZE=block_size)


# ---------------------------------------------------------------------------- helpers


def _offset(q_len: Optional[int], kv_len: Optional[int]) -> int:
    if (q_len is None) != (kv_len is None):
        raise AttentionInputError(
            f"give both q_len and kv_len for lower-right alignment, or neither; got q_len={q_len}, kv_len={kv_len}"
        )
    if q_len is None:
        return 0
    return int(kv_len) - int(q_len)


def _as_segment_ids(ids: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2) or ids.is_floating_point():
        shape = fmt_shape(ids) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise AttentionInputError(f"{name} must be an integer tensor of shape (N,) or (B, N), got {shape}")
    return ids


def _take_ids(ids: torch.Tensor, b, idx):
    if ids.dim() == 1:
        return ids[idx]
    return ids[b, idx]



def neighborhood_mask(kernel_size, dilation=1, grid=None, causal: bool = False, length: Optional[int] = None) -> MaskMod:
    """Neighborhood attention (NATTEN; "Neighborhood Attention Transformer",
    "Dilated Neighborhood Attention Transformer"), 1-D or 2-D, with dilation.

    Dilation ``d`` splits the positions of an axis into ``d`` sub-sequences (same index
    modulo ``d``); a query attends only within its own sub-sequence, to the
    ``kernel_size`` positions nearest to it there. At the borders the window *shifts*
    instead of being cropped, so every query sees exactly ``kernel_size`` keys per axis:
    on a sub-sequence of length ``L`` the query at sub-position ``p`` sees sub-positions
    ``[s, s + k)`` with ``s = clamp(p - k // 2, 0, L - k)``.

    * 1-D noncausal: give ``length`` (N), needed for the border shift.
    * 1-D ``causal=True``: query ``i`` sees ``j = i, i - d, ..., i - (k - 1)·d`` (those
      ``>= 0``; fewer at the very start, no shifting forward). ``length`` is not needed.
    * 2-D: ``grid=(H, W)``, tokens in row-major order, the rule above on each axis;
      ``kernel_size`` and ``dilation`` may be ints or ``(rows, cols)`` pairs. Noncausal only.

    A window longer than its axis (``kernel_size > N``, e.g. the defaults on a short
    sequence) is clamped to the axis: every query then sees the whole axis. With
    dilation, every sub-sequence must hold a full window (``N // d >= kernel_size``),
    otherwise this raises. The returned function carries the resolved parameters as
    attributes ``kernel`` (per axis, clamped), ``dilation`` (per axis), ``grid``,
    ``causal`` and ``length``.
    """

    def as_pair(name, value, dims):
        vals = tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
        if len(vals) != dims or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in vals):
            shape = "a positive int" if dims == 1 else "a positive int or a pair of positive ints (rows, cols)"
            raise AttentionInputError(f"neighborhood: {name} must be {shape}, got {value!r}")
        return vals

    if grid is not None:
        try:
            gh, gw = (int(x) for x in grid)
        except (TypeError, ValueError):
            raise AttentionInputError(f"neighborhood: grid must be a pair of ints (H, W), got {grid!r}") from None
        if gh < 1 or gw < 1:
            raise AttentionInputError(f"neighborhood: grid must be positive, got {grid!r}")
        if causal:
            raise AttentionInputError(
                f"neighborhood attention on a 2-D grid (grid={grid!r}) has no causal form; "
                "use causal=False, or a 1-D sequence (grid=None) for causal neighborhood attention"
            )
        if length is not None and int(length) != gh * gw:
            raise AttentionInputError(
                f"neighborhood: grid={grid!r} has {gh * gw} cells but the sequence has length {length}; "
                "tokens must be the H·W grid cells in row-major order"
            )
        axes = ((gh, "rows (H)"), (gw, "cols (W)"))
        kernels, dils = as_pair("kernel_size", kernel_size, 2), as_pair("dilation", dilation, 2)
    else:
        kernels, dils = as_pair("kernel_size", kernel_size, 1), as_pair("dilation", dilation, 1)
        if causal:
            axes = None
        else:
            if length is None:
                raise AttentionInputError(
                    "neighborhood_mask: 1-D noncausal neighborhood attention needs length=N (the border windows shift)"
                )
            if int(length) < 1:
                raise AttentionInputError(f"neighborhood: length must be a positive int, got {length!r}")
            axes = ((int(length), "sequence"),)

    if axes is not None:  # clamp the window to its axis; every dilated sub-sequence must hold it
        clamped = []
        for (n, what), k, d in zip(axes, kernels, dils):
            k = min(k, n)
            if n // d < k:
                raise AttentionInputError(
                    f"neighborhood attention: kernel_size={k} with dilation={d} does not fit the {what} axis of "
                    f"length {n}: it splits into {d} dilated sub-sequences, the shortest of length {n // d} < "
                    f"kernel_size {k}; every query must see kernel_size neighbours on its sub-sequence, so use "
                    f"kernel_size * dilation <= {n} (a smaller kernel_size or dilation)"
                )
            clamped.append(k)
        kernels = tuple(clamped)

    def axis_window(qi, ki, n, k, d):
        """Key ``ki`` is among the ``k`` neighbours of query ``qi`` on an axis of length ``n``."""
        g = qi % d
        sub_len = (n - g + d - 1) // d  # length of the query's dilated sub-sequence
        start = torch.minimum((qi // d - k // 2).clamp(min=0), sub_len - k)
        kp = ki // d
        return ((ki % d) == g) & (kp >= start) & (kp < start + k)

    if grid is not None:
        (kh, kw), (dh, dw) = kernels, dils

        def neighborhood_2d(b, h, q_idx, kv_idx):
            rows = axis_window(q_idx // gw, kv_idx // gw, gh, kh, dh)
            return rows & axis_window(q_idx % gw, kv_idx % gw, gw, kw, dw)

        mod = neighborhood_2d
    elif causal:
        (k1,), (d1,) = kernels, dils

        def neighborhood_causal(b, h, q_idx, kv_idx):
            back = q_idx - kv_idx
            return (back >= 0) & (back <= (k1 - 1) * d1) & ((back % d1) == 0)

        mod = neighborhood_causal
    else:
        (k1,), (d1,) = kernels, dils
        n1 = axes[0][0]

        def neighborhood(b, h, q_idx, kv_idx):
            return axis_window(q_idx, kv_idx, n1, k1, d1)

        mod = neighborhood

    mod.kernel = kernels  # type: ignore[attr-defined]
    mod.dilation = dils  # type: ignore[attr-defined]
    mod.grid = None if grid is None else (gh, gw)  # type: ignore[attr-defined]
    mod.causal = bool(causal)  # type: ignore[attr-defined]
    mod.length = None if length is None else int(length)  # type: ignore[attr-defined]
    return mod


__all__.append("neighborhood_mask")


def sink_mask(sinks: int) -> MaskMod:
    """Attention sinks: the first ``sinks`` key positions are visible to every query
    (StreamingLLM, "Efficient Streaming Language Models with Attention Sinks"). Combine
    with a window via :func:`or_masks`, and with :func:`causal_mask` via :func:`and_masks`."""
    sinks = int(sinks)

    def sink(b, h, q_idx, kv_idx):
        return (kv_idx < sinks) & (q_idx >= 0)

    return sink


def sliding_window_sink_mask(
    window: int, sinks: int = 0, causal: bool = True, q_len: Optional[int] = None, kv_len: Optional[int] = None
) -> MaskMod:
    """The ``sliding_window`` method's pattern: a sliding window (see
    :func:`sliding_window_mask`) or one of the first ``sinks`` keys; causal (lower-right)
    when ``causal``."""
    mod = sliding_window_mask(window, causal, q_len, kv_len)
    if sinks:
        mod = or_masks(mod, sink_mask(sinks))
        if causal:
            mod = and_masks(mod, causal_mask(q_len, kv_len))
    return mod


__all__ += ["sink_mask", "sliding_window_sink_mask"]


def _head_values(values, name: str, minimum: int = 1) -> torch.Tensor:
    """Per-head integers (an int, a sequence or a 1-D tensor) as a 1-D long tensor on the
    CPU; head ``h`` uses entry ``h % len`` (the list is cycled over the heads)."""
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() and not bool((values == values.round()).all()):
            raise AttentionInputError(f"{name} must hold integers, got {values.tolist()}")
        vals = values.detach().flatten().to("cpu", torch.long)
    else:
        seq = list(values) if isinstance(values, (list, tuple)) else [values]
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in seq):
            raise AttentionInputError(f"{name} must be an int or a list/tuple of ints (one per head), got {values!r}")
        vals = torch.tensor(seq, dtype=torch.long)
    if vals.numel() == 0 or bool((vals < minimum).any()):
        raise AttentionInputError(f"{name} must be a non-empty list of ints >= {minimum} (one per head), got {vals.tolist()}")
    return vals


def _take_head(values: torch.Tensor, h):
    """``values[h % len(values)]`` elementwise: on a broadcast head index grid, one block of
    it, or a batched scalar under ``torch.vmap``."""
    if not isinstance(h, torch.Tensor):
        return int(values[int(h) % values.numel()])
    return values.to(h.device)[h % values.numel()]


def dilated_window_mask(
    window: int, dilations=(1, 2, 4, 8), causal: bool = True, q_len: Optional[int] = None,
    kv_len: Optional[int] = None,
) -> MaskMod:
    """LongNet's dilated sliding window ("LongNet: Scaling Transformers to 1,000,000,000
    Tokens"), the dilation varying across heads: head ``h`` uses ``r = dilations[h % len]``.

    With ``i' = i + kv_len - q_len`` (lower-right alignment) and ``d = i' - j``:

    * causal: query ``i`` sees ``j = i' - r·t`` for ``t = 0..window-1`` (``j >= 0``), i.e.
      ``d >= 0``, ``d % r == 0`` and ``d // r < window``;
    * noncausal: ``|d| % r == 0`` and ``|d| // r <= window // 2`` (``window // 2`` dilated
      steps on each side).

    ``dilations``: an int or a list/tuple/1-D tensor of positive ints, cycled over the heads.
    The returned function carries ``window``, ``dilations`` (the long tensor), ``causal`` and
    ``offset`` as attributes.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise AttentionInputError(f"window must be a positive int, got {window!r}")
    rates = _head_values(dilations, "dilations")
    offset = _offset(q_len, kv_len)

    if causal:

        def dilated_window_causal(b, h, q_idx, kv_idx):
            r = _take_head(rates, h)
            back = q_idx + offset - kv_idx
            return (back >= 0) & (back % r == 0) & (back < r * window)

        mod = dilated_window_causal
    else:
        half = window // 2

        def dilated_window(b, h, q_idx, kv_idx):
            r = _take_head(rates, h)
            dist = (q_idx + offset - kv_idx).abs()
            return (dist % r == 0) & (dist <= r * half)

        mod = dilated_window

    mod.window, mod.dilations, mod.causal, mod.offset = window, rates, bool(causal), offset  # type: ignore[attr-defined]
    return mod


def per_head_window_mask(
    spans, sinks: int = 0, causal: bool = True, q_len: Optional[int] = None, kv_len: Optional[int] = None
) -> MaskMod:
    """A sliding window whose span differs per head (MoA, "MoA: Mixture of Sparse Attention
    for Automatic Large Language Model Compression"), plus ``sinks`` initial tokens.

    Head ``h`` uses ``w = spans[h % len(spans)]``. Causal: query ``i`` sees the last ``w``
    keys up to its aligned position ``i' = i + kv_len - q_len`` (its own included),
    ``i' - w < j <= i'``, or ``j < sinks`` with ``j <= i'``. Noncausal: ``|j - i'| <= w // 2``
    or ``j < sinks``. ``spans``: an int or a list/tuple/1-D tensor of positive ints. The
    returned function carries ``spans`` (the long tensor), ``sinks``, ``causal`` and
    ``offset`` as attributes.
    """
    widths = _head_values(spans, "spans")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise AttentionInputError(f"sinks must be an int >= 0, got {sinks!r}")
    offset = _offset(q_len, kv_len)

    if causal:

        def per_head_window_causal(b, h, q_idx, kv_idx):
            w = _take_head(widths, h)
            back = q_idx + offset - kv_idx
            return (back >= 0) & ((back < w) | (kv_idx < sinks))

        mod = per_head_window_causal
    else:

        def per_head_window(b, h, q_idx, kv_idx):
            w = _take_head(widths, h)
            return ((q_idx + offset - kv_idx).abs() <= w // 2) | (kv_idx < sinks)

        mod = per_head_window

    mod.spans, mod.sinks, mod.causal, mod.offset = widths, sinks, bool(causal), offset  # type: ignore[attr-defined]
    return mod


__all__ += ["dilated_window_mask", "per_head_window_mask"]
