"""Shared building blocks of the attention methods.

Kernels import only torch and :mod:`attnzoo.errors` (and each other): no registry,
no method, no API. A method file composes them; two methods never import each other.

* :mod:`~attnzoo.kernels.masking` — mask_mods (causal, windows, prefix, documents, ...),
  their dense and block forms from one function, and :class:`Masker`, the combined
  mask of a call evaluated on any block;
* :mod:`~attnzoo.kernels.score_mods` — score_mods (soft-capping, ALiBi, biases,
  temperatures, float masks) with FlexAttention's signature, evaluated on blocks;
* :mod:`~attnzoo.kernels.common` — accumulation dtypes, GQA helpers, visible-key counts;
* :mod:`~attnzoo.kernels.dense` — dense masked softmax (the references' core);
* :mod:`~attnzoo.kernels.sdpa` — ``scaled_dot_product_attention`` with masks and biases;
* :mod:`~attnzoo.kernels.tiled` — FlashAttention's online softmax, forward and backward;
* :mod:`~attnzoo.kernels.splitk` — split-K (flash-decoding) with the exact merge;
* :mod:`~attnzoo.kernels.segmented` — the segmented executor (recompute per segment);
* :mod:`~attnzoo.kernels.blocksparse` — softmax over the kept tiles of a block layout;
* :mod:`~attnzoo.kernels.flex` — FlexAttention with cached block masks;
* :mod:`~attnzoo.kernels.linear_scan` — chunked linear-attention scans and feature maps;
* :mod:`~attnzoo.kernels.caches` — decoding states: KV cache, window cache, recurrent
  state, and the decoders built on them;
* :mod:`~attnzoo.kernels.windows` — window layouts, softmax over a pattern (dense,
  block-sparse, band, FlexAttention);
* :mod:`~attnzoo.kernels.block_select` — block geometry and lowest-index-wins top-k of
  the block-retrieval methods (landmark, hip, combiner);
* :mod:`~attnzoo.kernels.routing_select` — the selection arithmetic and top-k programs of
  the routed methods (routing, bilevel_routing, seer).
"""
