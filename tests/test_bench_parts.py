"""Pieces of the benchmark suite: the MQAR generator and CAB's efficiency length."""

from __future__ import annotations


import pytest
import torch

import attnzoo as az
from attnzoo.bench.efficiency import efficiency_length
from attnzoo.bench.tasks import mqar


@pytest.mark.parametrize("seq_len,pairs,vocab", [(64, 8, 64), (256, 32, 128), (40, 10, 40)])
def test_mqar_every_query_answer_is_the_value_paired_earlier(seq_len, pairs, vocab):
    inputs, targets = mqar(16, seq_len, pairs, vocab, seed=3)
    assert inputs.shape == targets.shape == (16, seq_len)
    for b in range(16):
        context = {int(inputs[b, 2 * i]): int(inputs[b, 2 * i + 1]) for i in range(pairs)}
        assert len(context) == pairs  # distinct keys
        assert all(k < vocab // 2 <= v < vocab for k, v in context.items())
        query_pos = (targets[b] != -100).nonzero().flatten().tolist()
        assert len(query_pos) == pairs and min(query_pos) >= 2 * pairs
        assert sorted(int(inputs[b, t]) for t in query_pos) == sorted(context)  # each key queried once
        for t in query_pos:
            assert int(targets[b, t]) == context[int(inputs[b, t])]
        others = [t for t in range(2 * pairs, seq_len) if t not in query_pos]
        assert all(int(inputs[b, t]) == 0 for t in others)


def test_mqar_is_deterministic_and_checks_its_arguments():
    a = mqar(4, 64, 8, 64, seed=1)
    b = mqar(4, 64, 8, 64, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], mqar(4, 64, 8, 64, seed=2)[0])
    with pytest.raises(az.AttentionInputError, match="seq_len >= 4"):
        mqar(2, 20, 8, 64)
    with pytest.raises(az.AttentionInputError, match="key tokens"):
        mqar(2, 64, 8, 12)


def test_efficiency_length_on_synthetic_timings():
    ns = [512, 1024, 2048, 4096, 8192]
    quadratic = [(n / 1024) ** 2 for n in ns]  # exact attention
    linear = [n / 1024 * 2.0 for n in ns]  # twice as slow at 1024: crosses at N = 2048
    assert efficiency_length(ns, linear, quadratic) == pytest.approx(2048)
    assert efficiency_length(ns, [0.5 * t for t in quadratic], quadratic) == 512  # cheaper everywhere
    assert efficiency_length(ns, [2 * t for t in quadratic], quadratic) is None  # never cheaper
    # a crossing between measured points is interpolated in log-log
    assert efficiency_length([1000, 4000], [2.0, 0.5], [1.0, 1.0]) == pytest.approx(2000)
    # a dip below 1 that does not last does not count: the last crossing (1024 -> 2048) does
    n = efficiency_length(ns, [0.9, 1.2, 0.8, 0.7, 0.6], [1.0] * 5)
    assert 1024 < n < 2048
    assert n == pytest.approx(efficiency_length([1024, 2048], [1.2, 0.8], [1.0, 1.0]))
