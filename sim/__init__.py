"""The noisy-neighbour simulator: a shared provider account starved by a flooding job, replayed
on the real stack.

A fake provider (`provider.py`) with its own per-minute token and request buckets, an
interactive chat feature and a flooding batch feature (`traffic.py`) calling it through the
real `openai` package wrapped by the SDK, once against a pool without limits and once against
the same pool with the provider's limits and protected headroom (`run.py`), then a table and a
chart (`report.py`, `chart.py`). `python -m sim` (`__main__.py`, `command.py`) runs it.

A tool beside the server: it needs the SDK (`pip install ./sdk`) and matplotlib, which the
server itself never imports; the `sim` extra installs it with matplotlib.
"""
