"""The two sweeps behind ``attnzoo bench``: efficiency and tasks.

Both read their settings from a TOML config (``benchmarks/*.toml``: an
``[efficiency]`` and a ``[tasks]`` table), overridable from the command line, and
append one record per finished case to a :class:`~attnzoo.bench.results.ResultsFile`,
skipping cases already there when resuming.

Efficiency: every method first passes :func:`attnzoo.bench.check.quick_check` in each
pattern it will be timed in (one worker process per method); then each
(dtype, pattern, length, mode, method) case runs in its own worker process
(:mod:`attnzoo.bench.worker`), torch's SDPA first at every point so that ratios are
taken within the run. A method whose check failed gets ``status="failed_check"``
records instead of timings.

Tasks: each (task, setting, method) trains a small model in its own worker process;
``workers`` of them run side by side, each with ``threads`` torch threads.

What a run measures is what was asked, and it says when it cannot be trusted:

* ``threads`` is set inside every worker (checks, cases, decode steps) and each record
  holds the count the worker actually ran with;
* each case records the load around it; a noisy case (spread above ``noise_threshold``)
  is re-measured up to ``noise_retries`` times and flagged ``noisy`` if it stays so;
* explicit command-line selections are not extended by the default config
  (:func:`settings_from_args`), and the (method, pattern) pairs a method does not support
  are listed (:func:`skipped_pairs`), never dropped without a word;
* a decode case that runs out of memory or time is recorded as such (:func:`run_decode_sweep`).
"""

from __future__ import annotations

import json
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict
from typing import Callable, Optional

import torch

from .. import registry
from ..errors import AttentionInputError
from . import efficiency as eff
from .results import ResultsFile, as_list as _as_list, jsonable
from .worker import run_isolated

#: The [efficiency] settings and their defaults (a config or the command line overrides them).
EFFICIENCY_DEFAULTS = {
    "methods": "all",  # "all", or method / method:impl names (a list or a comma-separated string)
    "patterns": list(registry.PATTERNS),
    "lengths": [1024, 2048, 4096, 8192],
    "dtypes": ["float32", "bfloat16"],
    "modes": ["fwd", "fwd+bwd"],
    "batch": 1,
    "heads": 8,
    "kv_heads": None,
    "head_dim": 64,
    "repeats": 3,
    "timeout": 300.0,  # seconds per case
    "memory_limit_mib": None,  # address-space cap per case
    "check": True,  # the quick fast-vs-reference check before timing
    "error": False,  # also measure each output's error against exact softmax
    "options": {},  # {"name": value} for every method that has it, {"method.name": value} for one
    "decode_positions": [],  # also time a decode step after prefills of these lengths
    "device": "cpu",  # or "cuda": synchronised timing plus the allocator's peak
    "tensor_memory": False,  # CPU: also profile the peak of live tensors (exact, ~1 s more per case)
    "threads": None,  # torch threads inside every worker (None: torch's default there)
    "noise_threshold": eff.NOISE_DEFAULTS["threshold"],  # spread (max - min) / median above this is noise
    "noise_retries": eff.NOISE_DEFAULTS["retries"],  # re-measurements of a noisy case before it is flagged
    "load_threshold": eff.NOISE_DEFAULTS["load_threshold"],  # contention above this flags a case "loaded"
    # a budget: a series that, at some length, was more than skip_ratio x SDPA's time there and
    # took more than skip_min_s per call is not timed at longer lengths (None: every length)
    "skip_ratio": None,
    "skip_min_s": 0.01,
}

#: Command-line selections that, without a named config, are not extended by the default
#: config's other dtypes and decode positions (see :func:`settings_from_args`).
SELECTION_KEYS = ("methods", "lengths", "patterns", "modes", "dtypes")

ProgressFn = Callable[[str, int], None]  # (description, cases just finished)


def _ints(key: str, value) -> list:
    try:
        return [int(n) for n in _as_list(value)]
    except (TypeError, ValueError):
        raise AttentionInputError(f"{key} must be a list of integers, got {value!r}") from None


def efficiency_settings(config: dict, overrides: Optional[dict] = None) -> dict:
    """Defaults, then the config's ``[efficiency]`` table, then the non-None overrides; validated."""
    table = dict(config.get("efficiency", {}))
    unknown = set(table) - set(EFFICIENCY_DEFAULTS)
    if unknown:
        raise AttentionInputError(f"[efficiency] has unknown keys {sorted(unknown)}; "
                                  f"known: {', '.join(EFFICIENCY_DEFAULTS)}")
    s = {**EFFICIENCY_DEFAULTS, **table, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    s["patterns"] = _as_list(s["patterns"])
    s["lengths"] = _ints("lengths", s["lengths"])
    s["dtypes"] = _as_list(s["dtypes"])
    s["modes"] = _as_list(s["modes"])
    s["decode_positions"] = _ints("decode_positions", s["decode_positions"])
    for key in ("batch", "heads", "head_dim", "repeats"):
        if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < 1:
            raise AttentionInputError(f"{key} must be a positive integer, got {s[key]!r}")
    if s["kv_heads"] is not None and (not isinstance(s["kv_heads"], int) or s["kv_heads"] < 1
                                      or s["heads"] % s["kv_heads"]):
        raise AttentionInputError(f"kv_heads must be a positive integer dividing heads={s['heads']}, "
                                  f"got {s['kv_heads']!r}")
    for key in ("check", "error", "tensor_memory"):
        if not isinstance(s[key], bool):
            raise AttentionInputError(f"{key} must be true or false, got {s[key]!r}")
    if not isinstance(s["options"], dict):
        raise AttentionInputError(f"options must be a table of name = value, got {s['options']!r}")
    for p in s["patterns"]:
        if p not in registry.PATTERNS:
            raise AttentionInputError(f"patterns: {p!r} is not one of {', '.join(registry.PATTERNS)}")
    for d in s["dtypes"]:
        if d not in eff.DTYPES:
            raise AttentionInputError(f"dtypes: {d!r} is not one of {', '.join(eff.DTYPES)}")
    for m in s["modes"]:
        if m not in ("fwd", "fwd+bwd"):
            raise AttentionInputError(f"modes: {m!r} is not fwd or fwd+bwd")
    if not s["lengths"] or min(s["lengths"]) < 1:
        raise AttentionInputError(f"lengths must be positive integers, got {s['lengths']}")
    if s["device"] != "cpu" and not (s["device"].startswith("cuda") and torch.cuda.is_available()):
        raise AttentionInputError(f"device: {s['device']!r} is not available here; use 'cpu'"
                                  + (" or 'cuda'" if torch.cuda.is_available() else ""))
    if not s["memory_limit_mib"]:
        s["memory_limit_mib"] = None
    if s["threads"] is not None and (not isinstance(s["threads"], int) or isinstance(s["threads"], bool)
                                     or s["threads"] < 1):
        raise AttentionInputError(f"threads must be a positive integer (or left out), got {s['threads']!r}")
    if not isinstance(s["noise_retries"], int) or isinstance(s["noise_retries"], bool) or s["noise_retries"] < 0:
        raise AttentionInputError(f"noise_retries must be an integer >= 0, got {s['noise_retries']!r}")
    for key in ("noise_threshold", "load_threshold"):
        if not isinstance(s[key], (int, float)) or isinstance(s[key], bool) or s[key] <= 0:
            raise AttentionInputError(f"{key} must be a positive number, got {s[key]!r}")
    for key in ("skip_ratio", "skip_min_s"):
        if s[key] is not None and (not isinstance(s[key], (int, float)) or isinstance(s[key], bool) or s[key] < 0):
            raise AttentionInputError(f"{key} must be a number >= 0 (or left out), got {s[key]!r}")
    return s


def noise_policy(settings: dict) -> dict:
    """The settings' noise keys as :func:`attnzoo.bench.efficiency.time_repeats` takes them."""
    return {"threshold": float(settings["noise_threshold"]), "retries": int(settings["noise_retries"]),
            "load_threshold": float(settings["load_threshold"])}


#: the command-line flags behind each override (for the notes of settings_from_args)
_FLAGS = {"dtypes": "--dtypes", "decode_positions": "--decode-positions"}


def _joined(values) -> str:
    return ",".join(str(v) for v in _as_list(values))


def settings_from_args(args, config: dict, config_name: Optional[str] = None) -> tuple[dict, list]:
    """``(settings, notes)`` of ``attnzoo bench efficiency`` from its parsed arguments.

    Explicit flags replace the config's values. When no config was named (neither
    ``--config`` nor ``--quick``: the default, full config) and the command line selects
    what to run (``--methods/--lengths/--patterns/--modes/--dtypes``), the selection is not
    extended by the default config: its other dtypes are not added (float32 unless
    ``--dtypes``), nor its decode positions (none unless ``--decode-positions``). A config
    the user named is taken as asked for, decode positions included. ``notes`` say, in
    words for the run's output, what was resolved and where each axis came from."""
    named = bool(getattr(args, "config", None) or getattr(args, "quick", False))
    overrides = {"methods": args.methods, "patterns": args.patterns, "lengths": args.lengths, "dtypes": args.dtypes,
                 "modes": args.modes, "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
                 "head_dim": args.head_dim, "repeats": args.repeats, "timeout": args.timeout,
                 "memory_limit_mib": args.memory_limit, "decode_positions": args.decode_positions,
                 "device": args.device, "threads": getattr(args, "threads", None)}
    if getattr(args, "error", False):
        overrides["error"] = True
    if getattr(args, "no_check", False):
        overrides["check"] = False
    if getattr(args, "tensor_memory", False):
        overrides["tensor_memory"] = True
    notes = []
    explicit = [k for k in SELECTION_KEYS if overrides.get(k) is not None]
    table = config.get("efficiency", {})
    name = config_name or config.get("name") or "default"
    if not named and explicit:
        minimal = {"dtypes": ["float32"], "decode_positions": []}
        for key, value in minimal.items():
            if overrides.get(key) is not None:
                continue
            overrides[key] = value
            theirs = _as_list(table.get(key, EFFICIENCY_DEFAULTS[key]))
            if theirs and theirs != value:
                notes.append(f"{key.replace('_', ' ')}: {_joined(value) or 'none'} (the {name} config's "
                             f"{_joined(theirs)} not added to an explicit selection; pass {_FLAGS[key]} or "
                             f"--config {name} for them)")
    settings = efficiency_settings(config, overrides)
    given = "from the command line" if explicit else f"from the {name} config"
    notes.insert(0, f"sweep ({given}): lengths {_joined(settings['lengths'])}; patterns "
                    f"{_joined(settings['patterns'])}; modes {_joined(settings['modes'])}; dtypes "
                    f"{_joined(settings['dtypes'])}; decode positions {_joined(settings['decode_positions']) or 'none'}"
                    f"; threads per case {settings['threads'] or 'torch default'}")
    return settings, notes


def skipped_pairs(settings: dict) -> list:
    """The (method, pattern) pairs of the plan that are not run because the method does
    not support the pattern: ``[{"label", "method", "pattern", "supported"}]``."""
    out = []
    for name, impl in resolve_methods(settings["methods"]):
        if name == eff.BASELINE:
            continue
        supported = list(registry.get(name).patterns)
        for pattern in settings["patterns"]:
            if pattern not in supported:
                out.append({"label": eff.label(name, impl), "method": name, "pattern": pattern,
                            "supported": supported})
    return out


def skipped_text(skipped: list) -> str:
    """``"agent: causal_self, causal_cross; aaren: noncausal_self"``, one entry per label."""
    by_label: dict = {}
    for s in skipped:
        by_label.setdefault(s["label"], []).append(s["pattern"])
    return "; ".join(f"{lab}: {', '.join(pats)}" for lab, pats in by_label.items())


def resolve_methods(methods) -> list[tuple[str, str]]:
    """``"all"`` -> SDPA-backed and tiled softmax plus every other registered method;
    otherwise the listed ``method`` / ``method:impl`` names (validated)."""
    items = _as_list(methods)
    if items == ["all"]:
        items = ["softmax:sdpa", "softmax:tiled"] + [s.name for s in registry.list_methods() if s.name != "softmax"]
    return eff.parse_methods(",".join(items))


def method_options(options: dict, method_names: list) -> dict:
    """``{"window": 256, "neighborhood.grid": [128, 128]}`` -> per-method ``(name, value)`` tuples.

    ``name`` applies to every chosen method that has the option, ``method.name`` to
    that method only; an option no chosen method takes is an error (a typo otherwise
    silently benchmarks the defaults)."""
    out: dict = {}
    for key, value in (options or {}).items():
        target, _, name = key.rpartition(".")
        value = tuple(value) if isinstance(value, list) else value
        hit = False
        for m in method_names:
            if m == eff.BASELINE or (target and m != target):
                continue
            if name in registry.get(m).options:
                out[m] = out.get(m, ()) + ((name, value),)
                hit = True
        if not hit:
            raise AttentionInputError(f"option {key!r}: no chosen method has an option {name!r}")
    return out


def efficiency_plan(settings: dict) -> tuple[list, list]:
    """``(checks, cases)``: the (method, impl, pattern, options) checks and the BenchCases."""
    methods = resolve_methods(settings["methods"])
    options = method_options(settings["options"], [m for m, _ in methods])
    common = dict(batch=settings["batch"], heads=settings["heads"], kv_heads=settings["kv_heads"],
                  head_dim=settings["head_dim"], repeats=settings["repeats"], error=settings["error"],
                  device=settings["device"], tensor_memory=settings["tensor_memory"],
                  threads=settings.get("threads"))
    cases = []
    for dtype in settings["dtypes"]:
        cases += eff.build_cases(methods, settings["lengths"], settings["modes"], settings["patterns"], dtype,
                                 options_for=lambda name: options.get(name, ()), **common)
    checks = []
    if settings["check"]:
        seen = set()
        for c in cases:
            item = check_item(c, options)
            if c.method != eff.BASELINE and item not in seen:
                seen.add(item)
                checks.append(item)
    return checks, cases


def check_item(case, options: dict) -> tuple:
    """The quick check a case needs: ``(method, impl, pattern, options)`` with only the
    options the user gave (``options``: :func:`method_options`'s dict). The check sizes
    the rest for its own small length, since options sized for the case's length (a
    vision method's ``grid`` for N = 3136) do not fit the check's tensors."""
    return case.method, case.impl, case.pattern, tuple(options.get(case.method, ()))


def check_key(method: str, impl: str, pattern: str, options: tuple) -> str:
    return "check|" + json.dumps(jsonable([method, impl, pattern, dict(options)]))


def run_checks(checks: list, results: ResultsFile, run_id: str, timeout: float,
               progress: Optional[ProgressFn] = None, isolate: bool = True, threads: Optional[int] = None) -> dict:
    """Quick checks, one worker per method (in this process without ``isolate``);
    returns ``{check item: record}`` (resumed records included)."""
    from .check import check_all, check_error

    out = {}
    by_method: dict = {}
    for item in checks:
        key = check_key(*item)
        if key in results.records:
            out[item] = results.records[key]
        else:
            by_method.setdefault(item[0], []).append(item)
    for method, items in by_method.items():
        if progress:
            progress(f"checking {method} against its reference", 0)
        status, value = (run_isolated(check_all, (items,), timeout, threads=threads) if isolate
                         else ("ok", check_all(items)))
        if status != "ok":
            value = [check_error(f"check worker {status}: {value}")] * len(items)
        for item, res in zip(items, value):
            record = {"kind": "check", "key": check_key(*item), "method": item[0], "impl": item[1],
                      "label": eff.label(item[0], item[1]), "pattern": item[2],
                      "options": jsonable(dict(item[3])), **res, "run_id": run_id}
            results.append(record)
            out[item] = record
    return out


def run_efficiency(settings: dict, checks: list, cases: list, results: ResultsFile, run_id: str,
                   isolate: bool = True, progress: Optional[ProgressFn] = None) -> list:
    """The plan's checks then its timings (see :func:`efficiency_plan`); returns the
    BenchResults measured (or failed) in this invocation.

    With ``skip_ratio`` (a budget), a series (method, pattern, mode, dtype) that at some
    length was more than ``skip_ratio`` times slower than SDPA there, and took more than
    ``skip_min_s`` per call, is not timed at longer lengths (a ratio, not a time: a loaded
    machine slows both alike). Those cases are recorded ``status="skipped"`` with the
    reason, never left out silently."""
    verdicts = run_checks(checks, results, run_id, settings["timeout"], progress, isolate, settings.get("threads"))
    settings = {**EFFICIENCY_DEFAULTS, **settings}
    user_options = method_options(settings["options"], [m for m, _ in resolve_methods(settings["methods"])])
    noise = noise_policy(settings)
    ratio, floor = settings["skip_ratio"], settings["skip_min_s"] or 0.0
    medians: dict = {}  # (label, pattern, mode, dtype) -> {N: median} timed so far (the baseline's too)
    out = []

    def over_budget(case):
        if ratio is None or case.method == eff.BASELINE:
            return None
        base = medians.get((eff.label(eff.BASELINE, "auto"), case.pattern, case.mode, case.dtype), {})
        for n, m in sorted(medians.get((case.label, case.pattern, case.mode, case.dtype), {}).items()):
            if n < case.seq_len and base.get(n) and m > floor and m / base[n] > ratio:
                return n, m, m / base[n]
        return None

    for case in cases:
        series = (case.label, case.pattern, case.mode, case.dtype)
        if case.key() in results.done:
            done = results.records.get(case.key(), {})
            if done.get("median_s"):
                medians.setdefault(series, {})[case.seq_len] = done["median_s"]
            if progress:
                progress(f"{case.label} N={case.seq_len} (done)", 1)
            continue
        verdict = verdicts.get(check_item(case, user_options))
        over = over_budget(case)
        if verdict is not None and verdict["status"] != "ok":
            result = eff.BenchResult(case, "failed_check", impl_used=verdict.get("impl_used"),
                                     error=f"quick check {verdict['status']}: {verdict.get('message')}")
        elif over:
            n, m, r = over
            result = eff.BenchResult(case, "skipped", error=f"not timed: at N={n} one call took {m:.3g} s, "
                                                            f"{r:.1f}x SDPA's, over the budget skip_ratio = {ratio:g}")
        else:
            result = eff.run_case(case, settings["timeout"], isolate, settings["memory_limit_mib"], noise)
            if result.median_s:
                medians.setdefault(series, {})[case.seq_len] = result.median_s
        results.append(result.record(run_id))
        out.append(result)
        if progress:
            progress(f"{case.label} {case.pattern} N={case.seq_len} {case.mode} {case.dtype}", 1)
    return out


# ------------------------------------------------------------------------------ decoding


def decode_plan(settings: dict) -> tuple[list, list]:
    """``(cases, skipped)``: a :class:`~attnzoo.bench.efficiency.DecodeCase` per (method
    with decoding, position), and the chosen methods that have no decoding."""
    methods = resolve_methods(settings["methods"])
    options = method_options(settings["options"], [m for m, _ in methods])
    names, skipped = [], []
    for name, _ in methods:
        if name == eff.BASELINE or name in names or name in skipped:
            continue
        (names if registry.get(name).decoding else skipped).append(name)
    cases = []
    for name in names:
        for p in settings["decode_positions"]:
            opts = {**registry.get(name).sized_options(p, module=True), **dict(options.get(name, ()))}
            cases.append(eff.DecodeCase(name, int(p), dtype=settings["dtypes"][0], batch=settings["batch"],
                                        heads=settings["heads"], kv_heads=settings["kv_heads"],
                                        head_dim=settings["head_dim"], options=tuple(opts.items()),
                                        threads=settings.get("threads")))
    return cases, skipped


def decode_key(case) -> str:
    return f"decode|{case}"


def run_decode_sweep(settings: dict, results: ResultsFile, run_id: str,
                     progress: Optional[ProgressFn] = None) -> dict:
    """Time every decode case (resumed ones read back); ``{method: [record per position]}``.
    A case that runs out of memory (``memory_limit_mib``) or time is recorded with that
    status and no timing, and stays so in the table: see
    :func:`attnzoo.bench.efficiency.decode_growth`."""
    cases, _ = decode_plan(settings)
    out: dict = {}
    for case in cases:
        key = decode_key(case)
        if key in results.done:
            rec = dict(results.records[key])
        else:
            res = eff.run_decode(case, timeout=settings["timeout"], memory_limit_mib=settings["memory_limit_mib"])
            rec = {"kind": "decode", "key": key, "method": case.method, "position": case.position,
                   **{k: v for k, v in res.items() if k != "case"}, "threads_requested": case.threads,
                   "run_id": run_id}
            results.append(rec)
        out.setdefault(case.method, []).append(rec)
        if progress:
            progress(f"decode {case.method} N={case.position}: {rec['status']}", 1)
    return out


# ------------------------------------------------------------------------------ tasks


def _train_in_worker(case, threads: int) -> dict:
    from .tasks.suite import run_task

    torch.set_num_threads(threads)
    return run_task(case)


def task_record(case, status: str, value, run_id: str) -> dict:
    record = {"kind": "task", "key": case.key(), "task": case.task, "pattern": case.pattern, "method": case.method,
              "seq_len": case.seq_len, "setting": jsonable(dict(case.setting)), "case": jsonable(asdict(case)),
              "status": status, "accuracy": None, "chance": None, "loss": None, "train_s": None,
              "steps": case.steps, "params": None, "error": None, "run_id": run_id}
    if status == "ok":
        record.update(value)
    else:
        from .tasks.suite import chance

        record["error"] = str(value)
        try:  # a failed run counts at chance in the compositional index
            record["chance"] = chance(case)
        except Exception:  # noqa: BLE001
            pass
    return record


def run_tasks(cases: list, results: ResultsFile, run_id: str, workers: int = 2, threads: int = 1,
              timeout: float = 600.0, progress: Optional[ProgressFn] = None) -> list:
    """Train every case not yet in ``results``, ``workers`` at a time; returns the records."""
    todo = []
    for case in cases:
        if case.key() in results.done:
            if progress:
                progress(f"{case.task} {case.method} (done)", 1)
        else:
            todo.append(case)
    out = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = {pool.submit(run_isolated, _train_in_worker, (case, threads), timeout): case for case in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                case = pending.pop(fut)
                status, value = fut.result()
                record = task_record(case, status, value, run_id)
                results.append(record)
                out.append(record)
                if progress:
                    acc = record["accuracy"]
                    progress(f"{case.task} {case.method}: " + (f"acc {acc:.2f}" if acc is not None else status), 1)
    return out
