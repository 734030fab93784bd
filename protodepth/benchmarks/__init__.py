"""Benchmarks behind `scripts/benchmark.py`; each module has `main(argv) -> int`."""
