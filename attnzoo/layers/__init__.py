"""Layers: ``nn.Module`` building blocks over any registered method. The attention maths
lives in the methods; here are the projections, heads, positions and the glue.

* :class:`Attention` (:mod:`~attnzoo.layers.attention`) — multi-head self/cross attention
  with GQA, rotary embeddings, QK-norm, an output gate and decoding.
* :mod:`~attnzoo.layers.vision` — 2-D layers (CSWin's stripes with LePE).
* :mod:`~attnzoo.layers.token_reduction` — EViT keep-and-fuse and ToMe merging between blocks.
* :mod:`~attnzoo.layers.mixtures` — head-level mixtures (MoH, soft mixtures with shared K/V,
  EchoAtt-style sharing across layers).
* :mod:`~attnzoo.layers.fusion` — cross-modal fusion (CrossViT, Perceiver/FIT latents,
  FIBER's gated cross-attention, LXMERT's co-attention).
"""

from .attention import Attention, CausalLeakWarning, LayerCache, RotaryEmbedding
from .fusion import (CoAttentionLayer, CrossViTFusion, FIBERFusion, FITBlock, FusedBackboneLayer,
                     GatedCrossAttention, LatentCrossAttention)
from .mixtures import EchoStack, MoHAttention, SharedWeightsAttention, SoftMixtureOfAttention, attention_similarity
from .token_reduction import (EViTReduction, ReducingBlock, ToMeMerge, TokenReduction, compose_index, evit_reduce,
                              restore, tome_merge)
from .vision import CrossShapedAttention, stripe_conv

__all__ = [
    "Attention", "CausalLeakWarning", "LayerCache", "RotaryEmbedding",
    # cross-modal fusion (layers/fusion.py)
    "CoAttentionLayer", "CrossViTFusion", "FIBERFusion", "FITBlock", "FusedBackboneLayer", "GatedCrossAttention",
    "LatentCrossAttention",
    # head-level mixtures (layers/mixtures.py)
    "EchoStack", "MoHAttention", "SharedWeightsAttention", "SoftMixtureOfAttention", "attention_similarity",
    # token reduction between blocks (layers/token_reduction.py)
    "EViTReduction", "ReducingBlock", "ToMeMerge", "TokenReduction", "compose_index", "evit_reduce", "restore",
    "tome_merge",
    # vision layers (layers/vision.py)
    "CrossShapedAttention", "stripe_conv",
]
