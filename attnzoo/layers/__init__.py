"""Layers: ``nn.Module`` building blocks over any registered method. The attention maths
lives in the methods; here are the projections, heads, positions and the glue.

* :class:`Attention` (:mod:`~attnzoo.layers.attention`) — multi-head self/cross attention
  with GQA, rotary embeddings, QK-norm, an output gate and decoding.
"""

from .attention import Attention, CausalLeakWarning, LayerCache, RotaryEmbedding

__all__ = ["Attention", "CausalLeakWarning", "LayerCache", "RotaryEmbedding"]
