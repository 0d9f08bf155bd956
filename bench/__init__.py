"""HTTP benchmarks, run on demand with `python -m bench` (never as tests)."""
