"""Masks and score modifiers, as pure functions with FlexAttention's signatures.

* A *mask_mod* ``mask_mod(b, h, q_idx, kv_idx) -> bool`` says whether query ``q_idx``
  may attend to key ``kv_idx`` (True = may attend). The same function gives the dense
  mask (:func:`dense_mask`), the tile layout (:func:`block_layout`), FlexAttention's
  ``BlockMask`` (:func:`block_mask`), and is evaluated tile by tile by the blocked fast
  paths, never as N×N. Compose with :func:`and_masks` / :func:`or_masks`.
* A *score_mod* ``score_mod(score, b, h, q_idx, kv_idx) -> score`` changes the scaled
  scores: :func:`softcap`, :func:`alibi`, :func:`tensor_bias` (a float mask),
  :func:`query_scale` (per-query temperatures); :func:`compose_score_mods` chains them.

Causal masks use PyTorch's lower-right alignment: with ``Nq`` queries and ``Nk`` keys,
query ``i`` sees key ``j`` iff ``j <= i + (Nk - Nq)``.

The generic functions live in :mod:`attnzoo.kernels.masking` and
:mod:`attnzoo.kernels.score_mods`. A method's own pattern lives in its method file
(e.g. ``neighborhood_mask`` in ``methods/local/neighborhood.py``) and is re-exported
here by name, so ``from attnzoo.masks import neighborhood_mask`` works for every method.
"""

from __future__ import annotations

from . import registry
from .kernels.masking import (  # noqa: F401
    MaskMod,
    and_masks,
    block_layout,
    block_mask,
    causal_mask,
    dense_mask,
    document_mask,
    flex_available,
    full_mask,
    modality_mutual_mask,
    or_masks,
    padding_mask,
    prefix_lm_mask,
    sink_mask,
    sliding_window_mask,
    tensor_mask,
)
from .kernels.multimodal_masks import (  # noqa: F401
    bidirectional_image_mask, candidate_isolation_mask, video_causal_cross_mask)
from .kernels.score_mods import ScoreMod, additive, alibi, alibi_slopes, query_scale, softcap, tensor_bias  # noqa: F401
from .kernels.score_mods import compose as compose_score_mods  # noqa: F401

_GENERIC = [
    "MaskMod", "full_mask", "causal_mask", "sliding_window_mask", "prefix_lm_mask", "document_mask",
    "modality_mutual_mask", "candidate_isolation_mask", "video_causal_cross_mask", "bidirectional_image_mask",
    "padding_mask", "sink_mask", "and_masks", "or_masks", "tensor_mask", "dense_mask",
    "block_layout", "block_mask", "flex_available",
    "ScoreMod", "softcap", "alibi", "alibi_slopes", "tensor_bias", "query_scale", "additive", "compose_score_mods",
]


def method_masks() -> dict:
    """The mask_mod factories the registered methods declare, by name."""
    return {f.__name__: f for spec in registry.list_methods() for f in spec.mask_mods}


def __getattr__(name: str):
    found = method_masks().get(name)
    if found is None:
        raise AttributeError(f"module 'attnzoo.masks' has no attribute {name!r}")
    return found


def __dir__():
    return sorted(set(_GENERIC) | set(method_masks()) | {"method_masks"})


__all__ = _GENERIC + ["method_masks"]
