"""The benchmark report's data: the records of a results directory, and every number the
report shows, derived once.

:func:`load_results` reads the ``*.jsonl`` files (blank and malformed lines skipped, the
last record of each ``key`` kept); :func:`build_report` turns them into plain dataclasses
(:class:`ReportData`): the runs and their warnings, the correctness checks, per
(device, dtype, mode, pattern) the series of every method with its SDPA ratios, spreads,
scaling exponents and efficiency lengths (time and memory), the task accuracy table with
CAB's compositional index, and the decode rows. The Markdown and HTML
(:mod:`attnzoo.bench.report`) and the plots (:mod:`attnzoo.bench.report_plots`) only read
these structures; nothing here formats Markdown or draws.

Record kinds (field ``kind``): ``run`` (one per invocation), ``check`` (the quick
fast-vs-reference check before timing), ``efficiency`` (one timed case), ``task`` (one
trained model) and ``decode`` (one decode-step timing).

Trust (:class:`Trust`, the report's banner): the cases flagged ``noisy`` (their spread
stayed above the threshold after the re-measurements; records without the flag are judged
by their spread), ``loaded`` (other processes took the cores the case needed), a fwd+bwd
faster than its own fwd, negative time-scaling exponents, and mixed thread counts. A
flagged case's ratio is never shown as a win.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import AttentionInputError
from .efficiency import BASELINE, NOISE_DEFAULTS, efficiency_length, scaling_exponent
from .efficiency import label as series_label

MATPLOTLIB_HINT = "attnzoo report needs matplotlib: pip install 'attnzoo[bench]'"

PATTERN_ORDER = ["noncausal_self", "causal_self", "noncausal_cross", "causal_cross"]
MODE_ORDER = ["fwd", "fwd+bwd"]
DTYPE_ORDER = ["float32", "bfloat16", "float16", "float64"]
STATUS_TEXT = {"oom": "OOM", "timeout": "TIMEOUT", "error": "ERROR", "failed_check": "FAILED CHECK",
               "skipped": "NOT TIMED",
               "failed": "FAILED"}
#: statuses of a case that ran out of a resource (the other side of the comparison is the cheaper one)
OUT_OF = ("oom", "timeout")


class ReportError(AttentionInputError):
    """The results directory cannot be turned into a report (missing, empty, nothing usable)."""


class MissingDependency(ReportError, ImportError):
    """A library the report needs (``pip install 'attnzoo[bench]'``) is not installed."""


class MissingMatplotlib(MissingDependency):
    """matplotlib, needed for the report's plots, is not installed."""


# ------------------------------------------------------------------------------ loading


@dataclass
class Results:
    """The deduplicated records of a results directory."""

    directory: Path
    files: list = field(default_factory=list)
    runs: list = field(default_factory=list)
    checks: list = field(default_factory=list)
    efficiency: list = field(default_factory=list)
    tasks: list = field(default_factory=list)
    decode: list = field(default_factory=list)
    claims: list = field(default_factory=list)  # `attnzoo bench claims` rows
    skipped: list = field(default_factory=list)  # (file name, line number) of malformed lines
    duplicates: int = 0  # records replaced by a later one with the same key
    unknown: int = 0  # records of an unknown kind

    @property
    def empty(self) -> bool:
        return not (self.runs or self.checks or self.efficiency or self.tasks or self.decode or self.claims)


def load_results(results_dir) -> Results:
    """Read every ``*.jsonl`` in ``results_dir``: skip blank or malformed lines, keep the
    last record of each ``key`` (``run`` records: the last of each ``run_id``)."""
    d = Path(results_dir)
    if not d.is_dir():
        raise ReportError(f"results directory {str(d)!r} does not exist (or is not a directory)")
    files = sorted(p for p in d.glob("*.jsonl") if p.is_file())
    if not files:
        raise ReportError(f"no *.jsonl result files in {str(d)!r}; run `attnzoo bench` (or the task suite) "
                          f"with this directory as output first")
    res = Results(directory=d, files=[p.name for p in files])
    keyed: dict = {}
    runs: dict = {}
    anonymous = 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    res.skipped.append((path.name, lineno))
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("kind"), str):
                    res.skipped.append((path.name, lineno))
                    continue
                kind = rec["kind"]
                if kind == "run":
                    rid = str(rec.get("run_id"))
                    runs.pop(rid, None)
                    runs[rid] = rec
                    continue
                if kind not in ("check", "efficiency", "task", "decode", "claim"):
                    res.unknown += 1
                    continue
                key = rec.get("key")
                if key is None:
                    anonymous += 1
                    key = ("__anonymous__", anonymous)
                k = (kind, key if isinstance(key, (str, int, float, tuple)) else json.dumps(key, sort_keys=True))
                if k in keyed:
                    res.duplicates += 1
                    del keyed[k]  # keep the last record, in the position of the last
                keyed[k] = rec
    res.runs = list(runs.values())
    for (kind, _), rec in keyed.items():
        {"check": res.checks, "efficiency": res.efficiency, "task": res.tasks, "decode": res.decode,
         "claim": res.claims}[kind].append(rec)
    if res.empty:
        raise ReportError(f"no benchmark records in {str(d)!r} (read {', '.join(res.files)}; "
                          f"{len(res.skipped)} malformed line(s))")
    return res


# ------------------------------------------------------------------------------ small helpers


def ordered(values, preferred=()) -> list:
    """Unique values: the preferred ones first in that order, then the rest in order of appearance."""
    seen = list(dict.fromkeys(v for v in values if v is not None))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def status_text(status) -> str:
    """A status as the report prints it (``oom`` -> ``OOM``)."""
    return STATUS_TEXT.get(str(status), str(status).upper())


def format_efficiency_length(value: Optional[float], lengths: list) -> str:
    """How the report prints an efficiency length measured over ``lengths``: ``"> Nmax"``
    when never cheaper, ``"≤ Nmin"`` when cheaper everywhere, else the rounded length."""
    if not lengths:
        return "n/a"
    if value is None:
        return f"> {max(lengths)}"
    if value <= min(lengths):
        return f"≤ {min(lengths)}"
    return str(int(round(value)))


def file_slug(s: str) -> str:
    """A plot file name's part: ``fwd+bwd`` -> ``fwd-bwd``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "", str(s).replace("+", "-"))


def _median(rec) -> Optional[float]:
    m = rec.get("median_s")
    if m is None and rec.get("times_s"):
        m = statistics.median(rec["times_s"])
    return m


def _spread(rec) -> Optional[float]:
    s = rec.get("spread")
    t = rec.get("times_s") or []
    if s is None and len(t) > 1:
        m = statistics.median(t)
        s = (max(t) - min(t)) / m if m else None
    return s


def _ok(rec) -> bool:
    return rec.get("status") == "ok" and _median(rec) is not None


def _mem(rec) -> Optional[float]:
    """Peak memory of a case: live tensors (profiler on CPU, allocator on CUDA), else the resident-set growth."""
    v = rec.get("peak_alloc_mib")
    return v if v is not None else rec.get("peak_mib")


def _shape(rec) -> str:
    """The input shape of an efficiency case, e.g. ``B1 H8/8 D64``."""
    h = rec.get("heads")
    return f"B{rec.get('batch')} H{h}/{rec.get('kv_heads') or h} D{rec.get('head_dim')}"


# ------------------------------------------------------------------------------ the data model


@dataclass
class Tally:
    """How many records of one kind, and how many of each status."""

    total: int
    ok: int
    others: list  # [(status, count)] of the statuses other than "ok", sorted by name

    @property
    def failing(self) -> int:
        return self.total - self.ok

    @classmethod
    def of(cls, records) -> Optional["Tally"]:
        if not records:
            return None
        c = Counter(r.get("status") for r in records)
        return cls(len(records), c.get("ok", 0), sorted(((s, n) for s, n in c.items() if s != "ok"),
                                                        key=lambda x: str(x[0])))


@dataclass
class Counts:
    efficiency: Optional[Tally]
    checks: Optional[Tally]
    tasks: Optional[Tally]
    decode: Optional[Tally]
    claims: Optional[Tally] = None


@dataclass
class Run:
    run_id: str
    started: Optional[str]
    commit: Optional[str]
    command: Optional[str]
    config_file: Optional[str]
    machine: str  # "x86_64, 2 cpus, 2 threads, python 3.11, torch 2.6" ("" when unknown)


@dataclass
class Header:
    directory: Path
    files: list
    generated: str  # the local time the report was rendered
    runs: list  # [Run]
    commits: list  # the distinct git commits of the runs, in order (> 1: a warning)
    machines_differ: bool  # the runs were made on different machines or Python / torch versions
    skipped: list  # [(file, line)] malformed lines
    duplicates: int
    unknown: int
    counts: Counts


@dataclass
class Check:
    method: str
    pattern: str
    impl: Optional[str]
    status: str
    out_error: Optional[float]
    grad_error: Optional[float]
    tolerance: Optional[float]
    message: str


@dataclass
class Checks:
    total: int
    leaks: list  # [(method, pattern)] not strictly causal
    failed: list  # [Check]


@dataclass
class Case:
    """One measured length of one series."""

    n: int
    status: str
    ok: bool
    median_s: Optional[float]  # None unless ok
    spread: Optional[float]
    mem_mib: Optional[float]
    ratio: Optional[float]  # median time / the baseline's at the same N (both ok), else None
    impl_used: Optional[str]
    density: Optional[float]
    max_error: Optional[float]
    error: str
    pattern: str
    mode: str
    dtype: str
    device: str  # the record's device ("cpu", "cuda")
    flags: list = field(default_factory=list)  # why its timing cannot be trusted: "noisy", "loaded", "fwd+bwd < fwd"
    base_flags: list = field(default_factory=list)  # the same, of the baseline case its ratio divides by
    threads: Optional[int] = None  # torch threads the worker ran with (measured there)
    load: Optional[dict] = None  # the load around the case (attnzoo.bench.worker.load_between)

    @property
    def median_ms(self) -> Optional[float]:
        return self.median_s * 1e3 if self.median_s is not None else None

    @property
    def trusted(self) -> bool:
        """Neither this case nor the baseline of its ratio is flagged."""
        return not (self.flags or self.base_flags)


@dataclass
class EffLength:
    """CAB's efficiency length against the baseline: ``value`` None means never cheaper
    over ``lengths`` (the lengths where both could be compared; empty: nothing usable)."""

    value: Optional[float]
    lengths: list


@dataclass
class Series:
    """One label (method, or method:impl) in one (device, dtype, mode, pattern) group."""

    label: str
    baseline: bool
    cases: dict  # {N: Case}, in the order the records came
    impls: list  # the distinct impls used
    exp_time: Optional[float]  # log-log slope of time against N
    exp_mem: Optional[float]
    eff_time: Optional[EffLength]  # None for the baseline itself, or when the group has no baseline
    eff_mem: Optional[EffLength]
    density_at_max: Optional[float]  # the density at the longest N that has one
    max_error: Optional[float]  # the largest max_error over the lengths
    time_points: list  # [(N, ms)] of the ok cases, sorted by N
    mem_points: list  # [(N, MiB)] of the ok cases with memory > 0
    first_failure: Optional[Case]  # the shortest N that produced no timing
    all_failed: Optional[str]  # the first status when no case produced a timing, else None

    def case(self, n) -> Optional[Case]:
        return self.cases.get(n)

    @property
    def flagged(self) -> bool:
        """Some case of the series (or the baseline at its length) is flagged: its
        efficiency lengths may rest on a noise artefact."""
        return any(not c.trusted for c in self.cases.values())


#: what each memory measure is, as the plots' axes and the tables say it
MEMORY_LABELS = {
    "tensor": "peak of live tensors above the inputs (MiB, profiler)",
    "allocator": "allocator peak above the inputs (MiB, CUDA)",
    "rss": "resident-set growth during the first call (MiB)",
    "mixed": "peak memory (MiB): live tensors where profiled, else resident-set growth",
}


def memory_measure(rec) -> str:
    """What a record's memory figure (:func:`_mem`) is: ``tensor``, ``allocator`` or ``rss``."""
    if rec.get("peak_alloc_mib") is None:
        return "rss"
    m = rec.get("memory_measure")
    if m in ("tensor", "allocator"):
        return m
    return "allocator" if str(rec.get("device") or "cpu").startswith("cuda") else "tensor"


@dataclass
class Group:
    device: str
    dtype: str
    mode: str
    pattern: str
    lengths: list  # every N measured in the group, sorted
    series: list  # [Series]: the baseline first, then in the order of the records
    has_baseline: bool
    show_density: bool
    show_error: bool
    plot: str  # the file name of its time/memory plot
    mem_measure: str = "rss"  # what its memory figures are (MEMORY_LABELS), "mixed" when they differ

    def get(self, label) -> Optional[Series]:
        return next((s for s in self.series if s.label == label), None)

    @property
    def mem_label(self) -> str:
        return MEMORY_LABELS[self.mem_measure]


@dataclass
class Section:
    """One (device, dtype, mode) of the efficiency sweep."""

    device: str  # with the shape when the results hold several shapes
    dtype: str
    mode: str
    tag: str  # "float32", or "float32, cuda" when there are other devices than the CPU
    shape: dict  # batch, heads, kv_heads, head_dim, repeats (of the first record)
    groups: list  # [Group], in pattern order
    chart_labels: list  # the labels of the efficiency-length chart (baseline excluded)
    chart_patterns: list  # the patterns with a baseline, drawn in the chart
    chart: Optional[str]  # its file name, None when there is nothing to draw


@dataclass
class Summary:
    """The efficiency lengths of the first section's preferred mode, one row per label."""

    tag: str
    mode: str
    groups: list  # [Group], one per pattern
    labels: list  # every non-baseline label


@dataclass
class Failure:
    label: str
    case: Case


@dataclass
class Efficiency:
    labels: list  # every label, the baseline first (a stable plot style per label)
    summary: Optional[Summary]
    sections: list  # [Section]
    failures: list  # [Failure]
    skipped: list = field(default_factory=list)  # [(label, [pattern], [supported pattern])] not run
    budget: list = field(default_factory=list)  # ["label pattern mode N=n"] not timed: over skip_ratio


@dataclass
class Trust:
    """Why figures of the report cannot be trusted (empty lists: nothing found). Each
    item names a case or a series; ``any`` says whether the banner is shown."""

    noisy: list = field(default_factory=list)  # ["label pattern mode N=n (spread ±x%)"]
    loaded: list = field(default_factory=list)  # ["label pattern mode N=n"]
    loaded_detail: str = ""  # the load seen: other processes' cores, load average, cores
    inverted: list = field(default_factory=list)  # ["label pattern N=n: fwd+bwd a ms < fwd b ms"]
    negative: list = field(default_factory=list)  # ["label pattern mode: exponent e"]
    threads: list = field(default_factory=list)  # [(threads, case count)] when the cases differ
    noise_threshold: float = NOISE_DEFAULTS["threshold"]

    @property
    def any(self) -> bool:
        return bool(self.noisy or self.loaded or self.inverted or self.negative or self.threads)


@dataclass
class DecodeRow:
    method: str
    cases: list  # [Case or None] per position
    growth: Optional[float]  # step time at the last position / at the first (None unless both ran)
    state_mib: Optional[float]  # state size at the last position that reports one
    points: list  # [(position, ms)] of the ok cases
    first_failure: Optional[Case]
    growth_status: str = "ok"  # the status of the end that did not run ("oom", "timeout", "missing")


@dataclass
class Decode:
    positions: list
    rows: list  # [DecodeRow]
    plot: str
    skipped: list = field(default_factory=list)  # the chosen methods without decoding


@dataclass
class AccCell:
    """The accuracy of one method on one task column (or setting)."""

    value: Optional[float]  # the mean accuracy of the runs that finished
    state: str  # "none" (not run), "ok", "partial" (some runs failed), "failed"
    status: str = ""  # failed: the status as printed ("ERR", "OOM", ...)
    leak: bool = False  # the method's causal form is not strictly causal and this is a causal task


@dataclass
class TaskColumn:
    header: str
    task: str
    pattern: Optional[str]  # None: the task ran in one pattern only
    chance: Optional[float]


@dataclass
class TaskRow:
    method: str
    cells: list  # [AccCell]
    ci: Optional[float] = None


@dataclass
class SettingTable:
    task: str
    settings: list  # the column headers, "N=256, kv=4"
    rows: list  # [TaskRow]
    plot: str


@dataclass
class TaskRun:
    task: str
    pattern: str
    method: str
    setting: str
    status: str
    accuracy: Optional[float]
    chance: Optional[float]
    loss: Optional[float]
    steps: Optional[int]
    train_s: Optional[float]
    params: Optional[int]
    error: str


@dataclass
class Tasks:
    tasks: list
    patterns: dict  # {task: [pattern]}
    columns: list  # [TaskColumn]
    rows: list  # [TaskRow]
    ci: Optional[dict]  # {method: CI}, None when it could not be computed
    ci_missing: bool  # compositional_index is not available
    ci_error: Optional[tuple]  # (exception type, message) when it failed
    partial: bool  # some cell's runs partly failed
    leaky: dict  # {method: why} of the methods whose causal form is not strictly causal
    marked: bool  # some cell's accuracy is marked as leaky
    settings: list  # [SettingTable] of the tasks run with several settings
    failed: list  # [TaskRun]
    runs: list  # [TaskRun]
    plot: str


@dataclass
class ReportData:
    header: Header
    checks: Optional[Checks]
    efficiency: Optional[Efficiency]
    decode: Optional[Decode]
    tasks: Optional[Tasks]
    configs: list  # [(json text, [run id])] the distinct configs and the runs that used each
    claims: Optional[object] = None  # attnzoo.bench.claims.ClaimsSection
    trust: Optional[Trust] = None  # why some figures cannot be trusted (the banner)


# ------------------------------------------------------------------------------ building


def build_report(res: Results) -> ReportData:
    """Every number of the report, from the loaded records."""
    efficiency, decode = _efficiency(res), _decode(res)
    return ReportData(header=_header(res), checks=_checks(res), efficiency=efficiency, decode=decode,
                      tasks=_tasks(res), configs=_configs(res), claims=_claims(res),
                      trust=_trust(res, efficiency, decode))


def counts(res: Results) -> Counts:
    return Counts(Tally.of(res.efficiency), Tally.of(res.checks), Tally.of(res.tasks), Tally.of(res.decode),
                  Tally.of(res.claims))


def distinct_commits(res: Results) -> list:
    return list(dict.fromkeys(r.get("git_commit") for r in res.runs if r.get("git_commit")))


def _header(res: Results) -> Header:
    runs = []
    for r in res.runs:
        m = r.get("machine") or {}
        mach = ", ".join(filter(None, [
            str(m.get("processor") or m.get("machine") or ""),
            f"{m['cpus']} cpus" if m.get("cpus") else "",
            f"{m['threads']} threads" if m.get("threads") else "",
            f"python {m['python']}" if m.get("python") else "",
            f"torch {m['torch']}" if m.get("torch") else ""]))
        runs.append(Run(str(r.get("run_id")), r.get("started"), r.get("git_commit"), r.get("command"),
                        r.get("config_file"), mach))
    machines = list(dict.fromkeys(json.dumps({k: v for k, v in (r.get("machine") or {}).items() if k != "threads"},
                                             sort_keys=True) for r in res.runs if r.get("machine")))
    return Header(directory=res.directory, files=list(res.files),
                  generated=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip(),
                  runs=runs, commits=distinct_commits(res), machines_differ=len(machines) > 1,
                  skipped=list(res.skipped), duplicates=res.duplicates, unknown=res.unknown, counts=counts(res))


def _checks(res: Results) -> Optional[Checks]:
    if not res.checks:
        return None
    leaks = sorted({(r.get("method"), r.get("pattern")) for r in res.checks
                    if isinstance(r.get("causal_leak"), (int, float)) and r["causal_leak"] > 1e-9})
    failed = [Check(r.get("method", "?"), r.get("pattern", "?"), r.get("impl_used"), str(r.get("status")),
                    r.get("out_error"), r.get("grad_error"), r.get("tolerance"), r.get("message") or "")
              for r in res.checks if r.get("status") != "ok"]
    return Checks(len(res.checks), leaks, failed)


def _flags(rec) -> list:
    """``["noisy"]``, ``["loaded"]``, both or none: the record's own flags; a record from
    before the flags existed is noisy when its spread exceeds the default threshold."""
    if not _ok(rec):
        return []
    out = []
    if "noisy" in rec:
        noisy = bool(rec["noisy"])
    else:
        sp = _spread(rec)
        noisy = sp is not None and sp > (rec.get("noise_threshold") or NOISE_DEFAULTS["threshold"])
    if noisy:
        out.append("noisy")
    if rec.get("loaded"):
        out.append("loaded")
    return out


def _case(rec, base: Optional[dict]) -> Case:
    ok = _ok(rec)
    med = _median(rec) if ok else None
    ratio = None
    if ok and base is not None and _ok(base):
        ratio = med / _median(base)
    return Case(n=int(rec["seq_len"]), status=str(rec.get("status")), ok=ok,
                median_s=med, spread=_spread(rec) if ok else None,
                mem_mib=_mem(rec), ratio=ratio, impl_used=rec.get("impl_used"), density=rec.get("density"),
                max_error=rec.get("max_error"), error=rec.get("error") or "", pattern=rec.get("pattern", "?"),
                mode=rec.get("mode", "?"), dtype=str(rec.get("dtype", "?")), device=str(rec.get("device") or "cpu"),
                flags=_flags(rec), base_flags=_flags(base) if base is not None and ratio is not None else [],
                threads=rec.get("threads") if isinstance(rec.get("threads"), int) else None,
                load=rec.get("load") if isinstance(rec.get("load"), dict) else None)


def _efficiency_length(cells: dict, base: dict, field_: str) -> EffLength:
    """One label's efficiency length against the baseline of its group, for time or memory."""
    ns, mv, bv = [], [], []
    for n, r in sorted(cells.items()):
        b = base.get(n)
        if not b:
            continue
        if _ok(r) and b.get("status") in OUT_OF:  # only the method finished: it is the cheaper one here
            ns.append(n)
            mv.append(1.0)
            bv.append(1e9)
            continue
        if _ok(b) and r.get("status") in OUT_OF:  # only exact attention finished
            ns.append(n)
            mv.append(1e9)
            bv.append(1.0)
            continue
        if not (_ok(r) and _ok(b)):
            continue
        m_, b_ = (_median(r), _median(b)) if field_ == "time" else (_mem(r), _mem(b))
        if m_ and b_ and m_ > 0 and b_ > 0:
            ns.append(n)
            mv.append(m_)
            bv.append(b_)
    return EffLength(efficiency_length(ns, mv, bv) if ns else None, ns)


def _series(label: str, cells: dict, base: dict) -> Series:
    """``cells``: {N: record} of the label, ``base``: the baseline's of the same group."""
    is_base = label == BASELINE
    cases = {n: _case(r, base.get(n)) for n, r in cells.items()}
    by_n = [cases[n] for n in sorted(cases)]
    ok = [c for c in by_n if c.ok]
    eff_t = eff_m = None
    if base and not is_base:
        eff_t, eff_m = _efficiency_length(cells, base, "time"), _efficiency_length(cells, base, "memory")
    dens = [c.density for c in by_n if c.density is not None]
    errs = [c.max_error for c in cases.values() if c.max_error is not None]
    bad = [c for c in by_n if not c.ok]
    return Series(
        label=label, baseline=is_base, cases=cases,
        impls=list(dict.fromkeys(str(c.impl_used) for c in cases.values() if c.impl_used)),
        exp_time=scaling_exponent([c.n for c in ok], [c.median_s for c in ok]) if ok else None,
        exp_mem=scaling_exponent([c.n for c in ok], [c.mem_mib for c in ok]) if ok else None,
        eff_time=eff_t, eff_mem=eff_m, density_at_max=dens[-1] if dens else None,
        max_error=max(errs) if errs else None,
        time_points=[(c.n, c.median_ms) for c in ok],
        mem_points=[(c.n, c.mem_mib) for c in ok if (c.mem_mib or 0) > 0],
        first_failure=bad[0] if bad else None,
        all_failed=bad[0].status if bad and len(bad) == len(by_n) else None)


def _efficiency(res: Results) -> Optional[Efficiency]:
    recs = [r for r in res.efficiency if r.get("seq_len") is not None]
    if not recs:
        return None
    shapes = {_shape(r) for r in recs}

    def label(r):
        return r.get("label") or series_label(r.get("method"), r.get("impl", "auto"))

    def device(r):
        # a method is only ever compared with the baseline of the same shape: runs of several
        # shapes (a resume with other --heads, say) get a section each
        return str(r.get("device") or "cpu") + (f" {_shape(r)}" if len(shapes) > 1 else "")

    devices = ordered((device(r) for r in recs), ["cpu"])
    show_device = devices != ["cpu"]
    variants = [(dev, dt) for dev in devices
                for dt in ordered((r.get("dtype") for r in recs if device(r) == dev), DTYPE_ORDER)]
    modes = ordered((r.get("mode") for r in recs), MODE_ORDER)
    patterns = ordered((r.get("pattern") for r in recs), PATTERN_ORDER)
    labels = ordered((label(r) for r in recs), [BASELINE])
    others = [lab for lab in labels if lab != BASELINE]
    records: dict = {}  # (device, dtype, mode, pattern) -> label -> N -> record
    for r in recs:
        records.setdefault((device(r), r.get("dtype"), r.get("mode"), r.get("pattern")), {}).setdefault(
            label(r), {})[int(r["seq_len"])] = r

    def tag(dev, dt):
        return f"{dt}, {dev}" if show_device else str(dt)

    def fname(dev, dt, *parts):
        return "-".join([file_slug(dev)] * show_device + [file_slug(dt)] + [file_slug(p) for p in parts])

    groups: dict = {}
    for key, by_label in records.items():
        dev, dt, mode, pat = key
        base = by_label.get(BASELINE, {})
        order = ([BASELINE] if BASELINE in by_label else []) + [lab for lab in by_label if lab != BASELINE]
        all_recs = [r for cells in by_label.values() for r in cells.values()]
        measures = {memory_measure(r) for r in all_recs if _ok(r)}
        groups[key] = Group(
            device=dev, dtype=str(dt), mode=str(mode), pattern=str(pat),
            lengths=sorted({n for cells in by_label.values() for n in cells}),
            series=[_series(lab, by_label[lab], base) for lab in order], has_baseline=bool(base),
            show_density=any(r.get("density") is not None for r in all_recs),
            show_error=any(r.get("max_error") is not None for r in all_recs),
            plot=f"eff-{fname(dev, dt, mode, pat)}.png",
            mem_measure=measures.pop() if len(measures) == 1 else ("mixed" if measures else "rss"))
    _flag_inverted(groups)

    summary = None
    s_dev, s_dt = variants[0]
    s_modes = [m for m in modes if any(k[:3] == (s_dev, s_dt, m) for k in groups)]
    s_mode = "fwd+bwd" if "fwd+bwd" in s_modes else s_modes[0]
    s_groups = [groups[(s_dev, s_dt, s_mode, p)] for p in patterns if (s_dev, s_dt, s_mode, p) in groups]
    if others and s_groups:
        summary = Summary(tag(s_dev, s_dt), s_mode, s_groups, others)

    sections, failures, budget = [], [], []
    for dev, dt in variants:
        for mode in modes:
            mgroups = [groups[(dev, dt, mode, p)] for p in patterns if (dev, dt, mode, p) in groups]
            if not mgroups:
                continue
            first = next(iter(records[(dev, dt, mode, mgroups[0].pattern)].values()))
            shape = next(iter(first.values()))
            chart_labels = [lab for lab in others if any(g.get(lab) for g in mgroups)]
            chart_patterns = [g.pattern for g in mgroups if g.has_baseline]
            threads = sorted({r["threads"] for g in mgroups for cells in records[(dev, dt, mode, g.pattern)].values()
                              for r in cells.values() if isinstance(r.get("threads"), int)})
            sections.append(Section(
                device=dev, dtype=str(dt), mode=str(mode), tag=tag(dev, dt),
                shape={**{k: shape.get(k) for k in ("batch", "heads", "kv_heads", "head_dim", "repeats")},
                       "threads": "/".join(map(str, threads)) or None},
                groups=mgroups, chart_labels=chart_labels, chart_patterns=chart_patterns,
                chart=f"efflen-{fname(dev, dt, mode)}.png" if chart_labels and chart_patterns else None))
            for g in mgroups:
                for s in g.series:
                    failures += [Failure(s.label, s.cases[n]) for n in sorted(s.cases)
                                 if not s.cases[n].ok and s.cases[n].status != "skipped"]
                    budget += [_case_name(s.label, s.cases[n]) for n in sorted(s.cases)
                               if s.cases[n].status == "skipped"]
    return Efficiency(labels=labels, summary=summary, sections=sections, failures=failures,
                      skipped=_skipped(res, recs, label), budget=budget)


def _flag_inverted(groups: dict) -> None:
    """Flag both cases where a label's fwd+bwd is faster than its own fwd (same device,
    dtype, pattern and N): a backward is never free, so one of the two is noise."""
    for (dev, dt, mode, pat), g in groups.items():
        if mode != "fwd+bwd" or (dev, dt, "fwd", pat) not in groups:
            continue
        fwd = groups[(dev, dt, "fwd", pat)]
        for s in g.series:
            f = fwd.get(s.label)
            if f is None:
                continue
            for n, c in s.cases.items():
                fc = f.case(n)
                if c.ok and fc is not None and fc.ok and c.median_s < fc.median_s:
                    for x in (c, fc):
                        if "fwd+bwd < fwd" not in x.flags:
                            x.flags.append("fwd+bwd < fwd")
    # a flagged baseline makes every ratio against it suspect
    for g in groups.values():
        base = g.get(BASELINE)
        if base is None:
            continue
        for s in g.series:
            if s.baseline:
                continue
            for n, c in s.cases.items():
                b = base.case(n)
                if c.ratio is not None and b is not None:
                    c.base_flags = list(b.flags)


def _skipped(res: Results, recs: list, label) -> list:
    """The (label, pattern) pairs the runs did not time because the method does not support
    the pattern (the run records' ``skipped``), less any that were timed after all."""
    timed = {(label(r), r.get("pattern")) for r in recs}
    out: dict = {}
    for run in res.runs:
        for s in run.get("skipped") or []:
            if not isinstance(s, dict) or (s.get("label"), s.get("pattern")) in timed:
                continue
            entry = out.setdefault(s.get("label"), ([], list(s.get("supported") or [])))
            if s.get("pattern") not in entry[0]:
                entry[0].append(s.get("pattern"))
    return [(lab, pats, sup) for lab, (pats, sup) in out.items()]


def _case_name(label: str, c: Case) -> str:
    return f"{label} {c.pattern} {c.mode} N={c.n}"


def _trust(res: Results, eff: Optional[Efficiency], dec: Optional[Decode]) -> Trust:
    """What the banner names: every flagged case and suspicious series, from the data built."""
    t = Trust()
    thresholds = {r.get("noise_threshold") for r in res.efficiency if r.get("noise_threshold")}
    if len(thresholds) == 1:
        t.noise_threshold = thresholds.pop()
    loads = []
    seen = set()
    for sec in (eff.sections if eff else []):
        for g in sec.groups:
            for s in g.series:
                for n in sorted(s.cases):
                    c = s.cases[n]
                    if "noisy" in c.flags:
                        t.noisy.append(_case_name(s.label, c) + (f" (±{c.spread * 100:.0f}%)" if c.spread else ""))
                    if "loaded" in c.flags:
                        t.loaded.append(_case_name(s.label, c))
                        if c.load:
                            loads.append(c.load)
                    if "fwd+bwd < fwd" in c.flags and c.mode == "fwd+bwd":
                        fwd = next((h.get(s.label) for h in sec_groups(eff, g, "fwd")), None)
                        fc = fwd.case(n) if fwd else None
                        key = (s.label, c.pattern, n, c.dtype, c.device)
                        if fc is not None and key not in seen:
                            seen.add(key)
                            t.inverted.append(f"{s.label} {c.pattern} N={n}: fwd+bwd {c.median_ms:.3g} ms < "
                                              f"fwd {fc.median_ms:.3g} ms")
                if s.exp_time is not None and s.exp_time < 0:
                    t.negative.append(f"{s.label} {g.pattern} {g.mode}: time exponent {s.exp_time:.2f}")
    for row in (dec.rows if dec else []):
        for c in row.cases:
            if c is not None and "loaded" in c.flags:
                t.loaded.append(f"decode {row.method} N={c.n}")
                if c.load:
                    loads.append(c.load)
    if loads:
        others = [x["others_cores"] for x in loads if isinstance(x.get("others_cores"), (int, float))]
        avgs = [x["loadavg_before"] for x in loads if isinstance(x.get("loadavg_before"), (int, float))]
        cores = next((x["cores"] for x in loads if x.get("cores")), None)
        parts = []
        if others:
            parts.append(f"other processes kept {statistics.fmean(others):.1f} cores busy on average")
        if avgs:
            parts.append(f"load average up to {max(avgs):.1f}")
        if cores:
            parts.append(f"on {cores} cores")
        t.loaded_detail = ", ".join(parts)
    threads = Counter(r["threads"] for r in res.efficiency if isinstance(r.get("threads"), int))
    if len(threads) > 1:
        t.threads = sorted(threads.items())
    return t


def sec_groups(eff: Efficiency, g: Group, mode: str) -> list:
    """The groups of ``eff`` with ``g``'s device, dtype and pattern in ``mode``."""
    return [h for sec in eff.sections for h in sec.groups
            if (h.device, h.dtype, h.pattern, h.mode) == (g.device, g.dtype, g.pattern, mode)]


def _decode(res: Results) -> Optional[Decode]:
    recs = [r for r in res.decode if r.get("method") and r.get("position") is not None]
    if not recs:
        return None
    methods = ordered(r["method"] for r in recs)
    positions = sorted({int(r["position"]) for r in recs})
    cells = {(r["method"], int(r["position"])): r for r in recs}
    rows = []
    for m in methods:
        cases = []
        for p in positions:
            r = cells.get((m, p))
            # a decode step's times are single tokens: judged by the load around them, not by their spread
            cases.append(None if r is None else _case({**r, "seq_len": p, "noisy": False,
                                                       "loaded": _decode_loaded(r)}, None))
        pts = [(c.n, c.median_ms) for c in cases if c is not None and c.ok]
        sb = [cells[(m, p)].get("state_bytes") for p in positions
              if (m, p) in cells and cells[(m, p)].get("state_bytes") is not None]
        bad = [c for c in cases if c is not None and not c.ok]
        # the growth only between the first and the last position, both measured: a last
        # position that ran out of memory is shown as such, never as an earlier one's value
        first, last = cases[0], cases[-1]
        if len(cases) > 1 and first is not None and last is not None and first.ok and last.ok and first.median_s:
            growth, why = last.median_s / first.median_s, "ok"
        else:
            growth = None
            end = next((c for c in (last, first) if c is None or not c.ok), None)
            why = "missing" if end is None else end.status
        rows.append(DecodeRow(m, cases, growth, sb[-1] / 2**20 if sb else None, pts, bad[0] if bad else None,
                              growth_status=why if len(cases) > 1 else "ok"))
    skipped = ordered(m for run in res.runs for m in (run.get("skipped_decode") or []) if m not in methods)
    return Decode(positions, rows, "decode.png", skipped)


def _decode_loaded(rec) -> bool:
    load = rec.get("load")
    c = load.get("contention") if isinstance(load, dict) else None
    return isinstance(c, (int, float)) and c > NOISE_DEFAULTS["load_threshold"]


def setting_text(rec) -> str:
    s = rec.get("setting") or {}
    short = {"num_kv_pairs": "kv"}
    return ", ".join([f"N={rec.get('seq_len')}"] + [f"{short.get(k, k)}={v}" for k, v in sorted(s.items())])


def _setting_key(rec):
    s = rec.get("setting") or {}
    return (rec.get("seq_len") or 0, tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in s.items())))


def _acc_cell(recs: list) -> AccCell:
    if not recs:
        return AccCell(None, "none")
    ok = [r for r in recs if r.get("status") == "ok" and r.get("accuracy") is not None]
    failed = [r for r in recs if r.get("status") != "ok"]
    if not ok:
        st = status_text(failed[0].get("status")) if failed else "—"
        return AccCell(None, "failed", "ERR" if st == "ERROR" else st)
    return AccCell(statistics.fmean(r["accuracy"] for r in ok), "partial" if failed else "ok")


def _leaky_methods(methods) -> dict:
    """``{method: why}`` for registered methods whose causal forms are not strictly causal."""
    from .. import registry

    out = {}
    for m in methods:
        try:
            why = registry.get(m).causal_leak
        except Exception:  # noqa: BLE001 - a method from another version of attnzoo: no mark
            continue
        if why:
            out[m] = why
    return out


def _task_run(r) -> TaskRun:
    return TaskRun(r["task"], str(r.get("pattern")), r["method"], setting_text(r), str(r.get("status")),
                   r.get("accuracy"), r.get("chance"), r.get("loss"), r.get("steps"), r.get("train_s"),
                   r.get("params") if isinstance(r.get("params"), int) else None, r.get("error") or "")


def _tasks(res: Results) -> Optional[Tasks]:
    recs = [r for r in res.tasks if r.get("task") and r.get("method")]
    if not recs:
        return None
    tasks = ordered(r["task"] for r in recs)
    methods = ordered(r["method"] for r in recs)
    pats = {t: ordered(r.get("pattern") for r in recs if r["task"] == t) for t in tasks}

    def select(t, p, m=None):
        return [r for r in recs if r["task"] == t and (p is None or r.get("pattern") == p)
                and (m is None or r["method"] == m)]

    def chance(t, p):
        cs = [r["chance"] for r in select(t, p) if r.get("chance") is not None]
        return statistics.fmean(cs) if cs else None

    # one column per task, or per (task, pattern) when a task was run in several patterns
    columns = []
    for t in tasks:
        suffix = " (avg)" if len({_setting_key(r) for r in recs if r["task"] == t}) > 1 else ""
        if len(pats[t]) > 1:
            columns += [TaskColumn(f"{t} {p}{suffix}", t, p, chance(t, p)) for p in pats[t]]
        else:
            columns.append(TaskColumn(f"{t}{suffix}", t, None, chance(t, None)))

    ci, ci_missing, ci_error = None, False, None
    try:
        from .tasks.suite import compositional_index  # optional here

        ci = {str(k): v for k, v in (compositional_index([dict(r) for r in recs]) or {}).items()}
    except ImportError:
        ci_missing = True
    except Exception as e:  # noqa: BLE001 - a report must not fail on the CI
        ci_error = (type(e).__name__, str(e))
    leaky = _leaky_methods(methods)
    rows, marked = [], set()
    for m in methods:
        cells = []
        for col in columns:
            cell = _acc_cell(select(col.task, col.pattern, m))
            if m in leaky and str(col.pattern or pats[col.task][0]).startswith("causal") and cell.value is not None:
                cell.leak = True
                marked.add(m)
            cells.append(cell)
        v = ci.get(m) if ci is not None else None
        rows.append(TaskRow(m, cells, v if isinstance(v, (int, float)) and math.isfinite(v) else None))

    settings = []
    for t in tasks:
        trecs = [r for r in recs if r["task"] == t]
        keys = sorted({_setting_key(r) for r in trecs})
        if len(keys) < 2:
            continue
        text = {_setting_key(r): setting_text(r) for r in trecs}
        srows = [TaskRow(m, [_acc_cell([r for r in trecs if r["method"] == m and _setting_key(r) == k])
                             for k in keys]) for m in ordered(r["method"] for r in trecs)]
        settings.append(SettingTable(t, [text[k] for k in keys], srows, f"tasks-{file_slug(t)}.png"))

    return Tasks(tasks=tasks, patterns=pats, columns=columns, rows=rows, ci=ci, ci_missing=ci_missing,
                 ci_error=ci_error, partial=any(c.state == "partial" for row in rows for c in row.cells),
                 leaky={m: leaky[m] for m in methods if m in leaky}, marked=bool(marked), settings=settings,
                 failed=[_task_run(r) for r in recs if r.get("status") != "ok"],
                 runs=[_task_run(r) for r in recs], plot="tasks-accuracy.png")


def _configs(res: Results) -> list:
    configs: dict = {}  # the distinct configs, with the runs that used each
    for r in res.runs:
        if r.get("config"):
            configs.setdefault(json.dumps(r["config"], indent=2, default=str), []).append(str(r.get("run_id")))
    return list(configs.items())


def _claims(res: Results):
    if not res.claims:
        return None
    from .claims import claims_report

    return claims_report(res.claims)
