"""Benchmarks: the efficiency sweep (time and peak memory vs SDPA, each case in its own
worker process), the quality tasks, and the report. See :mod:`attnzoo.bench.sweep`."""

from .efficiency import BenchCase, BenchResult, parse_methods
from .sweep import efficiency_plan, efficiency_settings, run_efficiency, run_tasks

__all__ = ["BenchCase", "BenchResult", "efficiency_plan", "efficiency_settings", "parse_methods", "run_efficiency",
           "run_tasks"]
