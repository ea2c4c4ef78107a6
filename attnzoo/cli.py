"""The ``attnzoo`` command: ``attnzoo list`` and ``attnzoo bench``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from . import registry

LIST_COLUMNS = ["method", "family", "patterns", "exact", "time", "memory", "impls", "learnable", "masks", "gqa",
                "decoding", "paper"]

#: ``--methods all``: every registered method (its auto impl) and softmax's tiled path.
DEFAULT_BENCH_METHODS = "all"


def methods_markdown() -> str:
    """The README's table of methods, generated from the registry."""
    rows = [s.row() for s in registry.methods()]
    lines = ["| " + " | ".join(LIST_COLUMNS) + " |", "|" + "---|" * len(LIST_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]).replace("|", "\\|") for c in LIST_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def cmd_list(args) -> int:
    if args.markdown:
        sys.stdout.write(methods_markdown())
        return 0
    table = Table(title=f"attnzoo methods ({len(registry.methods())})")
    for c in LIST_COLUMNS:
        table.add_column(c, overflow="fold", no_wrap=c in ("method", "family"))
    for s in registry.methods():
        r = s.row()
        table.add_row(*[str(r[c]) for c in LIST_COLUMNS])
    _console().print(table)
    return 0


def _console() -> Console:
    """A console at least 160 columns wide, so tables are not squeezed when piped."""
    console = Console()
    return Console(width=160) if not console.is_terminal or console.width < 160 else console


def _fmt_ms(s: Optional[float]) -> str:
    return "-" if s is None else f"{s * 1e3:,.1f}"


def cmd_bench(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .bench import efficiency as eff

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = args.methods
    if spec == "all":
        spec = ",".join(["softmax:sdpa", "softmax:tiled"] + [s.name for s in registry.methods() if s.name != "softmax"])
    methods = eff.parse_methods(spec)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("fwd", "fwd+bwd"):
            raise SystemExit(f"--modes takes fwd and/or fwd+bwd, got {m!r}")
    patterns = [p for p in args.patterns.split(",") if p]
    for p in patterns:
        if p not in registry.PATTERNS:
            raise SystemExit(f"--patterns takes {', '.join(registry.PATTERNS)}; got {p!r}")
    if args.dtype not in eff.DTYPES:
        raise SystemExit(f"--dtype takes {', '.join(eff.DTYPES)}; got {args.dtype!r}")
    options = parse_options(args.option, [m for m, _ in methods])
    cases = eff.build_cases(methods, lengths, modes, patterns, args.dtype, batch=args.batch, heads=args.heads,
                            kv_heads=args.kv_heads, head_dim=args.head_dim, repeats=args.repeats,
                            options_for=lambda name: options.get(name, ()), error=args.error)
    console = _console()
    console.print(f"[bold]attnzoo bench[/]: {len(cases)} cases, B={args.batch} H={args.heads} D={args.head_dim} "
                  f"{args.dtype}, median of {args.repeats}, each case in its own process; machine: "
                  f"{eff.machine_info()}")
    out_file = None
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        out_file = open(args.out, "a")
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True) as progress:
        task = progress.add_task("measuring", total=len(cases))

        def on_done(case, result):
            progress.update(task, advance=1, description=f"{case.label} N={case.seq_len} {case.mode}")
            if out_file:
                out_file.write(json.dumps({**result.record(), **eff.machine_info()}) + "\n")
                out_file.flush()

        for r in eff.run_sweep(cases, timeout=args.timeout, isolate=not args.no_isolate, progress=on_done,
                               memory_limit_mib=args.memory_limit):
            results.append(r)
    console.print(results_table(results))
    ok = all(r.status == "ok" for r in results)
    if args.decode_positions:
        ok &= _bench_decode(args, methods, console, out_file)
    if out_file:
        out_file.close()
    return 0 if ok else 1


def _bench_decode(args, methods, console, out_file) -> bool:
    """Per-token decode step time at each position (constant-state methods stay flat)."""
    from .bench import efficiency as eff

    positions = [int(x) for x in args.decode_positions.split(",") if x]
    names = []
    for name, _ in methods:
        if name != eff.BASELINE and registry.get(name).decoding and name not in names:
            names.append(name)
    table = Table(title="decoding: median time of one step (one new token) after a prefill of N tokens")
    for c in ("method", "state", *[f"N={p} ms" for p in positions], f"N={positions[-1]} / N={positions[0]}"):
        table.add_column(c, justify="left" if c in ("method", "state") else "right")
    ok = True
    for name in names:
        cells, first, last = [], None, None
        for p in positions:
            res = eff.run_decode(eff.DecodeCase(name, p, dtype=args.dtype, batch=args.batch, heads=args.heads,
                                                kv_heads=args.kv_heads, head_dim=args.head_dim), timeout=args.timeout)
            if out_file:
                rec = {k: v for k, v in res.items() if k != "case"}
                out_file.write(json.dumps({"kind": "decode", "method": name, "position": p, **rec,
                                           **eff.machine_info()}) + "\n")
            if res["status"] != "ok":
                ok = False
                cells.append(res["status"].upper())
                continue
            first = res["median_s"] if first is None else first
            last = res["median_s"]
            cells.append(_fmt_ms(res["median_s"]).replace(",", "") if res["median_s"] >= 1e-3
                         else f"{res['median_s'] * 1e3:.3f}")
        ratio = f"{last / first:.2f}x" if first and last else "-"
        table.add_row(name, registry.get(name).state_size or "", *cells, ratio)
    console.print(table)
    return ok


def parse_options(items, method_names) -> dict:
    """``["window=256", "neighborhood.grid=(128, 128)"]`` -> per-method option tuples.

    ``name=value`` applies to every chosen method that has the option; ``method.name=value``
    to that method only. Values are Python literals (numbers, tuples, lists), else strings.
    """
    import ast

    from .bench.efficiency import BASELINE

    out: dict = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--option takes name=value or method.name=value, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        target, _, name = key.rpartition(".")
        hit = False
        for m in method_names:
            if m == BASELINE or (target and m != target):
                continue
            if name in registry.get(m).options:
                out[m] = out.get(m, ()) + ((name, value),)
                hit = True
        if not hit:
            raise SystemExit(f"--option {item!r}: no chosen method has an option {name!r}")
    return out


def results_table(results) -> Table:
    from .bench import efficiency as eff

    ratio = eff.ratios(results)
    table = Table(title="time (ms, median) and peak memory above inputs (MiB); ratio = time / torch SDPA, same run")
    for c in ("pattern", "N", "method", "impl", "fwd ms", "fwd ratio", "fwd MiB", "fwd+bwd ms", "f+b ratio",
              "f+b MiB", "density", "max err"):
        table.add_column(c, justify="right" if c not in ("pattern", "method", "impl") else "left")
    rows = {}
    for r in results:
        c = r.case
        key = (c.pattern, c.seq_len, c.label)
        row = rows.setdefault(key, {"impl": r.impl_used or c.impl, "density": "", "max err": ""})
        if r.density is not None:
            row["density"] = f"{r.density:.3f}"
        if r.max_error is not None:
            row["max err"] = f"{r.max_error:.2e}"
        if r.status != "ok":
            row[c.mode] = (r.status.upper(), "", "")
        else:
            rat = ratio[id(r)]
            row[c.mode] = (_fmt_ms(r.median_s), "-" if rat is None else f"{rat:.2f}x",
                           "-" if r.peak_mib is None else f"{r.peak_mib:,.0f}")
    for (pattern, n, label), row in rows.items():
        f = row.get("fwd", ("", "", ""))
        fb = row.get("fwd+bwd", ("", "", ""))
        table.add_row(pattern, str(n), label.split(":")[0], row["impl"], *f, *fb, row["density"], row["max err"])
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnzoo", description="attention mechanisms behind one API")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the registered methods")
    p.add_argument("--markdown", action="store_true", help="print the Markdown table (the README's)")
    p.set_defaults(func=cmd_list)
    b = sub.add_parser("bench", help="time forward / forward+backward against torch SDPA")
    b.add_argument("--methods", default=DEFAULT_BENCH_METHODS,
                   help="comma-separated method or method:impl (default: %(default)s)")
    b.add_argument("--lengths", default="1024,4096", help="sequence lengths (default: %(default)s)")
    b.add_argument("--modes", default="fwd,fwd+bwd", help="fwd and/or fwd+bwd (default: %(default)s)")
    b.add_argument("--patterns", default="causal_self,noncausal_self",
                   help=f"any of {', '.join(registry.PATTERNS)} (default: %(default)s)")
    b.add_argument("--dtype", default="float32")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--heads", type=int, default=8)
    b.add_argument("--kv-heads", type=int, default=None)
    b.add_argument("--head-dim", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--timeout", type=float, default=300.0, help="seconds per case before it is recorded as timeout")
    b.add_argument("--memory-limit", type=float, default=None, help="MiB of address space per case (RLIMIT_AS)")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    b.add_argument("--out", default=None, help="append one JSON record per case to this file")
    b.add_argument("--error", action="store_true",
                   help="also report each output's max error against exact softmax (SDPA) on the same inputs")
    b.add_argument("--option", action="append", default=[], metavar="[METHOD.]NAME=VALUE",
                   help="a method option, e.g. window=256 or neighborhood.grid=(128,128); repeatable")
    b.add_argument("--decode-positions", default="", help="also time one decode step after prefills of these "
                   "lengths, e.g. 512,16384 (methods with decoding)")
    b.add_argument("--no-isolate", action="store_true", help="run cases in this process (memory figures are then "
                   "not per case)")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import AttentionInputError

    try:
        return args.func(args)
    except AttentionInputError as e:
        print(f"attnzoo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
