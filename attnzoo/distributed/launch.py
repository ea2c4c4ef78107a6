"""Run a function on ``P`` local processes joined in a gloo group: what the tests and
``attnzoo bench distributed`` use on one machine (``torchrun`` does the same across
machines; see :func:`init_from_env`).

    results = run_local(fn, world_size=4, args=(...))   # fn(rank, world_size, *args) -> picklable

Processes are started with the ``forkserver`` method with torch and attnzoo preloaded in
the server (:data:`PRELOAD`), so each worker starts in a fraction of a second instead of re-importing
torch, and no worker inherits a parent's OpenMP state (which ``fork`` would). The group
rendezvous on a free TCP port of 127.0.0.1. Each worker sets ``torch.set_num_threads``
(default 1) so ``P`` workers share the cores without oversubscription. The return value
of ``fn`` on each rank comes back through a file (``torch.save``).
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable, List, Sequence

import torch
import torch.distributed as dist


#: Imported once by the fork server: torch, what autograd imports lazily on the first
#: backward of a custom Function (~1 s, sympy included), and attnzoo.
PRELOAD = ["torch", "torch.fx.experimental.symbolic_shapes", "attnzoo", "attnzoo.distributed"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, world_size: int, port: int, outdir: str, threads: int, timeout: float,
            args: Sequence) -> None:
    torch.set_num_threads(threads)
    path = Path(outdir) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        try:
            result = fn(rank, world_size, *args)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # reported by the parent with the traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise


def run_local(fn: Callable, world_size: int, args: Sequence = (), *, threads: int = 1,
              timeout: float = 120.0) -> List:
    """``[fn(rank, world_size, *args) for each rank]``, run in ``world_size`` processes
    joined by a gloo group. ``fn`` must be importable (a module-level function). Raises
    ``RuntimeError`` with the worker's traceback if a rank fails."""
    import torch.multiprocessing as mp

    try:
        mp.set_forkserver_preload(PRELOAD)
    except Exception:  # pragma: no cover - the server already runs
        pass
    with tempfile.TemporaryDirectory(prefix="attnzoo-dist-") as outdir:
        port = free_port()
        try:
            mp.start_processes(_worker, args=(fn, world_size, port, outdir, threads, timeout, tuple(args)),
                               nprocs=world_size, join=True, start_method="forkserver")
        except Exception as e:
            errors = []
            for r in range(world_size):
                p = Path(outdir) / f"rank{r}.pt"
                if p.exists():
                    rec = torch.load(p, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"rank {r}:\n{rec['error']}")
            raise RuntimeError("a worker failed:\n" + ("\n".join(errors) or str(e))) from None
        return [torch.load(Path(outdir) / f"rank{r}.pt", weights_only=False)["result"] for r in range(world_size)]


def init_from_env(backend: str = None):
    """``init_process_group`` from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``): NCCL when CUDA is available (untested here: the
    development machine has no GPU), else gloo; returns ``(rank, world_size)``."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()
