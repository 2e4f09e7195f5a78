"""Benchmarks of the real app: `python -m bench.training`, `bench.service` and `bench.datasets` (`make bench`).

Nothing here is part of the app or its tests: the app and the tests import nothing from bench/, and
bench/ imports nothing from tests/. docs/performance.md says what the numbers mean.
"""
