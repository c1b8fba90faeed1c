"""Benchmarks that print tables: run each as `.venv/bin/python bench/<name>.py` (see its docstring)."""
