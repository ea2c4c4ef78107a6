"""The process's CPU memory allocator, tuned for attention's large temporaries.

Attention on the CPU allocates tens of MiB per call (scores of a tile, a segment's
features, the output). glibc's malloc serves anything above its mmap threshold (128 KiB,
raised dynamically to at most 32 MiB) with a fresh ``mmap`` and returns the memory to
the system when it is freed, and it trims the heap whenever more than twice that threshold
is free at its top. Every call then writes to fresh pages: a *minor page fault* per 4 KiB.
Measured here (causal ``linear``, B = 1, H = 8, N = 16,384, D = 64, 2 threads; the goals
row ``linear forward in a fresh process``):

============================  ==========================  ==========================
                              glibc defaults              :func:`tune_cpu_allocator`
============================  ==========================  ==========================
warm call                     190-290 ms, 60-110 K faults  104-130 ms, ~0 faults
first call in a process       260-330 ms, 90-115 K faults  135-160 ms, 14-20 K faults
============================  ==========================  ==========================

:func:`tune_cpu_allocator` raises the mmap threshold to 256 MiB and the trim threshold
to 1 GiB (``mallopt``), so freed temporaries stay in the heap for the next one; up to
1 GiB of freed memory may stay with the process (resident) instead of returning to the
system. ``import attnzoo`` calls it on Linux with glibc, unless the environment sets
``ATTNZOO_TUNE_MALLOC=0``; anywhere else it does nothing. The same settings can be given
to any process with glibc's own variables (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``), and a preloaded jemalloc or tcmalloc
achieves the same; where any of those is set, attnzoo leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

#: the settings :func:`tune_cpu_allocator` applies by default (bytes)
DEFAULTS = {"mmap_threshold": 256 << 20, "trim_threshold": 1 << 30}

#: what was applied in this process: None (nothing yet), or ``{"applied": bool, "reason"
#: or the settings}`` (the benchmark's run records carry it)
STATE: Optional[dict] = None

_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX")


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # only glibc has it (musl, bionic do not)
            return None
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def tune_cpu_allocator(mmap_threshold: int = DEFAULTS["mmap_threshold"],
                       trim_threshold: int = DEFAULTS["trim_threshold"]) -> dict:
    """Keep freed temporaries in the heap (see the module docstring); returns the state
    recorded in :data:`STATE`: ``{"applied": True, "mmap_threshold": ..., ...}``, or
    ``{"applied": False, "reason": ...}`` where it cannot (not glibc, a preloaded
    allocator, or the user's own ``MALLOC_*`` settings, which win)."""
    global STATE
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
            raise ValueError(f"{name} must be an int in [0, 2**31) bytes, got {value!r}")
    preload = os.environ.get("LD_PRELOAD", "")
    given = [v for v in _USER_SETTINGS if v in os.environ]
    libc = _glibc()
    if libc is None:
        STATE = {"applied": False, "reason": "not glibc on Linux"}
    elif any(lib in preload for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        STATE = {"applied": False, "reason": f"a preloaded allocator ({preload})"}
    elif given:
        STATE = {"applied": False, "reason": f"the environment sets {', '.join(given)}"}
    else:
        # (glibc's top pad stays at its 128 KiB: a larger one makes every heap growth ask for
        # that much more, which under an address-space limit turns a MemoryError into an abort)
        ok = all(libc.mallopt(p, v) == 1 for p, v in ((_M_MMAP_THRESHOLD, mmap_threshold),
                                                      (_M_TRIM_THRESHOLD, trim_threshold)))
        STATE = ({"applied": True, "mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold}
                 if ok else {"applied": False, "reason": "mallopt refused"})
    return dict(STATE)


def tune_on_import() -> None:
    """What ``import attnzoo`` runs: :func:`tune_cpu_allocator` unless ``ATTNZOO_TUNE_MALLOC=0``."""
    global STATE
    if os.environ.get("ATTNZOO_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        STATE = {"applied": False, "reason": "ATTNZOO_TUNE_MALLOC=0"}
        return
    tune_cpu_allocator()
