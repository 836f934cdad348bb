"""Benchmark scripts and the shared timing, results and ceiling-measurement helpers."""
