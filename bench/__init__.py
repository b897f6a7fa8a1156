"""fastconv throughput benchmarks: `pytest bench --benchmark` (see conftest.py and docs/benchmarks.md)."""
