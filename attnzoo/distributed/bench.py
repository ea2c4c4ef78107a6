"""``attnzoo bench distributed``: the sequence-parallel paths on 1, 2 and 4 processes at
a fixed total N, with the bytes each rank sent next to the formula.

    attnzoo bench distributed --length 16384 --worlds 1,2,4 --strategies ring,ulysses,allgather,lasp2,halo

Each world size is a fresh group of local processes (gloo over 127.0.0.1, started by
:func:`~attnzoo.distributed.launch.run_local`, ``--threads`` torch threads each, default
1). Every rank builds its own shard, runs one warm-up and then ``--repeats`` timed steps
(forward, or forward and backward), each started after a barrier; a step's time is the
slowest rank's, and the table gives the median over the repeats. Bytes are counted by
:func:`~attnzoo.distributed.count_bytes` on one step (the largest over the ranks) and
printed beside the algorithm's formula. On one machine the processes share its cores and
talk through loopback TCP, so the times show the overheads of the algorithms, not the
scaling of a cluster (with P processes on fewer than P cores they are oversubscribed).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

#: strategy -> (method, options) it is timed with
DEFAULT_METHODS = {
    "ring": ("softmax", {}),
    "ulysses": ("softmax", {}),
    "allgather": ("softmax", {}),
    "lasp2": ("lightning", {}),
    "halo": ("sliding_window", {}),
}


def add_bench_parser(bsub) -> None:
    """``attnzoo bench distributed``."""
    p = bsub.add_parser("distributed", help="sequence parallelism: ring, Ulysses, LASP-2(H), halo on 1/2/4 local "
                                            "processes (gloo), time and bytes sent per rank")
    p.add_argument("--length", type=int, default=16384, help="total sequence length N (default: %(default)s)")
    p.add_argument("--worlds", default="1,2,4", help="process counts (default: %(default)s)")
    p.add_argument("--strategies", default="ring,ulysses,allgather,lasp2,halo",
                   help="comma-separated: ring, ulysses, allgather, lasp2, halo (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--noncausal", action="store_true", help="noncausal attention (default: causal)")
    p.add_argument("--layout", default="zigzag", choices=("contiguous", "zigzag"),
                   help="shards of ring, Ulysses and all-gather (LASP-2 and halo: contiguous) (default: %(default)s)")
    p.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"))
    p.add_argument("--window", type=int, default=256, help="sliding_window's window for halo (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait (default: %(default)s)")
    p.add_argument("--out", default=None, help="also append one JSON record per row to OUT/distributed.jsonl")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
    p.set_defaults(func=cmd_bench_distributed)


def _settings(args) -> dict:
    strategies = [s for s in args.strategies.split(",") if s]
    for s in strategies:
        if s not in DEFAULT_METHODS:
            raise SystemExit(f"--strategies takes {', '.join(DEFAULT_METHODS)}; got {s!r}")
    return dict(length=args.length, worlds=[int(w) for w in args.worlds.split(",") if w], strategies=strategies,
                batch=args.batch, heads=args.heads, kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim,
                causal=not args.noncausal, layout=args.layout, mode=args.mode, window=args.window, dtype=args.dtype,
                repeats=args.repeats)


def _layout_for(strategy: str, s: dict) -> str:
    return s["layout"] if strategy in ("ring", "ulysses", "allgather") else "contiguous"


def _options(strategy: str, s: dict) -> dict:
    method, options = DEFAULT_METHODS[strategy]
    return {"window": s["window"]} if method == "sliding_window" else dict(options)


def bench_worker(rank: int, world: int, s: dict) -> dict:
    """On each rank: every strategy's per-step times and the bytes of one step."""
    import torch
    import torch.distributed as dist

    from . import comm
    from .layers import SequenceParallel, sequence_parallel_attention
    from .layout import SequenceLayout

    dtype = getattr(torch, s["dtype"])
    out = {}
    for strategy in s["strategies"]:
        method, _ = DEFAULT_METHODS[strategy]
        causal = s["causal"] if method != "lightning" else True
        kind = _layout_for(strategy, s)
        lay = SequenceLayout.build(kind, s["length"], world)
        n = lay.local_len(rank)
        g = torch.Generator().manual_seed(1000 + rank)
        q = torch.randn(s["batch"], s["heads"], n, s["head_dim"], generator=g).to(dtype)
        k = torch.randn(s["batch"], s["kv_heads"], n, s["head_dim"], generator=g).to(dtype)
        v = torch.randn(s["batch"], s["kv_heads"], n, s["head_dim"], generator=g).to(dtype)
        do = torch.randn(s["batch"], s["heads"], n, s["head_dim"], generator=g).to(dtype)
        backward = s["mode"] == "fwd+bwd"
        q, k, v = (t.requires_grad_(backward) for t in (q, k, v))
        sp = SequenceParallel(strategy=strategy, layout=lay)
        opts = _options(strategy, s)

        def step():
            o = sequence_parallel_attention(q, k, v, sp, method=method, causal=causal, **opts)
            if backward:
                o.backward(do)
                for t in (q, k, v):
                    t.grad = None

        try:
            with comm.count_bytes() as c:
                step()  # warm-up, counted
            times = []
            for _ in range(s["repeats"]):
                dist.barrier()
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            out[strategy] = dict(status="ok", method=method, causal=causal, layout=kind, times=times,
                                 bytes=c.payload, by_op=dict(c.by_op), local_len=n)
        except Exception as e:  # e.g. heads not divisible for Ulysses: recorded, the others go on
            out[strategy] = dict(status="error", method=method, error=f"{type(e).__name__}: {e}")
    return out


def formula_bytes(strategy: str, s: dict, world: int, rank: int) -> int:
    """The algorithm's bytes for ``rank`` (see each module's ``*_bytes``)."""
    import torch

    from .halo import halo_bytes
    from .lasp2 import allgather_bytes, lasp2_bytes
    from .layout import SequenceLayout
    from .ring import ring_bytes
    from .ulysses import ulysses_bytes

    dtype = getattr(torch, s["dtype"])
    item = torch.tensor([], dtype=dtype).element_size()
    citem = 4 if dtype in (torch.float16, torch.bfloat16) else item
    lay = SequenceLayout.build(_layout_for(strategy, s), s["length"], world)
    bwd = s["mode"] == "fwd+bwd"
    kw = dict(batch=s["batch"], kv_heads=s["kv_heads"], head_dim=s["head_dim"], v_dim=s["head_dim"], itemsize=item,
              backward=bwd)
    if strategy == "ring":
        return ring_bytes(lay, rank, compute_itemsize=citem, **kw)
    if strategy == "ulysses":
        return ulysses_bytes(lay, rank, q_heads=s["heads"], **kw)
    if strategy == "allgather":
        return allgather_bytes(lay, rank, **kw)
    if strategy == "halo":
        return halo_bytes("sliding_window", lay, rank, causal=s["causal"], window=s["window"], **kw)
    return lasp2_bytes(lay, batch=s["batch"], q_heads=s["heads"], features=s["head_dim"], v_dim=s["head_dim"],
                       compute_itemsize=citem, backward=bwd)


def run_bench(s: dict, threads: int = 1, timeout: float = 600.0, progress=None) -> list:
    """The rows of the table: one per (strategy, world size)."""
    from .launch import run_local

    rows = []
    for world in s["worlds"]:
        if progress:
            progress(f"P={world}")
        per_rank = run_local(bench_worker, world, (s,), threads=threads, timeout=timeout)
        for strategy in s["strategies"]:
            recs = [r[strategy] for r in per_rank]
            row = dict(strategy=strategy, method=recs[0]["method"], world=world, length=s["length"],
                       status=recs[0]["status"])
            if any(r["status"] != "ok" for r in recs):
                row.update(status="error", error=next(r["error"] for r in recs if r["status"] != "ok"))
                rows.append(row)
                continue
            steps = [max(ts) for ts in zip(*(r["times"] for r in recs))]  # a step ends when its slowest rank does
            sent = [r["bytes"] for r in recs]
            formula = [formula_bytes(strategy, s, world, rank) for rank in range(world)]
            row.update(layout=recs[0]["layout"], causal=recs[0]["causal"], median_s=statistics.median(steps),
                       steps_s=steps, bytes_per_rank=max(sent), bytes_each=sent, formula_per_rank=max(formula),
                       formula_each=formula, matches=sent == formula, by_op=recs[0]["by_op"])
            rows.append(row)
    base = {r["strategy"]: r["median_s"] for r in rows if r["world"] == 1 and r["status"] == "ok"}
    for r in rows:
        if r["status"] == "ok" and r["strategy"] in base:
            r["speedup"] = base[r["strategy"]] / r["median_s"]
    return rows


def _fmt_bytes(b: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= size:
            return f"{b / size:,.2f} {unit}"
    return f"{b} B"


def cmd_bench_distributed(args) -> int:
    from rich.console import Console
    from rich.table import Table

    s = _settings(args)
    console = Console(width=160)
    console.print(f"[bold]attnzoo bench distributed[/]: N={s['length']}, B={s['batch']}, H={s['heads']} "
                  f"(kv {s['kv_heads']}), D={s['head_dim']}, {s['dtype']}, {'causal' if s['causal'] else 'noncausal'}, "
                  f"{s['mode']}, worlds {s['worlds']}, {args.threads} thread(s) per process, gloo on 127.0.0.1")
    rows = run_bench(s, threads=args.threads, timeout=args.timeout, progress=lambda m: console.print(f"  running {m}"))
    table = Table(title="median step time (slowest rank) and bytes sent per rank (max over ranks) vs the formula")
    for c in ("strategy", "method", "layout", "P", "ms", "speedup vs P=1", "bytes/rank", "formula", "match"):
        table.add_column(c, justify="left" if c in ("strategy", "method", "layout") else "right")
    for r in rows:
        if r["status"] != "ok":
            table.add_row(r["strategy"], r["method"], "", str(r["world"]), "ERROR", "", "", "", r["error"][:60])
            continue
        table.add_row(r["strategy"], r["method"], r["layout"], str(r["world"]), f"{r['median_s'] * 1e3:,.1f}",
                      f"{r.get('speedup', float('nan')):.2f}x", _fmt_bytes(r["bytes_per_rank"]),
                      _fmt_bytes(r["formula_per_rank"]), "yes" if r["matches"] else "NO")
    console.print(table)
    if args.out:
        path = Path(args.out) / "distributed.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for r in rows:
                f.write(json.dumps({"kind": "distributed", "settings": s, **r}) + "\n")
        console.print(f"results appended to {path}")
    if args.json:
        print(json.dumps(rows))
    return 0 if all(r["status"] == "ok" and r["matches"] for r in rows) else 1
