"""Performance goals: ``attnzoo bench goals [--config benchmarks/perf-goals.toml]``.

Each row of the config is one figure and its goal, measured side by side in one run:

* ``kind = "ratio"``: time(a) / time(b), the two contenders interleaved round by round
  on the same inputs (the host is noisy: a ratio taken within a run is what holds up);
* ``kind = "gflops"``: useful GFLOP/s of ``a`` (``flops`` = a formula in B, H, N, D);
* ``kind = "scaling"``: time(a at N2) / time(a at N1), ``lengths = [N1, N2]``;
* ``kind = "fresh"``: the first call of ``a`` in a fresh process / a warm call (page faults);
* ``kind = "error"``: max |a - fp64 exact| / max |b - fp64 exact| on the same inputs.

A contender is ``{method, impl, options, pattern, mode, dtype}`` (``mode``: ``fwd``,
``fwd+bwd`` or ``decode``, one new token after a prefill of ``cached`` tokens, with
``step_impl``) or a peer: ``{peer = "sdpa"}`` (torch's SDPA with the pattern's mask),
``{peer = "flex"}`` (FlexAttention called directly, compiled, its block mask made once:
"warm"), ``{peer = "fla_naive_chunk"}`` (the chunked causal linear attention as
flash-linear-attention writes its naive reference, re-implemented here from its
published algorithm). Shapes default to B = 1, H = 8, D = 64, float32.

Every row prints its figure, the goal, and whether it holds; ``--out DIR`` also appends
the rows as JSON records (``goals.jsonl``) for the report.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import registry
from ..errors import AttentionInputError
from .results import jsonable

DEFAULTS = dict(batch=1, heads=8, head_dim=64, dtype="float32", rounds=5, pattern="causal_self", mode="fwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# ------------------------------------------------------------------------- peers


def fla_naive_chunk(q, k, v, chunk: int = 64):
    """Causal linear attention (identity feature map, no normaliser) in chunks, as
    flash-linear-attention's naive chunk reference computes it: per chunk the intra-chunk
    ``(Q_c K_cᵀ ⊙ M) V_c`` plus ``Q_c S`` with ``S`` the running ``Σ K_jᵀ V_j`` of the
    earlier chunks — written here from the algorithm, so both sides are measured on the
    same machine. q, k, v: (B, H, N, D) with N a multiple of ``chunk``."""
    B, H, N, D = q.shape
    q, k, v = (t.reshape(B, H, N // chunk, chunk, -1) for t in (q, k, v))
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    kv = k.transpose(-1, -2) @ v  # (B, H, n, D, Dv)
    state = torch.cumsum(kv, dim=2) - kv  # the chunks before
    intra = ((q @ k.transpose(-1, -2)).masked_fill(~mask, 0)) @ v
    return (intra + q @ state).reshape(B, H, N, -1)


def _flex_warm(q, k, v, pattern: str, window: Optional[int]):
    """FlexAttention called directly: compiled once, the block mask made once (outside the timing)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    causal = pattern.startswith("causal")
    Nq, Nk = q.shape[2], k.shape[2]
    off = Nk - Nq

    def mod(b, h, qi, ki):
        ok = (ki <= qi + off) if causal else (ki >= 0)
        if window:
            ok = ok & (ki > qi + off - window) if causal else ok & ((ki - qi - off).abs() <= window // 2)
        return ok

    block_mask = create_block_mask(mod, None, None, Nq, Nk, device=q.device)
    return lambda a, b_, c: compiled(a, b_, c, block_mask=block_mask)


# --------------------------------------------------------------------- contenders


def _inputs(row: dict, c: dict, n: int, requires_grad: bool, seed: int = 0):
    B, H, D = row["batch"], row["heads"], row["head_dim"]
    dtype = DTYPES[c.get("dtype", row["dtype"])]
    g = torch.Generator().manual_seed(seed)
    pattern = c.get("pattern", row["pattern"])
    nk = n if not pattern.endswith("cross") else max(1, n // 2)
    q = torch.randn(B, H, n, D, generator=g).to(dtype)
    k = torch.randn(B, H, nk, D, generator=g).to(dtype)
    v = torch.randn(B, H, nk, D, generator=g).to(dtype)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def make_contender(row: dict, c: dict, n: int) -> Callable[[], None]:
    """A zero-argument callable running contender ``c`` once at length ``n`` (inputs made here)."""
    mode = c.get("mode", row["mode"])
    pattern = c.get("pattern", row["pattern"])
    causal = pattern.startswith("causal")
    backward = mode == "fwd+bwd"
    if mode == "decode":
        return _decode_contender(row, c, n)
    q, k, v = _inputs(row, c, n, backward)
    peer = c.get("peer")
    if peer == "sdpa":
        Nq, Nk = q.shape[2], k.shape[2]
        mask = torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq) if causal and Nq != Nk else None

        def fn():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    elif peer == "flex":
        run = _flex_warm(q, k, v, pattern, c.get("window"))

        def fn():
            return run(q, k, v)
    elif peer == "fla_naive_chunk":
        def fn():
            return fla_naive_chunk(q, k, v, c.get("chunk", 64))
    elif peer is not None:
        raise AttentionInputError(f"unknown peer {peer!r}; known: sdpa, flex, fla_naive_chunk")
    else:
        spec = registry.get(c["method"])
        opts = dict(c.get("options", {}))
        impl = c.get("impl", "auto")

        def fn():
            return spec(q, k, v, causal=causal, impl=impl, **opts)

    if backward:
        grad = None

        def once():
            nonlocal grad
            out = fn()
            grad = torch.randn_like(out) if grad is None else grad
            out.backward(grad)
            for t in (q, k, v):
                t.grad = None
    else:
        def once():
            with torch.no_grad():
                fn()
    return once


def _decode_contender(row: dict, c: dict, n: int):
    spec = registry.get(c["method"])
    B, H, D = row["batch"], row["heads"], row["head_dim"]
    dtype = DTYPES[c.get("dtype", row["dtype"])]
    opts = dict(c.get("options", {}))
    cached = int(c.get("cached", n))
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(B, H, cached, D, generator=g).to(dtype) for _ in range(2))
    q1, k1, v1 = (torch.randn(B, H, 1, D, generator=g).to(dtype) for _ in range(3))
    state = spec.init_state(B, H, D, D, dtype=dtype, max_len=cached + 4096, **opts)
    with torch.no_grad():
        spec.step(state, torch.randn(B, H, cached, D, generator=g).to(dtype), k, v, **opts)
    length = getattr(state, "length", None)
    step_impl = c.get("step_impl", "auto")

    def once():
        with torch.no_grad():
            spec.step(state, q1, k1, v1, impl=step_impl, **opts)
        if length is not None and hasattr(state, "length"):
            state.length = length  # keep the cache at `cached` keys: every timed step sees the same length

    return once


def _time(fn: Callable[[], None], calls: int = 1) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def interleaved(fns: list, rounds: int, calls: int = 1) -> list:
    """Per-contender lists of per-round times, the contenders alternated each round."""
    for fn in fns:
        fn()  # warm-up (and compile)
    times = [[] for _ in fns]
    for r in range(rounds):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            times[i].append(_time(fns[i], calls))
    return times


# ------------------------------------------------------------------------- rows


def _goal(text: str):
    op, value = text.split()
    value = float(value)
    return (lambda x: x <= value) if op == "<=" else (lambda x: x >= value)


def _fresh_child(row, c, n):
    fn = make_contender(row, c, n)
    first = _time(fn)
    warm = statistics.median(_time(fn) for _ in range(3))
    return {"first_s": first, "warm_s": warm}


def measure_row(row: dict) -> dict:
    """Measure one row; returns it with ``figures`` (one per length) and ``holds``."""
    row = {**DEFAULTS, **row}
    kind = row["kind"]
    lengths = [int(n) for n in row.get("lengths", [row.get("N", 4096)])]
    holds = _goal(row["goal"])
    figures, details = [], []
    if kind == "ratio":
        for n in lengths:
            a, b = make_contender(row, row["a"], n), make_contender(row, row["b"], n)
            ta, tb = interleaved([a, b], row["rounds"], row.get("calls", 1))
            ratios = [x / y for x, y in zip(ta, tb)]
            figures.append(statistics.median(ratios))
            details.append({"N": n, "a_ms": statistics.median(ta) * 1e3, "b_ms": statistics.median(tb) * 1e3,
                            "spread": (max(ratios) - min(ratios)) / figures[-1]})
    elif kind == "gflops":
        for n in lengths:
            a = make_contender(row, row["a"], n)
            (ta,) = interleaved([a], row["rounds"])
            B, H, D = row["batch"], row["heads"], row["head_dim"]
            flops = eval(row["flops"], {"__builtins__": {}}, {"B": B, "H": H, "N": n, "D": D})  # noqa: S307
            figures.append(flops / statistics.median(ta) / 1e9)
            details.append({"N": n, "a_ms": statistics.median(ta) * 1e3, "gflop": flops / 1e9})
    elif kind == "scaling":
        n1, n2 = lengths
        a1, a2 = make_contender(row, row["a"], n1), make_contender(row, row["a"], n2)
        t1, t2 = interleaved([a1, a2], row["rounds"])
        figures.append(statistics.median(t2) / statistics.median(t1))
        details.append({"N1": n1, "N2": n2, "t1_ms": statistics.median(t1) * 1e3, "t2_ms": statistics.median(t2) * 1e3})
    elif kind == "fresh":
        from .worker import run_isolated

        for n in lengths:
            status, value = run_isolated(_fresh_child, (row, row["a"], n), timeout=600)
            if status != "ok":
                raise RuntimeError(f"fresh-process measurement failed: {status}: {value}")
            figures.append(value["first_s"] / value["warm_s"])
            details.append({"N": n, "first_ms": value["first_s"] * 1e3, "warm_ms": value["warm_s"] * 1e3})
    elif kind == "error":
        for n in lengths:
            errs = []
            for c in (row["a"], row["b"]):
                q, k, v = _inputs(row, c, n, False)
                causal = c.get("pattern", row["pattern"]).startswith("causal")
                exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
                if c.get("peer") == "sdpa":
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                else:
                    out = registry.get(c["method"])(q, k, v, causal=causal, impl=c.get("impl", "auto"),
                                                    **dict(c.get("options", {})))
                errs.append(float((out.double() - exact).abs().max()))
            figures.append(errs[0] / errs[1])
            details.append({"N": n, "a_err": errs[0], "b_err": errs[1]})
    else:
        raise AttentionInputError(f"row {row['name']!r}: unknown kind {kind!r}; known: ratio, gflops, scaling, "
                                  "fresh, error")
    return {**row, "figures": figures, "details": details, "holds": all(holds(f) for f in figures)}


def load_rows(path) -> list:
    from .results import load_config

    config, path = load_config(str(path))
    rows = config.get("row", [])
    if not rows:
        raise AttentionInputError(f"{path}: no [[row]] tables")
    for r in rows:
        for key in ("name", "kind", "goal", "a"):
            if key not in r:
                raise AttentionInputError(f"{path}: a row lacks {key!r}: {r}")
    return rows


def run(path, only: Optional[str] = None, progress: Optional[Callable] = None) -> list:
    """Measure every row of the config (or those whose name contains ``only``)."""
    out = []
    for row in load_rows(path):
        if only and only not in row["name"]:
            continue
        if progress:
            progress(row["name"])
        try:
            out.append(measure_row(row))
        except Exception as e:  # noqa: BLE001 - recorded, the other rows go on
            out.append({**DEFAULTS, **row, "figures": [], "details": [], "holds": False,
                        "error": f"{type(e).__name__}: {e}"})
    return out


def format_figure(row: dict) -> str:
    if row.get("error"):
        return "ERROR: " + row["error"][:120]
    unit = " GFLOP/s" if row["kind"] == "gflops" else "x"
    parts = []
    for f, d in zip(row["figures"], row["details"]):
        where = f"N={d['N']}" if "N" in d else f"N={d['N1']}->{d['N2']}"
        parts.append(f"{f:.2f}{unit} ({where})" if not math.isnan(f) else "nan")
    return ", ".join(parts)


def add_bench_parser(bsub) -> None:
    p = bsub.add_parser("goals", help="the performance goals: each row's figure, its goal, and whether it holds")
    p.add_argument("--config", default=None, help="a goals TOML (default: benchmarks/perf-goals.toml)")
    p.add_argument("--only", default=None, help="only the rows whose name contains this text")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="also append the rows to OUT/goals.jsonl")
    p.set_defaults(func=cmd_goals)


def cmd_goals(args) -> int:
    import json
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.config or Path(__file__).resolve().parents[2] / "benchmarks" / "perf-goals.toml"
    console = Console(width=200)
    rows = run(path, args.only, progress=lambda name: console.print(f"[cyan]measuring[/cyan] {name}"))
    table = Table(title=f"performance goals ({path}), {torch.get_num_threads()} threads, one run")
    for col in ("row", "figure", "goal", "holds"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], format_figure(r), r["goal"], "[green]holds[/green]" if r["holds"] else "[red]misses[/red]")
    console.print(table)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "goals.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps(jsonable({"kind": "goal", **r})) + "\n")
    return 0
