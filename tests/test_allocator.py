"""The malloc settings import attnzoo applies (attnzoo/allocator.py)."""

import os
import subprocess
import sys

import pytest

from attnzoo import allocator

GLIBC = allocator._glibc() is not None


def _state_in_child(env: dict) -> str:
    code = "import attnzoo, json; print(json.dumps(attnzoo.allocator.STATE))"
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "ATTNZOO_TUNE_MALLOC"}
    out = subprocess.run([sys.executable, "-c", code], env={**full, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(not GLIBC, reason="the tuning applies to glibc on Linux only")
def test_import_tunes_glibc_and_respects_the_opt_outs():
    import json

    on = json.loads(_state_in_child({}))
    assert on == {"applied": True, **allocator.DEFAULTS}
    off = json.loads(_state_in_child({"ATTNZOO_TUNE_MALLOC": "0"}))
    assert off == {"applied": False, "reason": "ATTNZOO_TUNE_MALLOC=0"}
    mine = json.loads(_state_in_child({"MALLOC_TRIM_THRESHOLD_": "12345"}))
    assert mine["applied"] is False and "MALLOC_TRIM_THRESHOLD_" in mine["reason"]


def test_tune_cpu_allocator_checks_its_arguments():
    with pytest.raises(ValueError, match="mmap_threshold.*-1"):
        allocator.tune_cpu_allocator(mmap_threshold=-1)
    with pytest.raises(ValueError, match="trim_threshold.*2.5"):
        allocator.tune_cpu_allocator(trim_threshold=2.5)


def test_benchmark_runs_record_the_allocator():
    from attnzoo.bench.results import machine_info

    assert machine_info()["allocator"] == allocator.STATE
