"""The benchmark says when its numbers cannot be trusted (issue 17): threads that reach
every worker and are recorded from inside it, the load around each case, noisy cases
re-measured and flagged, explicit flags never silently extended, skipped (method,
pattern) pairs listed, out-of-memory decode cases recorded as such, a banner when (and
only when) a figure is untrustworthy, and memory axes that say what was measured."""

from __future__ import annotations

import io
import json
import os

import pytest
import torch
from rich.console import Console

from attnzoo import cli
from attnzoo.bench import efficiency as eff
from attnzoo.bench import report_data, sweep
from attnzoo.bench.report import banner_items, eff_table, render_markdown, render_report
from attnzoo.bench.results import ResultsFile, load_config, read_records
from attnzoo.bench.worker import load_between, run_isolated


# ------------------------------------------------------------------------------ threads


def _thread_state():
    return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), os.environ.get("MKL_NUM_THREADS")


def test_threads_are_set_inside_the_worker_not_inherited_from_the_parent():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the parent's setting never reaches a forkserver child...
        assert run_isolated(_thread_state, (), 60, threads=1) == ("ok", (1, "1", "1"))  # ...the worker's does
        case = eff.BenchCase("softmax", "tiled", 32, "fwd", heads=1, head_dim=8, repeats=1, threads=1)
        res = eff.run_case(case, timeout=60)
        assert res.status == "ok" and res.threads == 1
        rec = res.record("r")
        assert rec["threads"] == 1 and rec["threads_requested"] == 1
        # without a setting the worker runs its own default (not the parent's 1), and the record says so
        torch.set_num_threads(1)
        free = eff.run_case(eff.BenchCase("softmax", "tiled", 32, "fwd", heads=1, head_dim=8, repeats=1), 60)
        default = run_isolated(_thread_state, (), 60)[1][0]
        assert free.threads == default and (default == 1 or free.threads != torch.get_num_threads())
        # in-process (--no-isolate) the case runs with its threads and the caller's are restored
        torch.set_num_threads(2)
        assert eff.run_case(case, isolate=False).threads == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threads_enter_the_case_key_only_when_set():
    plain = eff.BenchCase("linear", "auto", 64, "fwd")
    assert '"threads"' not in plain.key()  # results from before the field existed resume
    assert plain.key() != eff.BenchCase("linear", "auto", 64, "fwd", threads=1).key()


# ------------------------------------------------------------------------------ load and noise


def test_load_between_counts_other_processes_and_steal(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    hz = os.sysconf("SC_CLK_TCK")
    a = {"wall": 0.0, "cpu": 0.0, "stat": {"total": 0, "idle": 0, "steal": 0}, "loadavg": 1.0, "runnable": 1}
    # one second, two cores: this process used one core, another process the other
    b = {"wall": 1.0, "cpu": 1.0, "stat": {"total": 2 * hz, "idle": 0, "steal": 0}, "loadavg": 2.0, "runnable": 2}
    load = load_between(a, b, threads=1)
    assert load["others_cores"] == pytest.approx(1.0) and load["cpu_per_wall"] == pytest.approx(1.0)
    assert load["contention"] == pytest.approx(0.0)  # one thread, one free core: not loaded
    assert load_between(a, b, threads=2)["contention"] == pytest.approx(0.5)  # half its threads had no core
    # the hypervisor took one core and another process half of the other: this one got half a core
    c = {**b, "cpu": 0.5, "stat": {"total": 2 * hz, "idle": 0, "steal": hz}}
    stolen = load_between(a, c, threads=1)
    assert stolen["steal"] == pytest.approx(0.5) and stolen["others_cores"] == pytest.approx(0.5)
    assert stolen["contention"] == pytest.approx(0.5) and stolen["cpu_per_wall"] == pytest.approx(0.5)
    # a window too short for the ticks falls back to the runnable threads at both ends
    short = load_between(a, {**b, "wall": 0.001, "cpu": 0.001, "runnable": 5}, threads=1)
    assert short["others_cores"] == pytest.approx(2.0)  # (1 + 5) / 2 runnable, less this one


class _Noise:
    """A stand-in for a method on a simulated clock: each call advances ``eff.clock`` by
    the next duration of ``schedule`` (then ``default``), so noise is exact, not slept."""

    def __init__(self, schedule, default=0.002):
        self.schedule, self.default, self.calls, self.now = list(schedule), default, 0, 0.0

    def clock(self):
        return self.now

    def __call__(self, q, k, v):
        self.calls += 1
        self.now += self.schedule.pop(0) if self.schedule else self.default
        return q


def _with_runner(monkeypatch, noise):
    monkeypatch.setattr(eff, "_runner", lambda case: (noise, "simulated"))
    monkeypatch.setattr(eff, "clock", noise.clock)


def test_a_noisy_case_is_remeasured_then_flagged(monkeypatch):
    # every attempt has one slow call among three: the spread stays far above 25 %
    noise = _Noise([0.001] + [0.002, 0.002, 0.03] * 3)  # the first call is the memory call
    _with_runner(monkeypatch, noise)
    case = eff.BenchCase("softmax", "auto", 16, "fwd", heads=1, head_dim=8, repeats=3)
    res = eff.run_case(case, isolate=False, noise={"threshold": 0.25, "retries": 2})
    assert res.status == "ok" and res.attempts == 3 and noise.calls == 1 + 9
    assert res.noisy and res.spreads == pytest.approx([14.0] * 3) and res.times_s == pytest.approx([0.002, 0.002, 0.03])
    rec = res.record("r")
    assert rec["noisy"] is True and rec["attempts"] == 3 and rec["noise_threshold"] == 0.25
    assert rec["load"]["window_s"] > 0 and rec["threads"] == torch.get_num_threads()
    # no retries asked for: one attempt, still flagged
    _with_runner(monkeypatch, _Noise([0.001, 0.002, 0.002, 0.03]))
    once = eff.run_case(case, isolate=False, noise={"threshold": 0.25, "retries": 0})
    assert once.attempts == 1 and once.noisy


def test_a_case_quiet_on_its_retry_is_kept_and_not_flagged(monkeypatch):
    noise = _Noise([0.001] + [0.002, 0.002, 0.03] + [0.005, 0.0051, 0.0049], default=0.005)
    _with_runner(monkeypatch, noise)
    case = eff.BenchCase("softmax", "auto", 16, "fwd", heads=1, head_dim=8, repeats=3)
    res = eff.run_case(case, isolate=False, noise={"threshold": 0.25, "retries": 2})
    assert res.attempts == 2 and not res.noisy and res.spreads[0] > 0.25 >= res.spreads[1]
    assert res.median_s == pytest.approx(0.005) and noise.calls == 1 + 6  # the quiet attempt is kept


def test_a_case_on_a_busy_machine_is_flagged_loaded(monkeypatch):
    monkeypatch.setattr(eff, "load_between", lambda a, b, threads: {"contention": 1.0, "others_cores": 3.0})
    _with_runner(monkeypatch, _Noise([], default=0.001))
    res = eff.run_case(eff.BenchCase("softmax", "auto", 16, "fwd", heads=1, head_dim=8, repeats=2), isolate=False)
    assert res.loaded and res.record()["loaded"] is True


# ------------------------------------------------------------------------------ what runs is what was asked


def _args(*argv):
    return cli.build_parser().parse_args(["bench", "efficiency", *argv])


def _settings(*argv):
    args = _args(*argv)
    config, path = cli._load(args)
    return sweep.settings_from_args(args, config, path.stem)


def test_explicit_flags_are_not_extended_by_the_default_config():
    full = load_config("full")[0]["efficiency"]
    assert "bfloat16" in full["dtypes"] and full["decode_positions"]  # what used to be added silently
    s, notes = _settings("--lengths", "64,128", "--patterns", "causal_self", "--modes", "fwd")
    assert (s["lengths"], s["patterns"], s["modes"]) == ([64, 128], ["causal_self"], ["fwd"])
    assert s["dtypes"] == ["float32"] and s["decode_positions"] == []
    assert any("bfloat16" in n and "--dtypes" in n for n in notes)
    assert any("decode positions" in n and "--decode-positions" in n for n in notes)
    # asked for: given
    s, _ = _settings("--lengths", "64", "--dtypes", "bfloat16", "--decode-positions", "16,64")
    assert s["dtypes"] == ["bfloat16"] and s["decode_positions"] == [16, 64]
    # a config the user named is taken as asked for, its decode positions included
    s, _ = _settings("--config", "full", "--lengths", "64")
    assert s["lengths"] == [64] and s["dtypes"] == full["dtypes"] and s["decode_positions"] == full["decode_positions"]
    # nothing explicit: the default config as it is
    s, _ = _settings()
    assert s["lengths"] == full["lengths"] and s["dtypes"] == full["dtypes"]
    # --quick: explicit flags replace the quick config's values, nothing is added
    s, notes = _settings("--quick", "--lengths", "32", "--threads", "1")
    assert s["lengths"] == [32] and s["dtypes"] == ["float32"] and s["decode_positions"] == [] and s["threads"] == 1
    assert "threads per case 1" in notes[0]


def test_unsupported_pairs_are_listed_not_dropped_silently():
    s = sweep.efficiency_settings({}, {"methods": "aaren,agent,linear"})
    skipped = sweep.skipped_pairs(s)
    pairs = {(x["label"], x["pattern"]) for x in skipped}
    assert pairs == {("aaren", "noncausal_self"), ("aaren", "noncausal_cross"), ("aaren", "causal_cross"),
                     ("agent", "causal_self"), ("agent", "causal_cross")}
    _, cases = sweep.efficiency_plan(s)
    assert not {(c.label, c.pattern) for c in cases} & pairs  # the plan runs none of them...
    text = sweep.skipped_text(skipped)
    assert text.startswith("aaren: noncausal_self, noncausal_cross, causal_cross; agent:")  # ...and says so


def test_budget_skips_longer_lengths_with_a_record(tmp_path):
    s = sweep.efficiency_settings({}, {"methods": "linear", "patterns": "causal_self", "lengths": "16,32",
                                       "modes": "fwd", "heads": 1, "head_dim": 8, "repeats": 1, "check": False,
                                       "skip_ratio": 1e-9, "skip_min_s": 0})
    checks, cases = sweep.efficiency_plan(s)
    with ResultsFile(tmp_path / "e.jsonl", resume=False) as results:
        out = sweep.run_efficiency(s, checks, cases, results, "r", isolate=False)
    status = {(r.case.label, r.case.seq_len): r.status for r in out}
    assert status == {("torch_sdpa", 16): "ok", ("linear", 16): "ok", ("torch_sdpa", 32): "ok",
                      ("linear", 32): "skipped"}
    skipped = next(r for r in out if r.status == "skipped")
    assert "skip_ratio" in skipped.error and "SDPA" in skipped.error and not skipped.times_s
    s["skip_ratio"] = None  # no budget: every length is timed
    with ResultsFile(tmp_path / "f.jsonl", resume=False) as results:
        assert all(r.status == "ok" for r in sweep.run_efficiency(s, checks, cases, results, "r", isolate=False))


# ------------------------------------------------------------------------------ decoding out of memory


def test_a_decode_case_out_of_memory_is_recorded_as_such():
    case = eff.DecodeCase("softmax", 1024, heads=2, head_dim=16, steps=2)
    res = eff.run_decode(case, timeout=60, memory_limit_mib=64)  # a tiny address space: the allocation fails
    assert res["status"] == "oom" and res["median_s"] is None and "allocate" in res["error"]
    assert eff.decode_growth({"status": "ok", "median_s": 1e-3}, res) == (None, "oom")
    assert eff.decode_growth({"status": "ok", "median_s": 1e-3}, {"status": "ok", "median_s": 4e-3}) == (4.0, "ok")


def test_decode_table_and_report_show_oom_never_the_previous_value(tmp_path, monkeypatch):
    real = eff.run_decode

    def fake(case, timeout=600.0, memory_limit_mib=None):
        if case.position == 64:
            return {"case": case, "status": "oom", "error": "MemoryError", "median_s": None}
        return real(case, timeout, memory_limit_mib)

    monkeypatch.setattr(eff, "run_decode", fake)
    s = sweep.efficiency_settings({}, {"methods": "linear,agent", "decode_positions": "16,64", "heads": 1,
                                       "head_dim": 8, "dtypes": "float32"})
    out = io.StringIO()
    with ResultsFile(tmp_path / "efficiency.jsonl", resume=False) as results:
        results.append({"kind": "run", "run_id": "r", "skipped_decode": ["agent"]})
        ok = cli._bench_decode(s, sweep.resolve_methods(s["methods"]), Console(file=out, width=200), results, "r")
    text = out.getvalue()
    row = next(line for line in text.splitlines() if line.startswith("│ linear"))
    assert not ok and row.count("OOM") == 2 and "1.00x" not in row  # the N=64 cell and the ratio
    assert "skipped (no decoding): agent" in text
    recs = [r for r in read_records(tmp_path / "efficiency.jsonl") if r["kind"] == "decode"]
    assert {(r["position"], r["status"]) for r in recs} == {(16, "ok"), (64, "oom")}
    md = render_report(tmp_path)["markdown"].read_text()
    line = next(x for x in md.splitlines() if x.startswith("| linear |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "OOM" and cells[3] == "OOM"  # @64 and @64 / @16
    assert "Not run (no decoding): agent." in md


# ------------------------------------------------------------------------------ the report


def _rec(label, n, median, *, mode="fwd", pattern="causal_self", spread=0.05, **extra):
    method, _, impl = label.partition(":")
    times = [median * (1 - spread / 2), median, median * (1 + spread / 2)]
    return {"kind": "efficiency", "key": f"{label}|{pattern}|{mode}|{n}", "method": method, "impl": impl or "auto",
            "label": label, "pattern": pattern, "seq_len": n, "mode": mode, "dtype": "float32", "batch": 1,
            "heads": 2, "kv_heads": None, "head_dim": 16, "repeats": 3, "status": "ok", "times_s": times,
            "median_s": median, "spread": spread, "peak_mib": n / 100, "impl_used": "x", "threads": 1,
            "noisy": False, "loaded": False, "noise_threshold": 0.25, "run_id": "r", **extra}


def _clean():
    """SDPA quadratic, "fast" linear: crossing between 256 and 1024; fwd+bwd 3x fwd."""
    recs = []
    for n in (256, 512, 1024):
        for mode, k in (("fwd", 1.0), ("fwd+bwd", 3.0)):
            recs.append(_rec("torch_sdpa", n, k * 1e-3 * (n / 256) ** 2, mode=mode))
            recs.append(_rec("fast", n, k * 2e-3 * (n / 256), mode=mode))
    return recs


def _write(d, recs, run=None):
    d.mkdir(parents=True, exist_ok=True)
    run = run or {"kind": "run", "run_id": "r", "machine": {"threads": 1, "cpus": 2}}
    (d / "efficiency.jsonl").write_text("\n".join(json.dumps(r) for r in [run, *recs]) + "\n")
    return d


def _report(tmp_path, recs, name, run=None):
    """The report's data and Markdown (the template, without drawing the plots)."""
    d = _write(tmp_path / name, recs, run)
    data = report_data.build_report(report_data.load_results(d))
    return data, render_markdown(data)[0]


BANNER = "some figures of this report cannot be trusted"


def _find(recs, label, n, mode="fwd"):
    return next(r for r in recs if (r["label"], r["seq_len"], r["mode"]) == (label, n, mode))


def test_banner_appears_when_and_only_when_a_figure_is_untrustworthy(tmp_path):
    data, text = _report(tmp_path, _clean(), "clean")
    assert not data.trust.any and BANNER not in text and "⚠" not in text.split("**How to read")[0]

    recs = _clean()
    _find(recs, "fast", 512).update(noisy=True, spread=0.9)
    data, text = _report(tmp_path, recs, "noisy")
    assert data.trust.noisy == ["fast causal_self fwd N=512 (±90%)"]
    top = text[:text.index("| run |")]  # the banner is at the top, before everything else
    assert BANNER in top and "1 noisy case(s)" in top and "fast causal_self fwd N=512" in top

    recs = _clean()
    _find(recs, "fast", 1024).update(loaded=True, load={"others_cores": 1.5, "loadavg_before": 9.0, "cores": 2})
    data, text = _report(tmp_path, recs, "loaded")
    assert data.trust.loaded == ["fast causal_self fwd N=1024"] and "load average up to 9.0" in text

    recs = _clean()
    _find(recs, "fast", 512, "fwd+bwd")["median_s"] = _find(recs, "fast", 512)["median_s"] / 2
    data, text = _report(tmp_path, recs, "inverted")
    assert len(data.trust.inverted) == 1 and "fast causal_self N=512: fwd+bwd" in data.trust.inverted[0]
    assert BANNER in text and "fwd+bwd faster than fwd" in text

    recs = [r for r in _clean() if r["label"] == "torch_sdpa" or r["seq_len"] != 512]
    _find(recs, "fast", 1024)["median_s"] = 1e-4  # falls as N grows
    data, text = _report(tmp_path, recs, "negative")
    assert any(x.startswith("fast causal_self fwd: time exponent -") for x in data.trust.negative)

    recs = _clean()  # a record from before the flags: judged by its spread
    old = _find(recs, "fast", 256)
    for k in ("noisy", "loaded", "noise_threshold"):
        del old[k]
    old["spread"] = 28.49  # ±2849 %, as in the issue
    data, _ = _report(tmp_path, recs, "old")
    assert data.trust.noisy == ["fast causal_self fwd N=256 (±2849%)"]

    recs = _clean()
    _find(recs, "fast", 256)["threads"] = 2
    data, text = _report(tmp_path, recs, "threads")
    assert data.trust.threads == [(1, 11), (2, 1)] and "Mixed thread counts" in text
    assert len(banner_items(data.trust)) == 1


def test_a_flagged_case_is_never_highlighted_as_a_win(tmp_path):
    recs = _clean()
    _find(recs, "fast", 1024).update(noisy=True, spread=0.6)  # faster than SDPA there, but noisy
    _find(recs, "torch_sdpa", 512).update(loaded=True)  # a loaded baseline taints the ratio against it
    data, _ = _report(tmp_path, recs, "win")
    g = next(g for sec in data.efficiency.sections for g in sec.groups if g.mode == "fwd")
    rows = {r[0] if isinstance(r[0], str) else r[0][0]: r for r in eff_table(g).rows}
    ratios = rows["fast"][2 + 3: 2 + 6]  # after method, impl and three ms columns
    assert all(isinstance(c, tuple) for c in ratios)
    assert ratios[2][0].startswith("0.") and ratios[2][1] == "" and "⚠" in ratios[2][0]  # noisy win: not green
    assert "⚠" in ratios[1][0] and ratios[1][1] == ""  # against the loaded baseline
    clean = next(g for sec in _report(tmp_path, _clean(), "win2")[0].efficiency.sections for g in sec.groups
                 if g.mode == "fwd")
    crow = next(r for r in eff_table(clean).rows if r[0] == ("fast", ""))
    assert crow[7] == (crow[7][0], "good") and "⚠" not in crow[7][0]  # the same win, clean: green


def test_memory_axis_labels_say_what_was_measured(tmp_path, monkeypatch):
    from attnzoo.bench import report_plots

    labels = {}

    def spy(self, name, title, lengths, series, mem_label):  # what the figure's memory axis would say
        labels[name] = mem_label
        return b""

    monkeypatch.setattr(report_plots.Plotter, "scaling", spy)
    monkeypatch.setattr(report_plots.Plotter, "efficiency_lengths", lambda self, sec: b"")

    def plotted(recs, name):
        data, text = _report(tmp_path, recs, name)
        report_plots.draw_plots(data, tmp_path / name / "plots")
        return data, text

    recs = _clean()
    for r in recs:
        if r["mode"] == "fwd+bwd":
            r.update(peak_alloc_mib=r["seq_len"] / 50, memory_measure="tensor")
    data, text = plotted(recs, "mem")
    assert labels == {"eff-float32-fwd-causal_self.png": report_data.MEMORY_LABELS["rss"],
                      "eff-float32-fwd-bwd-causal_self.png": report_data.MEMORY_LABELS["tensor"]}
    assert "resident-set growth" in labels["eff-float32-fwd-causal_self.png"]
    assert "live tensors" in labels["eff-float32-fwd-bwd-causal_self.png"]
    assert "Memory: resident-set growth during the first call (MiB)." in text
    cuda = [dict(r, device="cuda", peak_alloc_mib=1.0, memory_measure="allocator") for r in _clean()]
    plotted(cuda, "cuda")
    assert labels["eff-cuda-float32-fwd-causal_self.png"] == report_data.MEMORY_LABELS["allocator"]
    mixed = _clean()
    _find(mixed, "fast", 256).update(peak_alloc_mib=1.0, memory_measure="tensor")
    g = next(g for sec in plotted(mixed, "mixed")[0].efficiency.sections for g in sec.groups
             if g.mode == "fwd")
    assert g.mem_measure == "mixed"
    # what the worker says it measured: the resident set unless the profiler ran
    m = eff.measure(eff.BenchCase("linear", "auto", 16, "fwd", heads=1, head_dim=8, repeats=1))
    assert m["memory_measure"] is None and m["peak_alloc_mib"] is None


def test_skipped_pairs_appear_in_the_report(tmp_path):
    run = {"kind": "run", "run_id": "r", "skipped": [{"label": "aaren", "method": "aaren", "pattern": "causal_cross",
                                                      "supported": ["causal_self"]}]}
    _, text = _report(tmp_path, _clean(), "skipped", run)
    assert "Not run (the method does not support the pattern): aaren: causal_cross (supports causal_self)." in text


# ------------------------------------------------------------------------------ a real sweep


@pytest.mark.slow
def test_a_sweep_with_threads_1_records_1_in_every_case_measured_in_the_worker(tmp_path, capsys):
    before = torch.get_num_threads()
    out = tmp_path / "o"
    try:
        code = cli.main(["bench", "efficiency", "--methods", "linear,aaren", "--patterns", "causal_self,noncausal_cross",
                         "--lengths", "16,32", "--modes", "fwd", "--heads", "1", "--head-dim", "8", "--repeats", "2",
                         "--threads", "1", "--decode-positions", "8,16", "--out", str(out)])
    finally:
        torch.set_num_threads(before)
    assert code == 0
    text = capsys.readouterr().out
    assert "skipped (the method does not support the pattern): aaren: noncausal_cross" in text
    assert "dtypes float32" in text  # the default config's bfloat16 was not added
    records = list(read_records(out / "efficiency.jsonl"))
    cases = [r for r in records if r["kind"] in ("efficiency", "decode")]
    assert cases and all(r["status"] == "ok" and r["threads"] == 1 for r in cases)
    assert {r["kind"] for r in cases} == {"efficiency", "decode"}
    assert all(isinstance(r["load"]["cpu_per_wall"], float) for r in cases)
    assert {r["dtype"] for r in cases if r["kind"] == "efficiency"} == {"float32"}
    run = next(r for r in records if r["kind"] == "run")
    assert run["settings"]["threads"] == 1 and [s["label"] for s in run["skipped"]] == ["aaren"]
