"""The ``attnzoo`` command: ``attnzoo list``, ``attnzoo info``, ``attnzoo bench efficiency|tasks|all``,
``attnzoo report`` and ``attnzoo convert``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from . import registry

LIST_COLUMNS = ["method", "family", "patterns", "exact", "time", "memory", "impls", "learnable", "masks", "gqa",
                "decoding", "strictly causal", "paper"]


def methods_markdown() -> str:
    """The README's table of methods, generated from the registry."""
    rows = [s.row() for s in registry.list_methods()]
    lines = ["| " + " | ".join(LIST_COLUMNS) + " |", "|" + "---|" * len(LIST_COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]).replace("|", "\\|") for c in LIST_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def cmd_list(args) -> int:
    if args.markdown:
        sys.stdout.write(methods_markdown())
        return 0
    table = Table(title=f"attnzoo methods ({len(registry.list_methods())})")
    for c in LIST_COLUMNS:
        table.add_column(c, overflow="fold", no_wrap=c in ("method", "family"))
    for s in registry.list_methods():
        r = s.row()
        table.add_row(*[str(r[c]) for c in LIST_COLUMNS])
    _console().print(table)
    return 0


def cmd_info(args) -> int:
    from rich.markdown import Markdown
    from rich.panel import Panel

    from .docs import method_info

    spec = registry.get(args.method)  # a misspelled name gets the closest suggestion
    info = method_info(spec)
    console = _console()
    console.print(Panel(f"[bold]{info['name']}[/bold] ({info['family']}) — {info['summary']}\n"
                        f"paper: {info['paper']}\nfile: {info['module']}", expand=False))
    console.print(info["doc"])
    table = Table(title="options")
    for c in ("option", "default", "meaning", "only for"):
        table.add_column(c, overflow="fold")
    for o in info["options"]:
        table.add_row(o["name"], o["default"], o["meaning"], o["only"])
    console.print(table if info["options"] else "options: none")
    impls = Table(title="implementations")
    impls.add_column("impl")
    impls.add_column("what it is", overflow="fold")
    for i in info["impls"]:
        impls.add_row(i["name"], i["description"])
    console.print(impls)
    facts = [f"patterns: {', '.join(info['patterns'])}"
             + (f" (not: {', '.join(info['unsupported'])})" if info["unsupported"] else ""),
             f"exact: {'yes' if info['exact'] else 'no'}; time {info['time']}; memory {info['memory']}",
             f"masks: {'any' if info['masks'] else 'key padding only'}; score_mods / float masks: "
             f"{'yes' if info['score_mods'] else 'no'}; GQA: {'yes' if info['gqa'] else 'no'}; "
             f"dropout: {'yes' if info['dropout'] else 'no'}",
             f"decoding: {info['decoding'] or 'no'}",
             f"parameters: {info['module_class'] or 'none'}"]
    if info["causal_leak"]:
        facts.append(f"not strictly causal: {info['causal_leak']}")
    console.print(Markdown("\n".join(f"- {f}" for f in facts)))
    return 0


def _console() -> Console:
    """A console at least 160 columns wide, so tables are not squeezed when piped."""
    console = Console()
    return Console(width=160) if not console.is_terminal or console.width < 160 else console


def _fmt_ms(s: Optional[float]) -> str:
    return "-" if s is None else f"{s * 1e3:,.1f}"


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}", style="cyan"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True)


def _load(args):
    """The config named by --config / --quick: ``(dict, path)``."""
    from .bench.results import load_config

    return load_config(args.config or ("quick" if args.quick else "full"))


def _results(args, name):
    from .bench.results import ResultsFile

    return ResultsFile(Path(args.out) / name, resume=args.resume)


def cmd_bench_efficiency(args, config=None, config_path=None) -> int:
    import torch

    from .bench import sweep
    from .bench.results import run_record

    if args.threads:  # this process (checks without isolation); every worker sets its own
        torch.set_num_threads(args.threads)
    if config is None:
        config, config_path = _load(args)
    settings, notes = sweep.settings_from_args(args, config, Path(config_path).stem if config_path else None)
    if args.option:
        settings["options"] = {**settings["options"], **parse_options(args.option)}
    checks, cases = sweep.efficiency_plan(settings)  # validates methods and options before anything runs
    skipped = sweep.skipped_pairs(settings)
    console = _console()
    with _results(args, "efficiency.jsonl") as results:
        run = run_record("efficiency", config, config_path)
        run["settings"] = dict(settings)
        run["skipped"] = skipped
        run["skipped_decode"] = sweep.decode_plan(settings)[1] if settings["decode_positions"] else []
        results.append(run)
        todo = sum(c.key() not in results.done for c in cases)
        console.print(f"[bold]attnzoo bench efficiency[/] ({config_path}): {len(cases)} cases"
                      + (f", {len(cases) - todo} already done" if todo < len(cases) else "")
                      + f"; {len(checks)} quick checks first. B={settings['batch']} H={settings['heads']} "
                      f"D={settings['head_dim']}, {'/'.join(settings['dtypes'])}, median of {settings['repeats']}, "
                      f"each case in its own process. Results: {results.path}")
        for note in notes:
            console.print(f"  {note}", markup=False, highlight=False)
        if skipped:
            console.print(f"  skipped (the method does not support the pattern): {sweep.skipped_text(skipped)}",
                          markup=False, highlight=False)
        with _progress(console) as progress:
            task = progress.add_task("efficiency", total=len(cases))
            measured = sweep.run_efficiency(settings, checks, cases, results, run["run_id"],
                                            isolate=not args.no_isolate,
                                            progress=lambda d, n: progress.update(task, advance=n, description=d))
        if measured:
            console.print(results_table(measured))
        failed = [r for r in measured if r.status not in ("ok", "skipped")]
        for r in failed:
            console.print(f"[yellow]{r.status}[/]: {r.case.label} {r.case.pattern} N={r.case.seq_len} "
                          f"{r.case.mode} {r.case.dtype}: {(r.error or '').splitlines()[0][:200]}")
        over = [r for r in measured if r.status == "skipped"]
        if over:
            console.print(f"not timed (over skip_ratio = {settings['skip_ratio']:g}x SDPA at a shorter "
                          f"length): {len(over)} case(s): " + ", ".join(f"{r.case.label} {r.case.pattern} "
                                                                        f"N={r.case.seq_len} {r.case.mode}"
                                                                        for r in over[:12])
                          + (" …" if len(over) > 12 else ""), markup=False, highlight=False)
        for flag, why in (("noisy", f"spread above {settings['noise_threshold']:.0%} after "
                                    f"{settings['noise_retries']} re-measurement(s)"),
                          ("loaded", "the machine was busy with other processes")):
            flagged = [r for r in measured if r.status == "ok" and getattr(r, flag)]
            if flagged:
                names = ", ".join(f"{r.case.label} {r.case.pattern} N={r.case.seq_len} {r.case.mode}"
                                  for r in flagged[:12])
                console.print(f"[yellow]{flag}[/] ({why}): {len(flagged)} case(s): {names}"
                              + (" …" if len(flagged) > 12 else ""))
        ok = not failed
        if settings["decode_positions"]:
            ok &= _bench_decode(settings, sweep.resolve_methods(settings["methods"]), console, results,
                                run["run_id"])
    console.print(f"{len(measured)} cases measured, {len(failed)} not ok. Report: attnzoo report {args.out}")
    return 1 if (args.strict and not ok) else 0


def cmd_bench_tasks(args, config=None, config_path=None) -> int:
    from .bench import sweep
    from .bench.results import run_record
    from .bench.tasks.suite import build_task_cases

    if config is None:
        config, config_path = _load(args)
    table = dict(config.get("tasks", {}))
    if args.tasks:
        table["tasks"] = [t for t in args.tasks.split(",") if t]
    methods = args.methods or table.get("methods", "all")
    names = []
    for name, _ in sweep.resolve_methods(methods):
        if name not in names and name != "torch_sdpa":
            names.append(name)
    cases = build_task_cases(table, names)
    if args.patterns:
        wanted = [p for p in args.patterns.split(",") if p]
        for p in wanted:
            if p not in registry.PATTERNS:
                raise SystemExit(f"--patterns takes {', '.join(registry.PATTERNS)}; got {p!r}")
        cases = [c for c in cases if c.pattern in wanted]
    workers = args.workers or int(table.get("workers", 2))
    threads = int(table.get("threads", 1))
    timeout = args.timeout or float(table.get("timeout", 600))
    console = _console()
    with _results(args, "tasks.jsonl") as results:
        run = run_record("tasks", config, config_path)
        results.append(run)
        todo = sum(c.key() not in results.done for c in cases)
        console.print(f"[bold]attnzoo bench tasks[/] ({config_path}): {len(cases)} trainings"
                      + (f", {len(cases) - todo} already done" if todo < len(cases) else "")
                      + f", {workers} at a time with {threads} thread(s) each. Results: {results.path}")
        with _progress(console) as progress:
            task = progress.add_task("tasks", total=len(cases))
            records = sweep.run_tasks(cases, results, run["run_id"], workers=workers, threads=threads,
                                      timeout=timeout,
                                      progress=lambda d, n: progress.update(task, advance=n, description=d))
    if records:
        console.print(tasks_table(records))
    failed = [r for r in records if r["status"] != "ok"]
    for r in failed:
        console.print(f"[yellow]{r['status']}[/]: {r['task']} {r['method']}: {(r['error'] or '').splitlines()[0][:200]}")
    console.print(f"{len(records)} models trained, {len(failed)} not ok. Report: attnzoo report {args.out}")
    return 1 if (args.strict and failed) else 0


def cmd_bench_all(args) -> int:
    """Efficiency, then tasks, then the report, from one config."""
    config, path = _load(args)
    code = cmd_bench_efficiency(args, config, path)
    code |= cmd_bench_tasks(args, config, path)
    return code | cmd_report(argparse.Namespace(results=args.out, report_dir=None))


def cmd_bench_overhead(args) -> int:
    from .bench.overhead import GOAL_RATIO, overhead

    methods = [m for m in (args.methods or "softmax").split(",") if m]
    rows = overhead(methods, rounds=args.rounds, calls=args.calls)
    table = Table(title="per-call time at N = 1 (B=1, H=8, D=64, one thread): attnzoo.attention vs "
                        "F.scaled_dot_product_attention, interleaved, median of rounds")
    for c in ("method", "impl", "attnzoo µs", "SDPA µs", "ratio", "spread", f"goal ≤ {GOAL_RATIO:g}x"):
        table.add_column(c, justify="left" if c in ("method", "impl") else "right")
    for r in rows:
        table.add_row(r["method"], r["impl"], f"{r['attnzoo_us']:.1f}", f"{r['sdpa_us']:.1f}", f"{r['ratio']:.2f}x",
                      f"{r['spread'] * 100:.0f}%", "holds" if r["ratio"] <= GOAL_RATIO else "misses")
    _console().print(table)
    if args.json:
        print(json.dumps(rows))
    return 0


def cmd_report(args) -> int:
    from .bench.report import main_summary, render_report

    render_report(args.results, args.report_dir)
    print(main_summary(args.results, args.report_dir))
    return 0


def cmd_convert(args) -> int:
    """Convert a Hugging Face model to each method and write the fidelity and speed report."""
    import torch

    from .bench import conversion

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for item in args.method for m in item.split(",") if m]
    lengths = [int(n) for n in args.lengths.split(",") if n] if args.lengths else list(conversion.DEFAULT_LENGTHS)
    console = _console()
    console.print(f"[bold]attnzoo convert[/] {args.model}: {', '.join(methods)}; report in {args.out}")
    res = conversion.run(args.model, methods, out_dir=args.out, steps=args.steps, lr=args.lr,
                         options=parse_options(args.option), lengths=lengths, repeats=args.repeats,
                         n_texts=args.texts, n_held_out=args.held_out,
                         memory=not args.no_memory, progress=True, console=console,
                         command="attnzoo " + shlex.join(getattr(args, "argv", None) or []))
    table = Table(title=f"conversion of {args.model} (held-out sentences; time ratio = converted / original)")
    for c in ("method", "attention KL", "cosine", "Spearman", "distillation s", "CPU s",
              *[f"time @{n}" for n in lengths]):
        table.add_column(c, justify="left" if c == "method" else "right")
    for m in res["results"]["methods"]:
        if m["status"] != "ok":
            table.add_row(m["method"], "[yellow]error[/]", "", "", "", "", *[""] * len(lengths))
            continue
        sp = {s["n"]: s["ratio"] for s in m["speed"]}
        table.add_row(m["method"], f"{m['attention_kl']:.3f}", f"{m['cosine']:.4f}", f"{m['spearman']:.4f}",
                      f"{m['distill_seconds']:.1f}", f"{m['distill_cpu_seconds']:.1f}",
                      *[f"{sp[n]:.2f}x" if n in sp else "-" for n in lengths])
    console.print(table)
    console.print(f"report: {res['html']} (and {res['markdown'].name}, {res['json'].name})")
    failed = [m for m in res["results"]["methods"] if m["status"] != "ok"]
    return 1 if (args.strict and failed) else 0


def tasks_table(records) -> Table:
    table = Table(title="task accuracy (held-out examples)")
    for c in ("task", "pattern", "setting", "method", "accuracy", "chance", "train s", "status"):
        table.add_column(c, justify="right" if c in ("accuracy", "chance", "train s") else "left")
    for r in sorted(records, key=lambda r: (r["task"], json.dumps(r["setting"]), r["method"])):
        table.add_row(r["task"], r["pattern"], " ".join(f"{k}={v}" for k, v in r["setting"].items()), r["method"],
                      "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}",
                      "-" if r["chance"] is None else f"{r['chance']:.3f}",
                      "-" if r["train_s"] is None else f"{r['train_s']:.1f}", r["status"])
    return table


def _bench_decode(settings, methods, console, results, run_id) -> bool:
    """Per-token decode step time at each position (constant-state methods stay flat). A
    position that ran out of memory or time shows its status, and so does the ratio."""
    from .bench import efficiency as eff
    from .bench import sweep

    positions = settings["decode_positions"]
    _, no_decoding = sweep.decode_plan(settings)
    rows = sweep.run_decode_sweep(settings, results, run_id)
    table = Table(title="decoding: median time of one step (one new token) after a prefill of N tokens")
    for c in ("method", "state", *[f"N={p} ms" for p in positions], f"N={positions[-1]} / N={positions[0]}"):
        table.add_column(c, justify="left" if c in ("method", "state") else "right")
    ok = True
    for name, recs in rows.items():
        cells = []
        for res in recs:
            if res["status"] != "ok":
                ok = False
                cells.append(res["status"].upper())
                continue
            cells.append(_fmt_ms(res["median_s"]).replace(",", "") if res["median_s"] >= 1e-3
                         else f"{res['median_s'] * 1e3:.3f}")
        growth, status = eff.decode_growth(recs[0] if recs else None, recs[-1] if recs else None)
        ratio = f"{growth:.2f}x" if growth is not None else status.upper()
        table.add_row(name, registry.get(name).state_size or "", *cells, ratio)
    console.print(table)
    if no_decoding:
        console.print(f"  skipped (no decoding): {', '.join(no_decoding)}", markup=False, highlight=False)
    return ok


def parse_options(items) -> dict:
    """``["window=256", "neighborhood.grid=(128, 128)"]`` -> ``{"window": 256, "neighborhood.grid": (128, 128)}``.

    Values are Python literals (numbers, tuples, lists), else strings. Which methods
    take each option is resolved by :func:`attnzoo.bench.sweep.method_options`."""
    import ast

    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--option takes name=value or method.name=value, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out[key] = value
    return out


def results_table(results) -> Table:
    from .bench import efficiency as eff

    ratio = eff.ratios(results)
    table = Table(title="time (ms, median) and peak memory above inputs (MiB); ratio = time / torch SDPA, same run")
    for c in ("pattern", "dtype", "N", "method", "impl", "fwd ms", "fwd ratio", "fwd MiB", "fwd+bwd ms", "f+b ratio",
              "f+b MiB", "density", "max err"):
        table.add_column(c, justify="right" if c not in ("pattern", "dtype", "method", "impl") else "left")
    rows = {}
    for r in results:
        c = r.case
        key = (c.pattern, c.dtype, c.seq_len, c.label)
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
    for (pattern, dtype, n, label), row in rows.items():
        f = row.get("fwd", ("", "", ""))
        fb = row.get("fwd+bwd", ("", "", ""))
        table.add_row(pattern, dtype, str(n), label.split(":")[0], row["impl"], *f, *fb, row["density"], row["max err"])
    return table


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("attnzoo")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree without installing
        __version__ = "unknown (not installed)"
    parser = argparse.ArgumentParser(prog="attnzoo", description="attention mechanisms behind one API")
    parser.add_argument("--version", action="version", version=f"attnzoo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    i = sub.add_parser("info", help="one method: its maths, every option with its default, patterns, impls, paper")
    i.add_argument("method", help="a registered method name (see `attnzoo list`)")
    i.set_defaults(func=cmd_info)
    p = sub.add_parser("list", help="list the registered methods")
    p.add_argument("--markdown", action="store_true", help="print the Markdown table (the README's)")
    p.set_defaults(func=cmd_list)
    b = sub.add_parser("bench", help="benchmarks: efficiency (time, memory vs SDPA), tasks (accuracy), or all",
                       description="Run a benchmark sweep from a config (benchmarks/*.toml), appending one JSON "
                                   "record per case to OUT/<sweep>.jsonl; then `attnzoo report OUT`.")
    bsub = b.add_subparsers(dest="sweep", required=True)
    effp = bsub.add_parser("efficiency", help="time and peak memory of every method against torch SDPA")
    tasp = bsub.add_parser("tasks", help="accuracy of a small model per method on MQAR and the four CAB tasks")
    allp = bsub.add_parser("all", help="efficiency, tasks, then the report")
    for p in (effp, tasp, allp):
        p.add_argument("--config", default=None, help="a config name in benchmarks/ (quick, full) or a TOML path "
                       "(default: full, or quick with --quick)")
        p.add_argument("--quick", action="store_true", help="the quick config (benchmarks/quick.toml: every method, "
                       "forward timings in the self patterns, classify and MQAR; under 5 min on 2 cores)")
        p.add_argument("--methods", default=None, help="comma-separated method or method:impl, or all "
                       "(default: the config's)")
        p.add_argument("--patterns", default=None, help=f"comma-separated, any of {', '.join(registry.PATTERNS)}")
        p.add_argument("--out", default="bench-results", help="results directory (default: %(default)s)")
        p.add_argument("--resume", action="store_true",
                       help="skip the cases already in OUT (otherwise the old results move to *.jsonl.prev)")
        p.add_argument("--timeout", type=float, default=None, help="seconds per case before it is recorded as "
                       "timeout")
        p.add_argument("--strict", action="store_true", help="exit 1 if any case is not ok")
    for p in (effp, allp):
        p.add_argument("--lengths", default=None, help="sequence lengths, e.g. 1024,4096")
        p.add_argument("--dtypes", default=None, help="float32 and/or bfloat16 (float16, float64)")
        p.add_argument("--modes", default=None, help="fwd and/or fwd+bwd")
        p.add_argument("--batch", type=int, default=None)
        p.add_argument("--heads", type=int, default=None)
        p.add_argument("--kv-heads", type=int, default=None)
        p.add_argument("--head-dim", type=int, default=None)
        p.add_argument("--repeats", type=int, default=None, help="timed runs per case (after one warm-up)")
        p.add_argument("--memory-limit", type=float, default=None, help="MiB of address space per case (RLIMIT_AS)")
        p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
        p.add_argument("--device", default=None, help="cpu (default) or cuda: synchronised timing and the "
                       "allocator's peak memory")
        p.add_argument("--error", action="store_true",
                       help="also report each output's max error against exact softmax (SDPA) on the same inputs")
        p.add_argument("--option", action="append", default=[], metavar="[METHOD.]NAME=VALUE",
                       help="a method option, e.g. window=256 or neighborhood.grid=(128,128); repeatable")
        p.add_argument("--decode-positions", default=None, help="also time one decode step after prefills of "
                       "these lengths, e.g. 512,16384 (methods with decoding)")
        p.add_argument("--tensor-memory", action="store_true", help="also the peak of live tensors per case "
                       "(the profiler's memory timeline; about 1 s more per case), free of process noise")
        p.add_argument("--no-check", action="store_true", help="skip the quick fast-vs-reference checks")
        p.add_argument("--no-isolate", action="store_true", help="run cases in this process (memory figures are "
                       "then not per case)")
    for p in (tasp, allp):
        p.add_argument("--tasks", default=None, help="comma-separated tasks (default: the config's)")
        p.add_argument("--workers", type=int, default=None, help="trainings side by side (default: the config's)")
    effp.set_defaults(func=cmd_bench_efficiency)
    tasp.set_defaults(func=cmd_bench_tasks)
    allp.set_defaults(func=cmd_bench_all)
    ovp = bsub.add_parser("overhead", help="per-call overhead of attention() at N = 1 against SDPA's own call")
    ovp.add_argument("--methods", default="softmax", help="comma-separated methods (default: softmax)")
    ovp.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default: %(default)s)")
    ovp.add_argument("--calls", type=int, default=500, help="calls per round (default: %(default)s)")
    ovp.add_argument("--json", action="store_true", help="also print the rows as JSON")
    ovp.set_defaults(func=cmd_bench_overhead)
    c = sub.add_parser("convert", help="convert a Hugging Face model to attention methods (distilled) and report "
                       "their fidelity and speed",
                       description="Convert MODEL (a local folder, or a registered name such as all-minilm-l6-v2) "
                                   "to each --method with attnzoo.convert, distilled on attnzoo's own sentences; "
                                   "measure attention and embedding fidelity on held-out sentences and speed "
                                   "against the original; write OUT/report.md, OUT/report.html, "
                                   "OUT/conversion.json.")
    c.add_argument("model", help="a local model folder or a registered model name (all-minilm-l6-v2)")
    c.add_argument("--method", action="append", required=True, help="a method (or a comma-separated list); "
                   "repeatable")
    c.add_argument("--steps", type=int, default=300, help="distillation steps per layer for methods with "
                   "parameters (default: %(default)s)")
    c.add_argument("--lr", type=float, default=None, help="distillation learning rate (default: attnzoo.convert's)")
    c.add_argument("--option", action="append", default=[], metavar="[METHOD.]NAME=VALUE",
                   help="a method option, e.g. sliding_window.window=8 or hedgehog.feature_dim=64; repeatable")
    c.add_argument("--lengths", default=None, help="sequence lengths for the speed and memory table "
                   "(default: 128,512)")
    c.add_argument("--repeats", type=int, default=5, help="timed forward passes per length (default: %(default)s)")
    c.add_argument("--texts", type=int, default=None, help="distil on only N of the training sentences (evenly "
                   "spaced over the topics; default: all)")
    c.add_argument("--held-out", type=int, default=None, help="measure on only N of the held-out sentences "
                   "(default: all)")
    c.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    c.add_argument("--no-memory", action="store_true", help="skip the attention-memory measurement")
    c.add_argument("--out", default="convert-results", help="report directory (default: %(default)s)")
    c.add_argument("--strict", action="store_true", help="exit 1 if a method could not convert the model")
    c.set_defaults(func=cmd_convert)
    r = sub.add_parser("report", help="write report.md, report.html and plots from a results directory")
    r.add_argument("results", help="the results directory of `attnzoo bench` (e.g. bench-results)")
    r.add_argument("--out", dest="report_dir", default=None, help="where to write the report (default: RESULTS)")
    r.set_defaults(func=cmd_report)
    # Subcommands that live with their package: each module has add_parser(sub) (top-level
    # commands) or add_bench_parser(bsub) (`attnzoo bench <name>`); one line each, below.
    from .analysis.report import add_parser as _inspect; _inspect(sub)  # noqa: E702  attnzoo inspect
    from .bench import goals as _goals; _goals.add_bench_parser(bsub)  # noqa: E702
    from .distributed.bench import add_bench_parser; add_bench_parser(bsub)  # noqa: E702  attnzoo bench distributed
    from .bench import claims as _claims; _claims.add_bench_parser(bsub)  # noqa: E702  attnzoo bench claims
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from .errors import AttentionInputError

    try:
        return args.func(args)
    except AttentionInputError as e:
        print(f"attnzoo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
