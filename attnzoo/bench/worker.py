"""Run one benchmark case in its own process.

Each case runs in a child forked from a *forkserver* that has already imported torch
and attnzoo, so a case starts in ~10 ms with a clean heap: its peak resident memory
is its own (resident set high-water mark, reset at the start of the case), and a case
that raises, runs out of memory or time is recorded as such while the sweep goes on.

Threads: ``threads`` sets torch's intra-op threads (and ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` for anything the case starts) inside the case's own process, before it
runs: a setting made in the parent never reaches the forkserver's children, which would
otherwise run torch's default (one thread per core) whatever the run record says.

Load: :func:`load_snapshot` / :func:`load_between` measure what else the machine was doing
while a case ran: the load average, the CPU time other processes and the hypervisor (steal)
took from ``/proc/stat``, and the process's own CPU time against the wall time, so a figure
measured on a busy machine can say so.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from typing import Any, Callable, Optional

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        methods = mp.get_all_start_methods()
        _CTX = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            # torch.autograd imports symbolic_shapes (and sympy, ~0.4 s, ~40 MiB) at the first
            # backward with a given gradient: preloaded, so no fwd+bwd case pays for it in its
            # time or its resident-set growth. torch.optim's first optimizer imports
            # torch._dynamo (~1.4 s): preloaded, or every task training paid it in its train_s
            _CTX.set_forkserver_preload(["torch", "torch.fx.experimental.symbolic_shapes", "torch._dynamo",
                                         "attnzoo", "attnzoo.bench.efficiency", "attnzoo.bench.tasks.suite"])
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


# ------------------------------------------------------------------------------ load around a case


def cpu_counters() -> Optional[dict]:
    """The machine's CPU time so far (all cores, in clock ticks) from ``/proc/stat``'s
    ``cpu`` line: ``{"total", "idle", "steal"}``; None where there is no ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    v = [int(x) for x in fields[1:9]] + [0] * 8  # user nice system idle iowait irq softirq steal
    return {"total": sum(v[:8]), "idle": v[3] + v[4], "steal": v[7]}


def runnable_tasks() -> Optional[int]:
    """Threads runnable on the machine right now (``/proc/loadavg``'s fourth field), this one included."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


def load_snapshot() -> dict:
    """What :func:`load_between` compares: wall and own CPU time, the machine's counters,
    the load average and the runnable threads, now."""
    try:
        loadavg = os.getloadavg()[0]
    except OSError:
        loadavg = None
    return {"wall": time.perf_counter(), "cpu": time.process_time(), "stat": cpu_counters(),
            "loadavg": loadavg, "runnable": runnable_tasks()}


#: windows shorter than this are too coarse for /proc/stat's 10 ms ticks: the runnable
#: threads sampled at both ends estimate the other processes instead
MIN_STAT_WINDOW_S = 0.05


def load_between(a: dict, b: dict, threads: int) -> dict:
    """The load around a measurement that ran ``threads`` threads from snapshot ``a`` to ``b``.

    * ``cpu_per_wall``: this process's CPU time / wall time (1 thread, alone: about 1);
    * ``others_cores``: cores other processes kept busy on average (``/proc/stat``'s busy
      time minus this process's own; from the runnable threads at both ends when the
      window is under :data:`MIN_STAT_WINDOW_S`);
    * ``steal``: the fraction of the machine's time the hypervisor gave to other guests;
    * ``contention``: the fraction of this case's threads that found no free core,
      ``max(0, others + steal cores + threads - cores) / threads``; above the sweep's
      ``load_threshold`` the case is flagged ``loaded``.
    """
    wall = max(b["wall"] - a["wall"], 1e-9)
    own = max(b["cpu"] - a["cpu"], 0.0)
    ncpu = os.cpu_count() or 1
    out = {"loadavg_before": a.get("loadavg"), "loadavg_after": b.get("loadavg"), "window_s": wall,
           "cpu_s": own, "cpu_per_wall": own / wall, "cores": ncpu, "others_cores": None, "steal": None,
           "contention": None}
    others = None
    steal_cores = 0.0
    sa, sb = a.get("stat"), b.get("stat")
    if sa and sb and sb["total"] > sa["total"]:
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        total = sb["total"] - sa["total"]
        steal = sb["steal"] - sa["steal"]
        busy = total - (sb["idle"] - sa["idle"]) - steal
        out["steal"] = steal / total
        if wall >= MIN_STAT_WINDOW_S:
            others = max(0.0, busy / hz - own) / wall
            steal_cores = steal / hz / wall
    threads = max(1, int(threads or 1))
    if others is None and a.get("runnable") is not None and b.get("runnable") is not None:
        # this process's threads may be among the runnable ones (the sampling thread is, its
        # pool's threads may still spin): count them all as its own, not to flag a quiet machine
        others = max(0.0, (a["runnable"] + b["runnable"]) / 2 - threads)
    if others is not None:
        out["others_cores"] = others
        out["contention"] = min(1.0, max(0.0, others + steal_cores + threads - ncpu) / threads)
    return out


# ------------------------------------------------------------------------------ the worker


def _out_of_memory(e: BaseException) -> bool:
    """torch's CPU allocator raises RuntimeError, not MemoryError, when an allocation fails."""
    text = str(e)
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text
                                         or "out of memory" in text.lower()))


def _child(conn, fn, args):
    try:
        conn.send(("ok", fn(*args)))
    except Exception as e:  # noqa: BLE001 - the parent records any failure and goes on
        if _out_of_memory(e):
            conn.send(("oom", f"{type(e).__name__}: {str(e)[:300]}"))
        else:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"))
    finally:
        conn.close()


def run_isolated(fn: Callable, args: tuple, timeout: float, memory_limit_mib: float | None = None,
                 threads: Optional[int] = None) -> tuple[str, Any]:
    """``(status, value)`` with status ``"ok"``, ``"error"``, ``"oom"`` or ``"timeout"``.

    ``memory_limit_mib`` caps the child's address space (RLIMIT_AS) so a runaway case
    fails with MemoryError instead of taking the machine down; an allocation that fails
    (MemoryError, or torch's "can't allocate memory") is ``"oom"``. ``threads`` sets the
    child's torch threads (and OMP/MKL thread variables) before ``fn`` runs.
    """
    try:
        return _run_isolated(fn, args, timeout, memory_limit_mib, threads)
    except Exception as e:  # noqa: BLE001 - e.g. a process that cannot start, arguments that do not pickle
        return ("error", f"worker failed: {type(e).__name__}: {e}")


def set_threads(threads: Optional[int]) -> int:
    """Set this process's torch intra-op threads (and the OpenMP / MKL variables that
    anything it starts reads); returns the count torch now uses."""
    import torch

    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(int(threads))
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def _run_isolated(fn, args, timeout, memory_limit_mib, threads=None):
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_limited, args=(child, fn, args, memory_limit_mib, threads), daemon=True)
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


def _limited(conn, fn, args, memory_limit_mib, threads=None):
    if threads:
        set_threads(threads)
    if memory_limit_mib:
        import resource

        limit = int(memory_limit_mib * 1024 * 1024)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _child(conn, fn, args)
