"""Benchmarks: `python -m jrecipe.bench` (framework.py, runners.py) and stand-alone scripts."""
