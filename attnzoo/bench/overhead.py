"""Per-call overhead of :func:`attnzoo.attention` at N = 1, against SDPA's own call.

At one query and one key the attention maths costs nothing, so the time of a call is
its overhead: argument checks, option resolution, implementation choice, dispatch. The
two contenders run interleaved, in rounds, in the same process (the host is noisy);
each round times ``calls`` back-to-back calls; the figure is the median over rounds of
the per-round ratio. A decoding step is such a call, so this is the floor of a
token's attention cost.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

#: The goal of the architecture issue: attention() at N = 1 within 2x SDPA's own call.
GOAL_RATIO = 2.0


def _per_call(fn: Callable, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def overhead(methods: Iterable[str] = ("softmax",), *, rounds: int = 15, calls: int = 500, heads: int = 8,
             head_dim: int = 64, threads: Optional[int] = 1) -> list:
    """One row per method: ``{"method", "impl", "attnzoo_us", "sdpa_us", "ratio", "spread"}``
    (medians over rounds; ``spread`` = (max - min) / median of the per-round ratios)."""
    from .. import registry
    from ..api import attention

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, 1, head_dim, generator=g) for _ in range(3))
    rows = []
    for name in methods:
        spec = registry.get(name)
        causal = "noncausal_self" not in spec.patterns  # e.g. lightning has causal forms only
        options = spec.sized_options(1)
        call = spec.check(q, k, v, causal=causal, **options)
        impl = spec.select("auto", call).name
        ours = lambda: attention(q, k, v, method=name, causal=causal, **options)  # noqa: E731 - the whole path
        base = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
        with torch.no_grad():
            for fn in (ours, base):  # warm up
                _per_call(fn, max(10, calls // 10))
            a_times, b_times, ratios = [], [], []
            for r in range(rounds):
                pair = (ours, base) if r % 2 == 0 else (base, ours)
                t = {id(fn): _per_call(fn, calls) for fn in pair}
                a_times.append(t[id(ours)])
                b_times.append(t[id(base)])
                ratios.append(t[id(ours)] / t[id(base)])
        med = statistics.median(ratios)
        rows.append({"method": name, "impl": impl, "attnzoo_us": statistics.median(a_times) * 1e6,
                     "sdpa_us": statistics.median(b_times) * 1e6, "ratio": med,
                     "spread": (max(ratios) - min(ratios)) / med})
    return rows
