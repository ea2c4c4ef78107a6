"""The benchmark suite's machinery: configs, results files, resume after a kill, the
quick correctness check, and the efficiency sweep's records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnzoo import cli, registry
from attnzoo.bench import sweep
from attnzoo.bench.check import quick_check
from attnzoo.bench.results import ResultsFile, load_config, read_records
from attnzoo.bench.tasks.suite import build_task_cases
from attnzoo.errors import AttentionInputError
from attnzoo.registry import Impl

ROOT = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny"
[efficiency]
methods = ["softmax:tiled", "sigmoid", "linear"]
patterns = ["causal_self", "noncausal_cross"]
lengths = [32, 48, 64]
dtypes = ["float32"]
modes = ["fwd"]
heads = 2
head_dim = 16
repeats = {repeats}
timeout = 60
"""


def _tiny_config(tmp_path, repeats=1) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(repeats=repeats))
    return path


def test_shipped_configs_parse_and_cover_every_method():
    """full.toml times and trains every method in every pattern it supports; quick.toml
    (under 5 minutes) times and trains every method in one self pattern at least."""
    methods = [s.name for s in registry.list_methods()]
    for name in ("quick", "full"):
        config, path = load_config(name)
        assert path.parent.name == "benchmarks"
        settings = sweep.efficiency_settings(config)
        checks, cases = sweep.efficiency_plan(settings)
        assert "tasks" in config, f"{name}.toml has no [tasks] table"
        tasks = build_task_cases(config["tasks"], methods)
        for spec in registry.list_methods():
            timed = {c.pattern for c in cases if c.method == spec.name}
            trained = {c.pattern for c in tasks if c.method == spec.name}
            if name == "full":
                assert timed == set(spec.patterns), spec.name
            else:
                assert timed == set(spec.patterns) & {"noncausal_self", "causal_self"}, spec.name
                assert trained, f"quick.toml trains {spec.name} on no task"
        if name == "full":
            assert set(settings["patterns"]) == set(registry.PATTERNS)
            assert {c.pattern for c in cases} == set(registry.PATTERNS)
            assert {c.pattern for c in tasks} == set(registry.PATTERNS)
    zoology = build_task_cases(load_config("mqar-zoology")[0]["tasks"], ["softmax"])
    assert {c.vocab_size for c in zoology} == {8192} and max(c.seq_len for c in zoology) == 512


def test_config_errors_name_the_key():
    with pytest.raises(AttentionInputError, match="unknown keys.*lenghts"):
        sweep.efficiency_settings({"efficiency": {"lenghts": [1]}})
    with pytest.raises(AttentionInputError, match="dtypes.*float8"):
        sweep.efficiency_settings({}, {"dtypes": "float8"})
    with pytest.raises(AttentionInputError, match="no chosen method has an option 'windw'"):
        sweep.efficiency_plan(sweep.efficiency_settings({}, {"methods": "sliding_window", "options": {"windw": 3}}))
    with pytest.raises(AttentionInputError, match="not found"):
        load_config("no-such-config")


def test_options_apply_to_the_methods_that_have_them():
    opts = sweep.method_options({"window": 32, "neighborhood.grid": [8, 8]},
                                ["torch_sdpa", "sliding_window", "neighborhood"])
    assert opts == {"sliding_window": (("window", 32),), "neighborhood": (("grid", (8, 8)),)}
    assert cli.parse_options(["window=32", "neighborhood.grid=(8, 8)", "name=abc"]) == {
        "window": 32, "neighborhood.grid": (8, 8), "name": "abc"}


def test_results_file_cuts_a_partial_line_and_resumes(tmp_path):
    path = tmp_path / "x.jsonl"
    with ResultsFile(path, resume=False) as f:
        f.append({"kind": "run", "run_id": "a"})
        f.append({"kind": "efficiency", "key": "k1", "status": "ok"})
        f.append({"kind": "efficiency", "key": "k3", "status": "timeout"})
    with open(path, "a") as raw:  # a write cut off by a kill
        raw.write('{"kind": "efficiency", "key": "k2", "st')
    assert [r.get("key") for r in read_records(path)] == [None, "k1", "k3"]
    with ResultsFile(path, resume=True) as f:
        assert f.done == {"k1"}  # a timed-out case is run again
        f.append({"kind": "efficiency", "key": "k2", "status": "ok"})
    lines = path.read_text().splitlines()
    assert [json.loads(line).get("key") for line in lines] == [None, "k1", "k3", "k2"]  # every line is JSON again
    with ResultsFile(path, resume=False) as f:  # a fresh run moves the old file aside
        assert f.done == set()
    assert path.stat().st_size == 0 and (tmp_path / "x.jsonl.prev").exists()


@pytest.mark.slow
def test_efficiency_sweep_records_checks_cases_and_run(tmp_path, capsys):
    config = _tiny_config(tmp_path)
    code = cli.main(["bench", "efficiency", "--config", str(config), "--out", str(tmp_path / "out")])
    assert code == 0
    records = list(read_records(tmp_path / "out" / "efficiency.jsonl"))
    runs = [r for r in records if r["kind"] == "run"]
    assert len(runs) == 1 and runs[0]["config"]["name"] == "tiny" and runs[0]["config_file"] == str(config)
    assert runs[0]["machine"]["torch"] == torch.__version__ and "git_commit" in runs[0]
    checks = [r for r in records if r["kind"] == "check"]
    # 3 methods x 2 patterns; linear lacks nothing here
    assert len(checks) == 6 and all(c["status"] == "ok" for c in checks)
    cases = [r for r in records if r["kind"] == "efficiency"]
    assert len(cases) == 4 * 2 * 3  # (baseline + 3 methods) x 2 patterns x 3 lengths
    assert all(c["status"] == "ok" and c["median_s"] > 0 and c["run_id"] == runs[0]["run_id"] for c in cases)
    assert len({c["key"] for c in cases}) == len(cases)
    assert "ratio" in capsys.readouterr().out


@pytest.mark.slow
def test_a_method_failing_its_check_is_reported_not_timed(tmp_path, monkeypatch):
    spec = registry.get("sigmoid")
    good = spec.impls[0]

    def wrong(q, k, v, call):
        return good.fn(q, k, v, call) * 1.01  # fast and 1% off

    monkeypatch.setattr(spec, "impls", [Impl(good.name, wrong, supports=good.supports, options=good.options,
                                             description=good.description)])
    verdict = quick_check("sigmoid", "auto", "causal_self")
    assert verdict["status"] == "failed" and "out" in verdict["message"]
    assert quick_check("linear", "auto", "causal_self")["status"] == "ok"
    code = cli.main(["bench", "efficiency", "--config", str(_tiny_config(tmp_path)), "--out", str(tmp_path / "o"),
                     "--no-isolate", "--methods", "sigmoid,linear", "--strict"])
    assert code == 1
    records = list(read_records(tmp_path / "o" / "efficiency.jsonl"))
    sig = [r for r in records if r["kind"] == "efficiency" and r["method"] == "sigmoid"]
    assert sig and all(r["status"] == "failed_check" and not r["times_s"] for r in sig)
    lin = [r for r in records if r["kind"] == "efficiency" and r["method"] == "linear"]
    assert lin and all(r["status"] == "ok" for r in lin)


@pytest.mark.slow
def test_resume_after_a_kill_loses_nothing_and_duplicates_nothing(tmp_path):
    """Kill a sweep mid-run (SIGKILL, the whole process group), leave a torn last line,
    resume: every planned case is there exactly once."""
    config = _tiny_config(tmp_path, repeats=40)
    out = tmp_path / "out"
    results = out / "efficiency.jsonl"
    cmd = [sys.executable, "-m", "attnzoo", "bench", "efficiency", "--config", str(config), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    deadline = time.time() + 120
    done_before_kill = 0
    while time.time() < deadline and proc.poll() is None:
        if results.exists():
            done_before_kill = sum('"kind": "efficiency"' in line for line in results.read_text().splitlines())
            if done_before_kill >= 3:
                break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    total = 4 * 2 * 3
    assert 3 <= done_before_kill < total, "the sweep should have been killed mid-run"
    with open(results, "a") as f:
        f.write('{"kind": "efficiency", "key": "torn')  # as if the kill hit a write
    subprocess.run(cmd + ["--resume"], cwd=ROOT, check=True, capture_output=True, env=env)
    records = list(read_records(results))
    cases = [r for r in records if r["kind"] == "efficiency"]
    keys = [r["key"] for r in cases]
    assert len(keys) == len(set(keys)) == total
    assert all(r["status"] == "ok" for r in cases)
    assert len([r for r in records if r["kind"] == "run"]) == 2
    assert all(line.startswith("{") and line.endswith("}") for line in results.read_text().splitlines())
    _, planned = sweep.efficiency_plan(sweep.efficiency_settings(load_config(str(config))[0]))
    assert set(keys) == {c.key() for c in planned}


def test_grid_methods_are_checked_at_the_checks_own_length(tmp_path):
    """A vision method's options sized for the case (grid=(16, 16) at N = 256) must not
    reach the quick check, whose tensors are much shorter: the check sizes its own."""
    s = sweep.efficiency_settings({}, {"methods": "window,halo", "patterns": "noncausal_self", "lengths": "256", "dtypes": "float32",
                                       "modes": "fwd", "heads": 2, "head_dim": 8, "repeats": 1})
    checks, cases = sweep.efficiency_plan(s)
    assert [dict(c.options)["grid"] for c in cases if c.method == "window"] == [(16, 16)]
    assert all(not item[3] for item in checks)  # no sized option in a check item
    with ResultsFile(tmp_path / "e.jsonl", resume=False) as results:
        out = sweep.run_efficiency(s, checks, cases, results, "r", isolate=False)
    assert {r.case.method: r.status for r in out} == {"torch_sdpa": "ok", "window": "ok", "halo": "ok"}
    checked = [r for r in read_records(tmp_path / "e.jsonl") if r.get("kind") == "check"]
    assert {r["method"] for r in checked} == {"window", "halo"} and all(r["status"] == "ok" for r in checked)
