"""Benchmarks: the efficiency sweep (time and peak memory vs SDPA), run case by case in
isolated worker processes. See :mod:`attnzoo.bench.efficiency`."""

from .efficiency import BenchCase, BenchResult, parse_methods, run_sweep

__all__ = ["BenchCase", "BenchResult", "parse_methods", "run_sweep"]
