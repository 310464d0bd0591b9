"""Benchmarks of the sidecar beside a direct call and nginx: ``python bench/run.py``."""
