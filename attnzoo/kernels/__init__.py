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
* :mod:`~attnzoo.kernels.grid2d` — tokens on 2-D grids: window / shifted-window / halo /
  dilated partitions with the padding rule, group attention over them, pooling (the
  vision methods);
* :mod:`~attnzoo.kernels.grid_pool` — pooled keys on a 2-D grid and the ``grid`` option
  (pooled_kv, aggregated, gated_positional);
* :mod:`~attnzoo.kernels.rows` — row-chunked attention with a hand-written backward for
  weights that are an elementwise function of the scores (sigmoid, clipped softmax);
* :mod:`~attnzoo.kernels.heads` — head-level maths of the head mixtures (MoH's gates and
  balance loss, auxiliary losses, per-row data through the segmented executor);
* :mod:`~attnzoo.kernels.multimodal_masks` — mask_mods of multimodal sequences
  (candidate isolation, video causal cross-attention, ...), re-exported by :mod:`attnzoo.masks`;
* :mod:`~attnzoo.kernels.block_select` — block geometry and lowest-index-wins top-k of
  the block-retrieval methods (landmark, hip, combiner);
* :mod:`~attnzoo.kernels.routing_select` — the selection arithmetic and top-k programs of
  the routed methods (routing, bilevel_routing, seer).
"""
