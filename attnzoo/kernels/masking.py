"""Attention masks as pure functions, with FlexAttention's signature, and the combined
mask of a call evaluated block by block (:class:`Masker`).

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

from ..errors import AttentionInputError, fmt_shape

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]



def full_mask() -> MaskMod:
    """Every query sees every key."""

    def full(b, h, q_idx, kv_idx):
        return (q_idx >= 0) & (kv_idx >= 0)

    return full


def causal_mask(q_len: Optional[int] = None, kv_len: Optional[int] = None) -> MaskMod:
    """Lower-right causal mask: query ``i`` sees key ``j`` iff ``j <= i + (kv_len - q_len)``.

    With no lengths (or equal lengths) this is the usual ``j <= i``.
    """
    offset = offset_of(q_len, kv_len)

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
    offset = offset_of(q_len, kv_len)

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
    offset = offset_of(q_len, kv_len)

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
    offset = offset_of(q_len, kv_len)

    def modality_mutual(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        mutual = (pos >= start) & (pos < start + mutual_len)
        return mutual | (kv_idx <= pos)

    return modality_mutual


def padding_mask(key_padding_mask: torch.Tensor) -> MaskMod:
    """Key padding as a mask_mod: ``key_padding_mask`` is ``(B, Nk)`` bool with
    ``nn.MultiheadAttention``'s meaning, True = padding (never attended)."""
    keep = ~key_padding_mask

    def padding(b, h, q_idx, kv_idx):
        return keep[b, kv_idx]

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


def offset_of(q_len: Optional[int], kv_len: Optional[int]) -> int:
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


def sink_mask(sinks: int) -> MaskMod:
    """Attention sinks: the first ``sinks`` key positions are visible to every query
    (StreamingLLM, "Efficient Streaming Language Models with Attention Sinks"). Combine
    with a window via :func:`or_masks`, and with :func:`causal_mask` via :func:`and_masks`."""
    sinks = int(sinks)

    def sink(b, h, q_idx, kv_idx):
        return (kv_idx < sinks) & (q_idx >= 0)

    return sink


def head_values(values, name: str, minimum: int = 1) -> torch.Tensor:
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


def take_head(values: torch.Tensor, h):
    """``values[h % len(values)]`` elementwise: on a broadcast head index grid, one block of
    it, or a batched scalar under ``torch.vmap``."""
    if not isinstance(h, torch.Tensor):
        return int(values[int(h) % values.numel()])
    return values.to(h.device)[h % values.numel()]


# --------------------------------------------------------------------- a call's mask


class Masker:
    """The combined mask of a call — causal (lower-right), a dense mask or a mask_mod,
    and a key mask (``(B, Nk)`` bool, True = real key) — evaluated on any
    ``[qs:qe] x [ks:ke]`` block, so blocked paths never build the ``Nq x Nk`` mask.

    ``block`` returns a bool tensor broadcastable to ``(B, Hq, qe-qs, ke-ks)`` or None
    when everything is visible.
    """

    __slots__ = ("causal", "mask", "key_mask", "batch", "heads", "q_len", "kv_len", "offset", "device")

    def __init__(self, *, causal, mask, key_mask, batch, heads, q_len, kv_len, device):
        self.causal = causal
        self.mask = mask
        self.key_mask = key_mask
        self.batch, self.heads = batch, heads
        self.q_len, self.kv_len = q_len, kv_len
        self.offset = kv_len - q_len
        self.device = device

    @property
    def trivial(self) -> bool:
        return not self.causal and self.mask is None and self.key_mask is None

    def key_end(self, qs: int, qe: int) -> int:
        """One past the last key any query in ``[qs, qe)`` may see under causality."""
        if not self.causal:
            return self.kv_len
        return max(0, min(self.kv_len, qe - 1 + self.offset + 1))

    def block(self, qs: int, qe: int, ks: int, ke: int) -> Optional[torch.Tensor]:
        out = None
        if self.causal and ke - 1 > qs + self.offset:  # some key in the block is in the future
            qi = torch.arange(qs, qe, device=self.device).view(-1, 1) + self.offset
            ki = torch.arange(ks, ke, device=self.device).view(1, -1)
            out = (ki <= qi).view(1, 1, qe - qs, ke - ks)
        if self.mask is not None:
            if isinstance(self.mask, torch.Tensor):
                m = self.mask
                m = m[..., qs:qe, :] if m.shape[-2] != 1 else m
                m = m[..., ks:ke] if m.shape[-1] != 1 else m
            else:
                m = dense_mask(self.mask, self.batch, self.heads, qe - qs, ke - ks, self.device, q_start=qs, kv_start=ks)
            out = m if out is None else out & m
        if self.key_mask is not None:
            m = self.key_mask[:, ks:ke].view(self.batch, 1, 1, ke - ks)
            out = m if out is None else out & m
        return out

    def full(self) -> Optional[torch.Tensor]:
        """The whole ``(B', H', Nq, Nk)`` mask (dense references), or None."""
        return self.block(0, self.q_len, 0, self.kv_len)

    def mask_mod(self) -> Optional[MaskMod]:
        """The combined mask as one mask_mod (for FlexAttention), or None when trivial."""
        if self.trivial:
            return None
        causal, offset, user, keys = self.causal, self.offset, self.mask, self.key_mask
        if isinstance(user, torch.Tensor):
            user = tensor_mask(user)

        def call_mask(b, h, q_idx, kv_idx):
            ok = (kv_idx <= q_idx + offset) if causal else (kv_idx >= 0)
            if user is not None:
                ok = ok & user(b, h, q_idx, kv_idx)
            if keys is not None:
                ok = ok & keys[b, kv_idx]
            return ok

        return call_mask


def make_masker(q, k, causal, mask, key_mask) -> Masker:
    """The :class:`Masker` of a call on ``q (B, Hq, Nq, D)`` and ``k (B, Hkv, Nk, D)``."""
    return Masker(causal=causal, mask=mask, key_mask=key_mask, batch=q.shape[0], heads=q.shape[1],
                  q_len=q.shape[2], kv_len=k.shape[2], device=q.device)


def group_mask(allowed: torch.Tensor, kv_heads: int, groups: int) -> torch.Tensor:
    """A mask broadcastable to ``(B, Hq, n, m)`` in the grouped layout ``(B, Hkv, G, n, m)``."""
    if allowed.shape[1] == 1:
        return allowed.unsqueeze(1)
    return allowed.reshape(allowed.shape[0], kv_heads, groups, allowed.shape[2], allowed.shape[3])
