"""Masks for multimodal sequences, as mask_mod factories (re-exported by :mod:`attnzoo.masks`).

Each factory returns a ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = may attend)
carrying a ``cache_key`` (its parameters), so one function gives the dense mask, the
tile layout, FlexAttention's block mask (cached) and the blocked kernels' per-tile
masks, and every method that takes masks takes it. They sit next to the generic
:func:`~attnzoo.kernels.masking.prefix_lm_mask` and
:func:`~attnzoo.kernels.masking.modality_mutual_mask` (AKI).

* :func:`candidate_isolation_mask` — Uni-Encoder ("Uni-Encoder: A Fast and Accurate
  Response Selection Paradigm for Generation-Based Dialogue Systems"): a context and
  several candidate responses encoded in one pass; each candidate attends the context
  and itself, never another candidate; the context attends only itself.
* :func:`video_causal_cross_mask` — Video-CCAM ("Video-CCAM: Enhancing Video-Language
  Understanding with Causal Cross-Attention Masks for Short and Long Videos"): the
  projector's learnt queries cross-attend the frames' visual tokens, query group ``t``
  only the frames ``0..t``, so the queries respect temporal order.
* :func:`bidirectional_image_mask` — Croc ("Croc: Pretraining Large Multimodal Models
  with Cross-Modal Comprehension"): a causal sequence in which the tokens of each image
  attend one another bidirectionally («bidirectional visual attention and unidirectional
  textual attention»).

Positions follow the library's lower-right alignment for the self-attention masks: with
``q_len`` queries over ``kv_len`` keys (decoding with a cache), query ``i`` sits at
position ``i + kv_len - q_len`` (give both or neither).

The functions use elementwise integer arithmetic on the index tensors only (no tensor
built at construction is indexed, except a caller's ``block_ids``), so they run on any
device, on broadcast index grids, on gathered index tensors and under ``torch.vmap``
(FlexAttention). Cost per evaluated pair: O(number of candidates / images).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import AttentionInputError, fmt_shape
from .masking import MaskMod, offset_of


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AttentionInputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _int_list(name: str, values, minimum: int = 1) -> tuple:
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise AttentionInputError(f"{name} must be a sequence of ints >= {minimum}, got {values!r}")
    out = tuple(values)
    if not out or not all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum for x in out):
        raise AttentionInputError(f"{name} must be a non-empty sequence of ints >= {minimum}, got {values!r}")
    return out


# ------------------------------------------------------------------- Uni-Encoder


def candidate_isolation_mask(context_len: int, candidate_lens: Sequence[int], *,
                             context_sees_candidates: bool = False, q_len: Optional[int] = None,
                             kv_len: Optional[int] = None) -> MaskMod:
    """Uni-Encoder's candidate isolation over ``[context | cand_1 | cand_2 | ...]``.

    The sequence holds ``context_len`` context tokens, then the candidates' tokens,
    ``candidate_lens[c]`` each. With ``seg(p)`` = 0 for a context position and ``c + 1``
    for a position of candidate ``c``:

        query p may attend key j  iff  seg(j) == 0          (the context)
                                   or  seg(j) == seg(p)     (its own segment)

    i.e. a candidate sees the context and itself, never another candidate, and the
    context sees only the context — so its encoding does not depend on the candidates
    and all candidates are scored in one pass. [J] The paper gives every candidate the
    same positions (they all start right after the context); positions are the model's
    business, the mask does not depend on them. ``context_sees_candidates=True`` lets the
    context attend every token instead. Defined for positions ``< context_len +
    sum(candidate_lens)``; later positions count as part of the last candidate.
    ``cache_key``: ``("candidate_isolation", context_len, candidate_lens,
    context_sees_candidates, offset)``.
    """
    context_len = _positive_int("context_len", context_len, minimum=0)
    lens = _int_list("candidate_lens", candidate_lens)
    offset = offset_of(q_len, kv_len)
    starts, pos = [], context_len
    for n in lens:
        starts.append(pos)
        pos += n
    sees_all = bool(context_sees_candidates)

    def segment(p):
        s = (p >= starts[0]).to(torch.int64) if isinstance(p, torch.Tensor) else int(p >= starts[0])
        for st in starts[1:]:
            s = s + (p >= st)
        return s

    def candidate_isolation(b, h, q_idx, kv_idx):
        sq, sk = segment(q_idx + offset), segment(kv_idx)
        ok = (sk == 0) | (sq == sk)
        if sees_all:
            ok = ok | (sq == 0)
        return ok

    candidate_isolation.cache_key = ("candidate_isolation", context_len, lens, sees_all, offset)
    return candidate_isolation


# --------------------------------------------------------------------- Video-CCAM


def query_frames(num_queries: int, num_frames: int) -> torch.Tensor:
    """The last frame each of ``num_queries`` queries may see: ``t_i = ceil((i + 1) T / Q) - 1``,
    ``(Q,)`` long — the queries cut into ``T`` consecutive groups as evenly as possible
    (``Q = g T``: group ``i // g``), the last query always seeing every frame."""
    i = torch.arange(int(num_queries))
    return ((i + 1) * int(num_frames) + int(num_queries) - 1) // int(num_queries) - 1


def video_causal_cross_mask(num_frames: int, tokens_per_frame: int, num_queries: int) -> MaskMod:
    """Video-CCAM's causal cross-attention mask: ``num_queries`` learnt queries over the
    visual tokens of ``num_frames`` frames, ``tokens_per_frame`` each, frame-major
    (key ``j`` belongs to frame ``j // tokens_per_frame``; ``Nk = T · P``).

        query i may attend key j  iff  j // P  <=  t_i = ceil((i + 1) T / Q) - 1

    [J] The queries are split into ``T`` consecutive, as-equal-as-possible groups, group
    ``t`` seeing frames ``0..t`` (the paper's causal cross-attention mask, written for any
    ``Q`` and ``T``: with ``Q = g T`` query ``i`` sees frames ``0..i // g``; with ``Q < T``
    several frames open at once). The mask depends only on ``T``, so a projector trained
    on 16 frames runs on 96 with ``num_frames=96``. Keys past ``T · P`` are never visible.
    ``cache_key``: ``("video_causal_cross", T, P, Q)``.
    """
    T = _positive_int("num_frames", num_frames)
    P = _positive_int("tokens_per_frame", tokens_per_frame)
    Q = _positive_int("num_queries", num_queries)

    def video_causal_cross(b, h, q_idx, kv_idx):
        last = ((q_idx + 1) * T + Q - 1) // Q - 1
        return (kv_idx // P <= last) & (kv_idx < T * P)

    video_causal_cross.cache_key = ("video_causal_cross", T, P, Q)
    return video_causal_cross


# --------------------------------------------------------------------------- Croc


def _spans(image_spans) -> tuple:
    try:
        spans = tuple((int(s), int(e)) for s, e in image_spans)
    except (TypeError, ValueError):
        raise AttentionInputError(f"image_spans must be a sequence of (start, end) pairs, got {image_spans!r}") from None
    if not spans:
        raise AttentionInputError("image_spans must hold at least one (start, end) pair, got none")
    prev_end = 0
    for s, e in sorted(spans):
        if s < 0 or e <= s:
            raise AttentionInputError(f"each image span (start, end) needs 0 <= start < end, got {(s, e)}")
        if s < prev_end:
            raise AttentionInputError(f"image spans must not overlap, got {spans}")
        prev_end = e
    return spans


def bidirectional_image_mask(image_spans=None, *, block_ids: Optional[torch.Tensor] = None,
                             q_len: Optional[int] = None, kv_len: Optional[int] = None) -> MaskMod:
    """Croc's mixed attention: causal (lower-right), except that the tokens of one image
    attend each other in both directions.

        query p may attend key j  iff  j <= p  or  p and j lie in the same image

    The images are ``image_spans``, half-open ``(start, end)`` token ranges (the same for
    every sequence of the batch), or ``block_ids``, an integer tensor ``(N,)`` or
    ``(B, N)`` with 0 for a text token and ``k > 0`` for the tokens of image ``k`` (per
    sequence; on the device of the attention call). Text stays unidirectional; an image
    token sees the text before its image and its whole image, so with one image in front
    this is a prefix-LM mask. ``cache_key``: ``("bidirectional_image", spans, offset)``, or
    the ids' contents.
    """
    offset = offset_of(q_len, kv_len)
    if (image_spans is None) == (block_ids is None):
        raise AttentionInputError("give image_spans ((start, end) pairs) or block_ids (a tensor), exactly one")
    if block_ids is not None:
        if not isinstance(block_ids, torch.Tensor) or block_ids.dim() not in (1, 2) or block_ids.is_floating_point():
            shape = fmt_shape(block_ids) if isinstance(block_ids, torch.Tensor) else type(block_ids).__name__
            raise AttentionInputError(f"block_ids must be an integer tensor of shape (N,) or (B, N), got {shape}")
        ids = block_ids
        last = ids.shape[-1] - 1

        def take(b, p):
            p = p.clamp(0, last) if isinstance(p, torch.Tensor) else min(max(int(p), 0), last)
            return ids[p] if ids.dim() == 1 else ids[b, p]

        def bidirectional_image(b, h, q_idx, kv_idx):
            pos = q_idx + offset
            iq, ik = take(b, pos), take(b, kv_idx)
            return (kv_idx <= pos) | ((iq == ik) & (iq > 0) & (pos >= 0) & (pos <= last) & (kv_idx <= last))

        bidirectional_image.cache_key = ("bidirectional_image_ids", tuple(ids.shape),
                                         tuple(ids.flatten().tolist()), offset)
        return bidirectional_image

    spans = _spans(image_spans)

    def bidirectional_image(b, h, q_idx, kv_idx):  # noqa: F811 - the spans form
        pos = q_idx + offset
        ok = kv_idx <= pos
        for s, e in spans:
            ok = ok | ((pos >= s) & (pos < e) & (kv_idx >= s) & (kv_idx < e))
        return ok

    bidirectional_image.cache_key = ("bidirectional_image", spans, offset)
    return bidirectional_image


__all__ = ["candidate_isolation_mask", "video_causal_cross_mask", "bidirectional_image_mask", "query_frames"]
