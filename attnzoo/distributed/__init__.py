"""Sequence parallelism on ``torch.distributed``: one sequence sharded across ranks.

When a sequence outgrows one device, each of ``P`` ranks holds ``n_r`` of its ``N``
tokens (a :class:`SequenceLayout`: contiguous shards, or zig-zag ones that balance
causal work) and the attention between tokens crosses ranks by one of:

* :func:`ring_attention` — exact softmax; K/V blocks passed around the ring with
  ``isend``/``irecv`` overlapped with compute, merged by their log-sum-exp ("Ring
  Attention with Blockwise Transformers for Near-Infinite Context"); forward and backward.
* :func:`ulysses_attention` — all-to-all from sequence shards to head shards, any attnzoo
  method in the middle, all-to-all back ("DeepSpeed Ulysses").
* :func:`lasp2` — linear attention (``lightning``, ``linear``): one all-gather of the
  per-rank memory states, whose size does not depend on N, with decay ("LASP-2:
  Rethinking Sequence Parallelism for Linear Attention and Its Hybrid"); :func:`lasp2h`
  and :func:`allgather_attention` for the softmax layers of hybrid stacks (LASP-2H).
* :func:`halo_attention` — ``sliding_window`` and 1-D ``neighborhood`` with a halo
  exchange of the neighbouring window tokens.
* :class:`SequenceParallelAttention` — the :class:`attnzoo.Attention` layer on a shard
  (``sequence_parallel=SequenceParallel(...)``); :func:`parallelize` converts a model.

Run with ``torchrun`` (``init_from_env`` joins the group: gloo on CPU; NCCL on GPU,
which uses the same ``torch.distributed`` calls but is untested here), or on one
machine with :func:`run_local`. :func:`count_bytes` counts what each rank sends;
``ring_bytes``, ``lasp2_bytes``, ... give the formulas; ``attnzoo bench distributed``
times 1, 2 and 4 processes.
"""

from .comm import CommCounter, count_bytes
from .halo import halo_attention, halo_bytes
from .lasp2 import allgather_attention, allgather_bytes, lasp2, lasp2_bytes, lasp2h
from .launch import init_from_env, run_local
from .layers import (SequenceParallel, SequenceParallelAttention, choose_strategy, parallelize,
                     sequence_parallel_attention)
from .layout import SequenceLayout
from .ring import ring_attention, ring_bytes
from .ulysses import ulysses_attention, ulysses_bytes

__all__ = [
    "CommCounter",
    "SequenceLayout",
    "SequenceParallel",
    "SequenceParallelAttention",
    "allgather_attention",
    "allgather_bytes",
    "choose_strategy",
    "count_bytes",
    "halo_attention",
    "halo_bytes",
    "init_from_env",
    "lasp2",
    "lasp2_bytes",
    "lasp2h",
    "parallelize",
    "ring_attention",
    "ring_bytes",
    "run_local",
    "sequence_parallel_attention",
    "ulysses_attention",
    "ulysses_bytes",
]
