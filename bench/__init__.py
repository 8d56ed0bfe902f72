"""Benchmarks, run with `./dev bench` (python -m bench)."""
