"""bench.all reads each suite's figures back from its printed report."""

from __future__ import annotations

from bench.admin_pages import PageResult, pages_table
from bench.all import admin_figures

# bench.admin_pages' report, cut down (and its long lines cut short): a read named wider than
# the column, and the load line straight after the reads
ADMIN_REPORT = """\
page                         user       status   p50 ms   p95 ms   max ms queries x baseline
----------------------------------------------------------------------------------------------
login (baseline)             anonymous     200      1.8      2.0      2.0       0        1.0  yes
password change (baseline)   superuser     200      7.1      8.4      8.4       2        3.9  yes

rollup read                            p50 ms   p95 ms   max ms queries  rows
-----------------------------------------------------------------------------
feature_series (busiest feature)          3.8      4.0      4.0       2  24
top_consumers (its pool)                 67.5    106.5    106.5       1  5  over 100 ms
rising_truncation (all tenants)          68.1     80.3     80.3       1  10
rising_truncation (owner's tenant)        6.7      9.3      9.3       1  3
top_consumers_by_pool, all pools (beat)    895.6   1156.9   1156.9       1  60  background
top_consumers_by_pool (owner's tenant)      9.6     12.0     12.0       1  10
platform snapshot refresh (beat)       1946.9   2074.9   2074.9       2  50  background
load: load 119 s, rollups 110 s, config by bulk_create 3.3 s
"""


def test_admin_rows_keep_their_names_and_columns():
    figures = {f.scenario: f for f in admin_figures(ADMIN_REPORT)}

    login = figures["login (baseline), anonymous"]
    assert (login.median, login.tail) == ("p50 1.8 ms", "p95 2.0 ms")
    assert login.note == "x login 1.0, 0 queries, under 300 ms at p95: yes"
    wide = figures["top_consumers_by_pool, all pools (beat)"]
    assert (wide.median, wide.tail, wide.note) == (
        "p50 895.6 ms",
        "p95 1156.9 ms",
        "1 queries, background",
    )
    assert figures["top_consumers (its pool)"].note == "1 queries, over 100 ms"
    assert figures["load (config, rollups, indexes)"].throughput == "119 s"
    assert not [name for name in figures if name.startswith("load:")]


def test_pages_as_their_formatter_prints_them_whatever_their_names_width():
    results = [
        PageResult("login (baseline)", "anonymous", 200, [2.0], 0),
        PageResult("a page whose name is wider than its column", "owner", 200, [50.0], 12),
        PageResult("gone", "superuser", 404, [], 0),
    ]
    report = pages_table(results) + "\n\n" + ADMIN_REPORT.split("\n\n", 1)[1]

    figures = {f.scenario: f for f in admin_figures(report)}

    wide = figures["a page whose name is wider than its column, owner"]
    assert (wide.median, wide.tail) == ("p50 50.0 ms", "p95 50.0 ms")
    assert wide.note == "x login 25.0, 12 queries, under 300 ms at p95: yes"
    assert figures["gone, superuser"].throughput == "missing (404)"
    assert "login (baseline), anonymous" in figures
