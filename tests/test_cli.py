"""The `attnzoo` command, the README table, and the first benchmark."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnzoo as az
from attnzoo import cli
from attnzoo.bench import efficiency as eff
from attnzoo.bench.worker import run_isolated

ROOT = Path(__file__).resolve().parents[1]


def test_list_markdown_and_rich(capsys):
    assert cli.main(["list", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out == cli.methods_markdown()
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for spec in az.list_methods():
        assert spec.name in out


def test_python_dash_m_is_the_same_command():
    res = subprocess.run([sys.executable, "-m", "attnzoo", "list", "--markdown"], capture_output=True, text=True,
                         check=True)
    assert res.stdout == cli.methods_markdown()


@pytest.mark.slow
def test_bench_runs_and_writes_records(tmp_path, capsys):
    out = tmp_path / "r"
    code = cli.main(["bench", "efficiency", "--config", "quick", "--methods", "softmax:tiled,sigmoid", "--lengths", "32,64", "--heads", "2",
                     "--head-dim", "16", "--repeats", "1", "--patterns", "causal_self,noncausal_cross",
                     "--dtypes", "float32", "--modes", "fwd,fwd+bwd", "--out", str(out)])
    assert code == 0
    records = [json.loads(line) for line in (out / "efficiency.jsonl").read_text().splitlines()]
    records = [r for r in records if r["kind"] == "efficiency"]
    # baseline + 2 methods, 2 lengths, 2 modes, 2 patterns
    assert len(records) == 3 * 2 * 2 * 2
    assert all(r["status"] == "ok" and r["median_s"] > 0 and r["peak_mib"] is not None for r in records)
    assert {r["label"] for r in records} == {"torch_sdpa", "softmax:tiled", "sigmoid"}
    text = capsys.readouterr().out
    assert "ratio" in text and "torch_sdpa" in text


def test_bench_rejects_bad_arguments(tmp_path):
    assert cli.main(["bench", "efficiency", "--config", "quick", "--methods", "sofmax", "--out", str(tmp_path)]) == 2
    with pytest.raises(az.AttentionInputError, match="no impl"):
        eff.parse_methods("softmax:nope")


def _boom():
    raise RuntimeError("case failed on purpose")


def _sleep():
    import time

    time.sleep(30)


def _allocate():
    return torch.ones(512, 1024, 1024).sum().item()  # 2 GiB


def test_worker_records_errors_timeouts_and_memory_limits():
    assert run_isolated(_boom, (), timeout=60)[0] == "error"
    assert "on purpose" in run_isolated(_boom, (), timeout=60)[1]
    assert run_isolated(_sleep, (), timeout=1)[0] == "timeout"
    status, _ = run_isolated(_allocate, (), timeout=60, memory_limit_mib=1024)
    assert status in ("oom", "error")
    assert run_isolated(eff.measure, (eff.BenchCase("softmax", "tiled", 64, "fwd", heads=1, head_dim=8, repeats=1),),
                        timeout=60)[0] == "ok"


def test_peak_memory_grows_with_quadratic_reference():
    """The worker's peak-RSS figure sees a quadratic reference's N×N scores."""
    small = eff.run_case(eff.BenchCase("softmax", "reference", 512, "fwd", heads=4, head_dim=16, repeats=1))
    big = eff.run_case(eff.BenchCase("softmax", "reference", 2048, "fwd", heads=4, head_dim=16, repeats=1))
    assert small.status == big.status == "ok"
    assert big.peak_mib > 4 * 2048 * 2048 * 4 / 2**20 * 0.9  # at least one (H, N, N) float32 score matrix
    assert big.peak_mib > 4 * small.peak_mib


@pytest.mark.slow
def test_tensor_memory_sees_the_scores_of_a_quadratic_reference():
    """The profiled live-tensor peak: the reference's (H, N, N) scores, not process noise."""
    scores_mib = 2 * 1024 * 1024 * 4 / 2**20  # H=2, N=1024, float32
    ref = eff.run_case(eff.BenchCase("softmax", "reference", 1024, "fwd", heads=2, head_dim=16, repeats=1,
                                     tensor_memory=True))
    lin = eff.run_case(eff.BenchCase("linear", "auto", 1024, "fwd", heads=2, head_dim=16, repeats=1,
                                     tensor_memory=True))
    assert ref.status == lin.status == "ok"
    assert scores_mib <= ref.peak_alloc_mib < 6 * scores_mib
    assert lin.peak_alloc_mib < scores_mib / 2


def test_scaling_exponent_on_synthetic_timings():
    ns = [1024, 2048, 4096, 8192]
    assert eff.scaling_exponent(ns, [n**2 * 1e-9 for n in ns]) == pytest.approx(2.0)
    assert eff.scaling_exponent(ns, [n * 3e-6 for n in ns]) == pytest.approx(1.0)
    assert eff.scaling_exponent([1024], [1.0]) is None


@pytest.mark.slow
def test_bench_decode_positions(tmp_path, capsys):
    out = tmp_path / "d"
    code = cli.main(["bench", "efficiency", "--config", "quick", "--methods", "linear,aaren,softmax", "--lengths", "32", "--modes", "fwd",
                     "--patterns", "causal_self", "--dtypes", "float32", "--heads", "2", "--head-dim", "16",
                     "--repeats", "1", "--decode-positions", "16,64", "--out", str(out)])
    assert code == 0
    records = [json.loads(line) for line in (out / "efficiency.jsonl").read_text().splitlines()]
    decode = [r for r in records if r.get("kind") == "decode"]
    assert {(r["method"], r["position"]) for r in decode} == {(m, p) for m in ("linear", "aaren", "softmax")
                                                            for p in (16, 64)}
    assert all(r["status"] == "ok" and r["median_s"] > 0 for r in decode)
    state = {(r["method"], r["position"]): r["state_bytes"] for r in decode}
    assert state[("linear", 16)] == state[("linear", 64)]  # constant-size state
    assert state[("softmax", 64)] > state[("softmax", 16)]  # a KV cache grows
    assert "decoding" in capsys.readouterr().out


def test_bench_options_reach_the_method():
    case = eff.BenchCase("sliding_window", "auto", 64, "fwd", heads=1, head_dim=8, repeats=1, options=(("window", 8),))
    assert eff.run_case(case, isolate=False).status == "ok"
    # a learnable method's constructor options (routing's cluster count) build its module
    case = eff.BenchCase("routing", "auto", 64, "fwd", heads=1, head_dim=8, repeats=1, options=(("num_clusters", 2),))
    result = eff.run_case(case, isolate=False)
    assert result.status == "ok", result.error


def test_stats_collect_only_inside_the_block():
    from attnzoo import stats

    stats.report("density", 0.5)  # nobody collecting: dropped
    assert not stats.active()
    with stats.collect() as outer:
        stats.report("density", 0.25)
        with stats.collect() as inner:
            assert stats.active()
            stats.report("density", 0.75)
    assert outer == {"density": [0.25, 0.75]} and inner == {"density": [0.75]}
    assert not stats.active()


def test_bench_reports_error_against_softmax():
    case = eff.BenchCase("softmax", "tiled", 64, "fwd", heads=2, head_dim=8, repeats=1, error=True)
    exact = eff.run_case(case, isolate=False)
    assert exact.status == "ok" and exact.max_error < 1e-5
    approx = eff.run_case(eff.BenchCase("linear", "auto", 64, "fwd", heads=2, head_dim=8, repeats=1, error=True),
                          isolate=False)
    assert approx.max_error > 1e-3  # linear attention is not softmax


def test_readme_quick_start_runs():
    text = (ROOT / "README.md").read_text()
    start = text.index("```python") + len("```python")
    code = text[start:text.index("```", start)]
    namespace: dict = {}
    exec(compile(code, "README.md quick start", "exec"), namespace)
    y, y_t = namespace["y"], namespace["y_t"]
    torch.testing.assert_close(torch.cat(y_t, dim=1), y, atol=1e-4, rtol=1e-4)  # decoding equals the forward
