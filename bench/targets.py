"""The targets the reservation API is held to, checked against one run's measurements."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.report import Check, Row

if TYPE_CHECKING:
    from bench.harness import Runs

P99_AT_HALF_PEAK_MS = 5.0
OCCASIONAL = 0.05  # other commands per request below this are not on every request


def targets(runs: Runs) -> list[Check]:
    reserve = runs.first_reserve()
    if reserve is None or runs.bare is None or runs.ratelimited is None:
        return []
    checks = [
        _ratio_check("reserve >= 0.8x the bare view", reserve, runs.bare, 0.8),
        _ratio_check("reserve >= 1.0x the django-ratelimit view", reserve, runs.ratelimited, 1.0),
        _one_call("exactly one Redis call per reserve", reserve),
    ]
    if runs.pairs is not None:
        checks.append(_one_call("exactly one Redis call per reserve and per commit", runs.pairs))
    half = runs.half_peak.get("reserve")
    if half is not None:
        checks.append(
            Check(
                f"reserve p99 <= {P99_AT_HALF_PEAK_MS:g} ms at half of peak",
                f"{half.result.p99_ms:.2f} ms at {half.result.rps:,.0f} req/s",
                half.result.p99_ms <= P99_AT_HALF_PEAK_MS,
            )
        )
    checks.extend(_size_checks(runs))
    return checks


def _ratio_check(claim: str, row: Row, base: Row, at_least: float) -> Check:
    ratio = row.result.rps / base.result.rps if base.result.rps else 0.0
    return Check(
        claim, f"{_ratio_text(ratio, at_least)}; {_cpu_words(row, base)}", ratio >= at_least
    )


def _ratio_text(ratio: float, at_least: float) -> str:
    """Two decimals, or three where two would round a miss up to the target (1.096x)."""
    text = f"{ratio:.2f}x"
    return f"{ratio:.3f}x" if ratio < at_least <= float(text[:-1]) else text


def _cpu(row: Row) -> float:
    """CPU per request of the app and Redis together, in ms: unlike req/s, it hardly moves
    when other work shares the machine."""
    return sum(row.cpu_ms)


def _cpu_words(row: Row, base: Row) -> str:
    if not _cpu(base):
        return "no CPU figures"
    return f"CPU per request {_cpu(row):.2f} ms, {_cpu(row) / _cpu(base):.2f}x its {_cpu(base):.2f}"


def _one_call(claim: str, row: Row) -> Check:
    """One EVALSHA per request, and nothing else per request: a command seen once in the
    sample (a new connection's HELLO, a periodic config-version GET) is not per request."""
    calls = row.calls_per_request() or 0.0
    evalsha = row.trips.get("evalsha", 0.0)
    others = {n: v for n, v in row.trips.items() if n != "evalsha"}
    words = ", ".join(f"{n} {v:.3f}" for n, v in others.items())
    measured = f"{calls:.3f} Redis calls/request: EVALSHA {evalsha:.3f}" + (
        f", {words}" if words else ""
    )
    ok = round(evalsha, 2) == 1.0 and sum(others.values()) < OCCASIONAL
    return Check(claim, measured, ok)


def _size_checks(runs: Runs) -> list[Check]:
    """The cost of a reserve as CPU per request, which a busy machine disturbs far less than
    req/s; the req/s ratio is shown beside it."""
    sizes = sorted(runs.reserve)
    smallest = runs.reserve[sizes[0]]
    checks = []
    for size in sizes[1:]:
        row = runs.reserve[size]
        cost = _cpu(row) / _cpu(smallest) if _cpu(smallest) else float("inf")
        slower = smallest.result.rps / row.result.rps if row.result.rps else float("inf")
        checks.append(
            Check(
                f"reserve cost with {size:,} features within 1.2x of {sizes[0]:,}",
                f"{cost:.2f}x the CPU per request ({_cpu(row):.2f} ms against "
                f"{_cpu(smallest):.2f}); {slower:.2f}x the time per request by req/s",
                cost <= 1.2,
            )
        )
    return checks
