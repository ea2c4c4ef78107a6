"""``torch.compile(fullgraph=True)`` traces whole attention calls: nothing on the call path
(the registry lookup, the checks, option resolution, the choice of implementation) breaks
the graph. Dynamo's tracing is what fullgraph checks, so the fast ``eager`` backend shows
it; one case also runs through inductor."""

from __future__ import annotations

import pytest
import torch

import attnzoo as az

CASES = [
    ("softmax", dict(causal=False)),
    ("softmax", dict(causal=True)),
    ("softmax", dict(causal=True, impl="tiled")),
    ("sigmoid", dict(causal=True)),
    ("linear", dict(causal=True)),
    ("linear", dict(causal=False)),
    ("lightning", dict(causal=True)),
    ("sliding_window", dict(causal=True, window=16)),
]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, 48, 16, generator=g), torch.randn(1, 2, 48, 16, generator=g),
            torch.randn(1, 2, 48, 16, generator=g))


@pytest.mark.parametrize("method,kwargs", CASES, ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
                                                       for m, kw in CASES])
def test_attention_compiles_without_graph_breaks(method, kwargs):
    torch._dynamo.reset()
    q, k, v = _inputs()

    def fn(q, k, v):
        return az.attention(q, k, v, method=method, **kwargs)

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))


@pytest.mark.slow
def test_softmax_runs_compiled_by_inductor():
    torch._dynamo.reset()
    q, k, v = _inputs()

    def fn(q, k, v):
        return az.attention(q, k, v, causal=True)

    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), fn(q, k, v), atol=1e-5, rtol=1e-5)
