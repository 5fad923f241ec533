"""Benchmarks run by `python -m nanojax.bench` (one module per subject)."""
