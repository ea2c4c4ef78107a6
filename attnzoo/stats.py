"""Run-time statistics methods report, e.g. how many keys a sparse method actually used.

    with attnzoo.stats.collect() as stats:
        out = attnzoo.attention(q, k, v, method="hip", causal=True)
    stats["density"]          # [fraction of the visible keys each query attended, averaged]

Methods call :func:`report` from their fast paths; nothing is recorded (and nothing
costs anything beyond a list check) unless a :func:`collect` block is active. The
benchmark shows ``density`` next to time.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

_ACTIVE: list = []


@contextmanager
def collect() -> Iterator[dict]:
    """Collect every :func:`report` made inside the block into a dict of lists."""
    record: dict = {}
    _ACTIVE.append(record)
    try:
        yield record
    finally:
        _ACTIVE.remove(record)


def active() -> bool:
    """Whether anything is collecting (so a method can skip computing a statistic)."""
    return bool(_ACTIVE)


def report(name: str, value: float) -> None:
    """Record ``value`` under ``name`` in every active :func:`collect` block."""
    for record in _ACTIVE:
        record.setdefault(name, []).append(float(value))
