"""Run one benchmark case in its own process.

Each case runs in a child forked from a *forkserver* that has already imported torch
and attnzoo, so a case starts in ~10 ms with a clean heap: its peak resident memory
is its own (resident set high-water mark, reset at the start of the case), and a case
that raises, runs out of memory or time is recorded as such while the sweep goes on.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from typing import Any, Callable

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        methods = mp.get_all_start_methods()
        _CTX = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            _CTX.set_forkserver_preload(["torch", "attnzoo", "attnzoo.bench.efficiency"])
    return _CTX


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux; 0 elsewhere)."""
    return _status_field("VmRSS")


def peak_rss_mib() -> float:
    """Resident set high-water mark of this process in MiB (Linux; 0 elsewhere)."""
    return _status_field("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_field(name: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def _child(conn, fn, args):
    try:
        conn.send(("ok", fn(*args)))
    except MemoryError:
        conn.send(("oom", "MemoryError"))
    except Exception as e:  # noqa: BLE001 - the parent records any failure and goes on
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"))
    finally:
        conn.close()


def run_isolated(fn: Callable, args: tuple, timeout: float, memory_limit_mib: float | None = None) -> tuple[str, Any]:
    """``(status, value)`` with status ``"ok"``, ``"error"``, ``"oom"`` or ``"timeout"``.

    ``memory_limit_mib`` caps the child's address space (RLIMIT_AS) so a runaway case
    fails with MemoryError instead of taking the machine down.
    """
    try:
        return _run_isolated(fn, args, timeout, memory_limit_mib)
    except Exception as e:  # noqa: BLE001 - e.g. a process that cannot start, arguments that do not pickle
        return ("error", f"worker failed: {type(e).__name__}: {e}")


def _run_isolated(fn, args, timeout, memory_limit_mib):
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_limited, args=(child, fn, args, memory_limit_mib), daemon=True)
    proc.start()
    child.close()
    status: tuple[str, Any]
    if parent.poll(timeout):
        try:
            status = parent.recv()
        except EOFError:
            status = ("oom" if proc.exitcode in (-9, 137) else "error", f"worker died (exit code {proc.exitcode})")
    else:
        proc.kill()
        status = ("timeout", f"exceeded {timeout:.0f} s")
    proc.join(5)
    if status[0] == "ok" or proc.exitcode in (0, None):
        return status
    if status[0] == "error" and proc.exitcode in (-9, 137):
        return ("oom", f"killed (exit code {proc.exitcode}), likely out of memory")
    return status


def _limited(conn, fn, args, memory_limit_mib):
    if memory_limit_mib:
        import resource

        limit = int(memory_limit_mib * 1024 * 1024)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _child(conn, fn, args)
