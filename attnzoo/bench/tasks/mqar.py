"""Multi-query associative recall (MQAR), as Zoology defines it.

"Zoology: Measuring and Improving Recall in Efficient Language Models" (Arora et al.,
2023). A sequence starts with ``D`` key–value pairs ``k_1 v_1 k_2 v_2 ... k_D v_D``;
later, each key appears again as a query and the model must output the value that was
paired with it. Keys come from the lower half of the vocabulary and values from the
upper half (token 0 is padding). Query positions are drawn with a power law over the
distance from the end of the context, ``p(gap) ∝ gap^(a-1)`` (Zoology's ``power_a``;
a small ``a`` puts most queries close to the context), each key is queried exactly
once, and the target sits
at the query's position: ``targets[b, t] = v`` where ``inputs[b, t]`` is the query key
``k``; every other target is ``ignore_index`` (loss only at the query positions).
"""

from __future__ import annotations

import torch

from ...errors import AttentionInputError


def mqar(num_examples: int, seq_len: int, num_kv_pairs: int, vocab_size: int, *, power_a: float = 0.01,
         seed: int = 0, ignore_index: int = -100):
    """``(inputs, targets)``, both ``(num_examples, seq_len)`` long (see the module docstring)."""
    D, N, V = int(num_kv_pairs), int(seq_len), int(vocab_size)
    if D < 1 or N < 4 * D:
        raise AttentionInputError(f"need num_kv_pairs >= 1 and seq_len >= 4 * num_kv_pairs, got {D} and {N}")
    half = V // 2
    if half - 1 < D:
        raise AttentionInputError(f"vocab_size={V} has {half - 1} key tokens, fewer than num_kv_pairs={D}")
    g = torch.Generator().manual_seed(int(seed))
    B = int(num_examples)
    keys = torch.stack([torch.randperm(half - 1, generator=g)[:D] + 1 for _ in range(B)])  # distinct, in [1, half)
    values = torch.randint(half, V, (B, D), generator=g)
    inputs = torch.zeros(B, N, dtype=torch.long)
    targets = torch.full((B, N), ignore_index, dtype=torch.long)
    inputs[:, 0:2 * D:2], inputs[:, 1:2 * D:2] = keys, values
    # query slots after the context; gap g >= 1 from the context end, p(g) ∝ g^(a-1)
    gaps = torch.arange(1, N - 2 * D + 1, dtype=torch.float64)
    weights = gaps ** (float(power_a) - 1)
    for b in range(B):
        slots = torch.multinomial(weights, D, replacement=False, generator=g) + 2 * D  # distinct positions
        order = torch.randperm(D, generator=g)
        inputs[b, slots] = keys[b, order]
        targets[b, slots] = values[b, order]
    return inputs, targets
