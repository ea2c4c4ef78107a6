"""One small synthetic task per CAB attention pattern.

"CAB: Comprehensive Attention Benchmarking on Long Sequence Modeling" (Zhang et al.,
2023) sorts attention by pattern — noncausal/causal × self/cross — and compares methods
within each pattern. CAB's tasks are real ones (speech, summarisation, ...) that take
GPU-days; these are synthetic stand-ins, one per pattern, learnable in seconds to
minutes on a CPU by a two-layer model (:mod:`attnzoo.bench.tasks.model`), and each
built so that it cannot be solved without attention reaching far: a local window of a
quarter of the sequence leaves a clear part of the answers out of reach.

Every generator is a pure function ``(num_examples, seq_len, vocab_size, *, seed,
**setting) -> dict of tensors``, deterministic in ``seed`` (its own
``torch.Generator``). Targets that carry no loss are ``IGNORE`` (-100, the
``ignore_index`` of ``torch.nn.functional.cross_entropy``).

=================  ==================  ==========================================================
task               pattern             model
=================  ==================  ==========================================================
``classify``       noncausal_self      self-attention encoder, one label read at position 0
``copy``           causal_self         causal LM, next token, loss on the copied half only
``reverse``        noncausal_cross     encoder–decoder, decoder = position queries, cross-attention
``transduce``      causal_cross        same, cross-attention causal (query i sees memory 0..i)
=================  ==================  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...errors import AttentionInputError

IGNORE = -100


def _check(num_examples, seq_len, vocab_size, min_len, min_vocab):
    B, N, V = int(num_examples), int(seq_len), int(vocab_size)
    if B < 1:
        raise AttentionInputError(f"num_examples must be >= 1, got {num_examples}")
    if N < min_len:
        raise AttentionInputError(f"seq_len must be >= {min_len}, got {seq_len}")
    if V < min_vocab:
        raise AttentionInputError(f"vocab_size must be >= {min_vocab}, got {vocab_size}")
    return B, N, V


def classify(num_examples: int, seq_len: int, vocab_size: int, *, seed: int = 0, num_classes: int = 4) -> dict:
    """Noncausal self-attention: look up the value stored under the query key (one label
    per sequence, read at position 0).

    With ``C = num_classes`` and ``K = vocab_size // (C + 1)`` keys (``K >= 2``), token
    ``k`` in ``0..K-1`` is *query* ``k`` and token ``K + k·C + c`` is the *item* "key
    ``k``, value ``c``". ``inputs[:, 0]`` is a query token ``q``; positions ``1..N-1``
    hold items whose keys are drawn uniformly from the other ``K - 1`` keys, except at one
    uniformly random position, whose item has key ``q``; values are uniform in
    ``0..C-1``. ``labels[b]`` is the value of the one item with key ``q``. Tokens
    ``K·(C + 1) .. V-1`` are unused.

    Why noncausal self: position 0 (the query, acting as the CLS token) must find the one
    item with its key among ``N - 1`` items that may be anywhere after it — a causal
    model cannot answer at position 0, and a local window around it sees the answer
    only when it happens to be near the start. One attention head whose query is the key
    at position 0 and whose keys are the items' keys solves it, so a two-layer model
    learns it in a few hundred steps. Chance: ``1 / C``.

    Returns ``{"inputs": (B, N) long, "labels": (B,) long}``.
    """
    C = int(num_classes)
    if C < 2:
        raise AttentionInputError(f"num_classes must be >= 2, got {num_classes}")
    B, N, V = _check(num_examples, seq_len, vocab_size, 2, 2 * (C + 1))
    K = V // (C + 1)
    g = torch.Generator().manual_seed(int(seed))
    q = torch.randint(0, K, (B,), generator=g)
    # keys uniform over the other K - 1 keys: draw from K - 1 and shift those >= q up by one
    keys = torch.randint(0, K - 1, (B, N - 1), generator=g)
    keys = keys + (keys >= q[:, None]).long()
    where = torch.randint(0, N - 1, (B,), generator=g)
    rows = torch.arange(B)
    keys[rows, where] = q
    values = torch.randint(0, C, (B, N - 1), generator=g)
    inputs = torch.cat([q[:, None], K + keys * C + values], dim=1)
    return {"inputs": inputs, "labels": values[rows, where].clone()}


def copy(num_examples: int, seq_len: int, vocab_size: int, *, seed: int = 0) -> dict:
    """Causal self-attention: copy a random segment after a separator (next-token LM).

    With ``L = seq_len // 2`` and a segment ``s_1..s_L`` of tokens drawn uniformly from
    ``1..V-1`` (token 0 is the separator), the full sequence is ``s_1..s_L 0 s_1..s_L``
    (length ``2L + 1``); ``inputs`` is its first ``2L`` tokens and ``targets`` the next
    token at every position, kept only on the copy: ``targets[:, L - 1 + i] = s_i`` for
    ``i = 1..L`` (the separator and the copied half predict the segment), ``IGNORE``
    elsewhere (the segment itself is random, nothing to learn). An odd ``seq_len`` gets
    a leading separator so that ``inputs`` has ``seq_len`` tokens.

    Why causal self: an autoregressive model must retrieve, at every position of the
    copy, the token ``L`` positions back (in-context copying, the skill behind
    induction heads); a causal window shorter than ``L`` cannot, whatever the depth
    (two windows of ``w`` reach ``2(w - 1)`` back). Chance: ``1 / (V - 1)``.

    Returns ``{"inputs": (B, N) long, "targets": (B, N) long}``.
    """
    B, N, V = _check(num_examples, seq_len, vocab_size, 2, 3)
    g = torch.Generator().manual_seed(int(seed))
    L = N // 2
    seg = torch.randint(1, V, (B, L), generator=g)
    sep = torch.zeros(B, 1, dtype=torch.long)
    full = torch.cat([seg, sep, seg], dim=1)  # (B, 2L + 1)
    inputs, targets = full[:, :-1], full[:, 1:].clone()
    targets[:, :L] = IGNORE
    if N % 2:
        inputs = torch.cat([sep, inputs], dim=1)
        targets = torch.cat([torch.full((B, 1), IGNORE, dtype=torch.long), targets], dim=1)
    return {"inputs": inputs, "targets": targets}


def reverse(num_examples: int, seq_len: int, vocab_size: int, *, seed: int = 0) -> dict:
    """Noncausal cross-attention: output the input reversed.

    ``source``: ``N`` tokens drawn uniformly from ``0..V-1``; ``targets[:, i] =
    source[:, N - 1 - i]``. The decoder gets no tokens — only its ``N`` positions — and
    produces all outputs at once (non-autoregressive), so everything it knows about the
    source comes through cross-attention to the encoder memory.

    Why noncausal cross: output ``i`` needs the memory slot ``N - 1 - i``, after its own
    aligned position for the first half of the outputs (a causal cross-attention cannot
    reach it) and far from it except in the middle (a window of ``N/4`` centred on the
    aligned position reaches only the outputs within ``N/16`` of the middle). Chance: ``1 / V``.

    Returns ``{"source": (B, N) long, "targets": (B, N) long}``.
    """
    B, N, V = _check(num_examples, seq_len, vocab_size, 1, 2)
    g = torch.Generator().manual_seed(int(seed))
    source = torch.randint(0, V, (B, N), generator=g)
    return {"source": source, "targets": reverse_targets(source)}


def transduce(num_examples: int, seq_len: int, vocab_size: int, *, seed: int = 0) -> dict:
    """Causal cross-attention: aligned transduction at half speed, ``targets[:, i] =
    source[:, i // 2]``.

    ``source``: ``N`` tokens drawn uniformly from ``0..V-1``. As in :func:`reverse` the
    decoder gets only its positions; its cross-attention is causal and lower-right
    aligned with equal lengths, so output ``i`` sees memory ``0..i`` — enough, since
    ``i // 2 <= i`` (a streaming transducer that emits two outputs per input, e.g. an
    upsampler; the output never needs the future).

    Why causal cross: the answer is in the visible past of every output, at distance
    ``i - i // 2`` (up to ``N/2``), so a causal window of ``N/4`` reaches it only for the
    first half of the outputs. Chance: ``1 / V``.

    Returns ``{"source": (B, N) long, "targets": (B, N) long}``.
    """
    B, N, V = _check(num_examples, seq_len, vocab_size, 1, 2)
    g = torch.Generator().manual_seed(int(seed))
    source = torch.randint(0, V, (B, N), generator=g)
    return {"source": source, "targets": transduce_targets(source)}


def reverse_targets(source: torch.Tensor) -> torch.Tensor:
    """The targets of :func:`reverse` for ``source (B, N)``: ``source`` reversed."""
    return source.flip(-1).contiguous()


def transduce_targets(source: torch.Tensor) -> torch.Tensor:
    """The targets of :func:`transduce` for ``source (B, N)``: ``targets[:, i] = source[:, i // 2]``."""
    return source[:, torch.arange(source.shape[-1], device=source.device) // 2].contiguous()


@dataclass(frozen=True)
class TaskSpec:
    """A CAB task: ``make(num_examples, seq_len, vocab_size, *, seed, **setting)``, its
    pattern, and ``chance(vocab_size, **setting)``, the accuracy of guessing."""

    name: str
    pattern: str
    make: Callable[..., dict]
    description: str
    chance: Callable[[int], float]


TASKS: dict[str, TaskSpec] = {
    "classify": TaskSpec("classify", "noncausal_self", classify,
                         "the value stored under the query key at position 0 (label read at position 0)",
                         lambda V, num_classes=4: 1.0 / num_classes),
    "copy": TaskSpec("copy", "causal_self", copy,
                     "next-token LM copying a random segment after a separator (loss on the copy)",
                     lambda V, **_: 1.0 / (V - 1)),
    "reverse": TaskSpec("reverse", "noncausal_cross", reverse,
                        "encoder-decoder: position queries cross-attend to output the source reversed",
                        lambda V, **_: 1.0 / V),
    "transduce": TaskSpec("transduce", "causal_cross", transduce,
                          "encoder-decoder, causal cross-attention: output i = source[i // 2]",
                          lambda V, **_: 1.0 / V),
}
