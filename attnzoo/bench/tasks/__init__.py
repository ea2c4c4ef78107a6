"""Synthetic quality tasks for the benchmark (the CAB / Zoology comparisons)."""

from .mqar import mqar

__all__ = ["mqar"]
