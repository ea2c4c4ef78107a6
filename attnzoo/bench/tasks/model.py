"""Small models for the quality tasks, built from :class:`attnzoo.layers.Attention`.

Two shapes, both pre-norm (``x + attn(norm(x))``, ``x + mlp(norm(x))``) with a final norm
and a linear head:

* :class:`SelfAttentionLM` — token embedding + learned absolute position embedding, then
  ``layers`` blocks of self-attention (causal or not) + MLP. Used by ``classify``
  (noncausal; the label is read at position 0), ``copy`` and ``mqar`` (causal, a logit per
  position).
* :class:`EncoderDecoder` — for the cross patterns. Encoder: token embedding + learned
  absolute position embedding + one position-wise MLP block, **no self-attention**.
  Decoder: its queries are learned position embeddings only (non-autoregressive), then
  ``layers`` blocks of cross-attention to the encoder memory (the method under test,
  causal or not) + MLP.

Judgement calls:

* [J] The encoder has no self-attention, so the decoder's cross-attention — the method
  under test, in the pattern under test — is the only path between positions: the
  accuracy of a cross task measures the method in that pattern and nothing else (an
  encoder self-attention in softmax would lend every method the same mixing; one in the
  method would mix a second pattern in, and for ``causal_cross`` a noncausal encoder
  would leak later inputs into earlier memory slots). It also halves the cost.
* [J] Position information is a learned absolute embedding added to the input (and to
  the decoder queries), so every method gets it — including linear attentions, which
  cannot use positions otherwise, and cross-attention, where :class:`Attention` applies
  no rotary embedding. The suite's self-attention models also use rotary embeddings
  (``rotary=True``; applied to q and k before the method, so every method sees them):
  with absolute positions alone softmax did not learn ``copy`` (accuracy 0.30 after 200
  steps, against 1.00 with rotary) nor MQAR in the quick budget.
* [J] :data:`TASK_IMPLS`: the models train with each method's reference implementation
  (softmax: SDPA; SOFT: its Nyström form), the fastest at these lengths; the accuracy
  does not depend on it (every implementation is tested equal to the reference).
* [J] :data:`TASK_OPTIONS` sets each configurable method's sparsity for the task's
  length: windows, blocks, clusters, landmarks and agents sized so a query sees roughly
  a quarter of the keys (block and region sizes ``N/8`` with ``topk=2``; windows
  ``N/4``), so a local or sparse method is really local or sparse at these short
  lengths, as it would be at the lengths it is meant for, and it shows in accuracy.
  The library's defaults (blocks and windows of 64 and more) would make most of them
  dense at the task lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ...layers import Attention


@dataclass(frozen=True)
class FixedLayout:
    """A Sparse-Transformer "fixed" block layout ("Generating Long Sequences with Sparse
    Transformers", Child et al., 2019) at tile level: query tile ``i`` keeps key tile
    ``j`` iff ``|i - j| < local`` (its own and neighbouring tiles) or ``j % stride ==
    stride - 1`` (the summary tiles, one per ``stride`` tiles, seen by every query).
    A picklable ``(heads, nqb, nkb) -> bool`` layout function for ``block_sparse``."""

    local: int = 1
    stride: int = 4

    def __call__(self, heads: int, nqb: int, nkb: int) -> torch.Tensor:
        i = torch.arange(nqb)[:, None]
        j = torch.arange(nkb)[None, :]
        lay = ((i - j).abs() < self.local) | (j % self.stride == self.stride - 1)
        return lay.unsqueeze(0)


def _frac(n: int, div: int, lo: int = 2) -> int:
    return max(lo, int(n) // div)


#: Method options for a task of length ``N`` (queries and keys): ``method -> f(N) -> dict``.
#: Methods absent here run with their defaults (softmax and its variants, the linear
#: family, recycled — exact softmax in a forward pass —, aaren).
TASK_OPTIONS: dict[str, Callable[[int], dict]] = {
    # local: a query sees about N/4 keys
    "sliding_window": lambda N: {"window": _frac(N, 4)},
    "neighborhood": lambda N: {"kernel_size": _frac(N, 4) + 1},
    # dilated: N/4 keys per query, spaced 1, 2, 4, 8 apart by head (cycled)
    "dilated": lambda N: {"window": _frac(N, 4), "dilations": (1, 2, 4, 8)},
    # MoA: per-head spans N/8, N/4, N/4, N/2 (cycled over heads; a quarter on average)
    "moa": lambda N: {"alpha": (_frac(N, 8), _frac(N, 4), _frac(N, 4), _frac(N, 2))},
    # block-routed: 8 blocks / regions of N/8, two chosen per query block (+ its own where the method adds it)
    "block_sparse": lambda N: {"layout": FixedLayout(local=1, stride=4), "block_size": _frac(N, 8)},
    "bilevel_routing": lambda N: {"region_size": _frac(N, 8), "topk": 2},
    "hip": lambda N: {"block_size": _frac(N, 8), "topk": 2},
    "landmark": lambda N: {"block_size": _frac(N, 8), "topk": 2},
    "seer": lambda N: {"block_size": _frac(N, 8), "topk": 2},
    # routing: 4 clusters of N/4 queries and N/4 keys
    "routing": lambda N: {"num_clusters": 4},
    # combiner keeps its default block of round(sqrt(N)) (full support at any length)
    # low rank: N/4 agents / landmarks
    "agent": lambda N: {"num_agents": _frac(N, 4)},
    "softmax_free": lambda N: {"num_landmarks": _frac(N, 4)},
}


#: Implementation the task models train with, by method; the rest use ``"reference"``.
#: All implementations of a method are tested equal (outputs and gradients), so the
#: accuracy does not depend on this choice, only the training time does: at the task
#: lengths (tens to hundreds of tokens) the dense references are the fastest for most
#: methods — the fast forms' blocking and gathering pays only at long lengths.
TASK_IMPLS: dict[str, str] = {"softmax": "sdpa", "softmax_free": "nystrom"}


def task_impl(method: str) -> str:
    """The implementation :data:`TASK_IMPLS` gives ``method`` (default ``"reference"``)."""
    return TASK_IMPLS.get(method, "reference")


def task_options(method: str, seq_len: int) -> dict:
    """The options :data:`TASK_OPTIONS` gives ``method`` at length ``seq_len`` (``{}`` if none)."""
    f = TASK_OPTIONS.get(method)
    return dict(f(int(seq_len))) if f is not None else {}


class MLP(nn.Module):
    def __init__(self, dim: int, mult: int = 2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """Pre-norm block: (self- or cross-) attention, then MLP."""

    def __init__(self, dim: int, heads: int, method: str, causal: bool, *, rotary: bool = False,
                 impl: str = "auto", options: Optional[dict] = None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, method=method, causal=causal, rotary=rotary, impl=impl, **(options or {}))
        self.mlp = MLP(dim)

    def forward(self, x, context=None):
        x = x + self.attn(self.norm1(x), context=context)
        return x + self.mlp(self.norm2(x))


class SelfAttentionLM(nn.Module):
    """Embedding + learned positions, ``layers`` self-attention blocks, head ``(B, N, out_dim)``."""

    def __init__(self, vocab_size: int, max_len: int, out_dim: int, *, method: str, causal: bool, dim: int = 64,
                 heads: int = 4, layers: int = 2, rotary: bool = False, impl: str = "auto",
                 options: Optional[dict] = None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, method, causal, rotary=rotary, impl=impl, options=options)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


class EncoderDecoder(nn.Module):
    """Position-wise encoder (no attention) and a decoder of position queries that
    cross-attends to it with the method under test; ``(B, tgt_len, out_dim)``."""

    def __init__(self, vocab_size: int, max_len: int, out_dim: int, *, method: str, causal: bool, dim: int = 64,
                 heads: int = 4, layers: int = 2, impl: str = "auto", options: Optional[dict] = None):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.src_pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.tgt_pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.encoder = MLP(dim)
        self.enc_norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(Block(dim, heads, method, causal, impl=impl, options=options)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, source: torch.Tensor, tgt_len: Optional[int] = None) -> torch.Tensor:
        B, N = source.shape
        h = self.embed(source) + self.src_pos[:N]
        memory = self.enc_norm(h + self.encoder(h))
        x = self.tgt_pos[: tgt_len or N].unsqueeze(0).expand(B, -1, -1)
        for blk in self.blocks:
            x = blk(x, context=memory)
        return self.head(self.norm(x))
