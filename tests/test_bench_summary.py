"""The benchmark summary's rules: every row of the issue's table, its target checked both ways.

`benchmarks/summary.py` is where the issue's targets are written down; these tests feed
it hand-made reports (no stack), so a target typed the wrong way round (<= for >=), a
ratio inverted, or a row that silently disappears when its part did not run, fails here.
"""

from __future__ import annotations

import sys

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import summary  # noqa: E402


def contender(ev_s: float, cpu_us: float, ok: bool = True) -> dict:
    return {"ev_s": ev_s, "cpu_us": cpu_us, "ok": ok}


def full_report(*, sluice_cpu: float = 10.0, pipeline_ev_s: float = 12_000.0) -> dict:
    """A report where every part ran; figures chosen so each target is near its bound."""
    return {
        "rows": {"floor": contender(100_000, 9.0), "sluice": contender(90_000, sluice_cpu),
                 "quix": contender(20_000, 40.0), "sluice-http-batch": contender(20_000, 50),
                 "sluice-http": contender(1_000, 900), "ff-baseline": contender(800, 1_100)},
        "latency": {"p50_ms": 60.0, "p99_ms": 120.0, "received": 100, "events": 100,
                    "rate": 5000},
        "latency_floor_best": {"p50_ms": 50.0, "p99_ms": 100.0, "relay_linger_ms": 20.0},
        "queryable": {"p50_ms": 40.0, "p99_ms": 90.0, "rate": 1000.0, "queryable": 10,
                      "events": 10},
        "pipeline": {"pipeline_ev_s": 11_000, "steady_ev_s_10_90": pipeline_ev_s,
                     "scored": 50, "events": 50},
        "cold_start": {"inprocess": {"first_output_s": 0.8, "completed": 3, "runs": 3},
                       "http": {"first_output_s": 1.4, "completed": 3, "runs": 3,
                                "listening_s": 0.9}},
        "replicas": {"1": {"ev_s": 10_000, "cpu_us": 30.0, "ok": True},
                     "2": {"ev_s": 15_000, "cpu_us": 35.0, "ok": True,
                           "per_replica_events": [5_000, 5_000]}},
    }


def by_key(report: dict) -> dict[str, summary.Row]:
    return {row.key: row for row in summary.rows(report)}


def test_every_row_of_the_issue_is_computed_from_a_full_report() -> None:
    rows = summary.rows(full_report())
    assert [r.name for r in rows] == summary.ROW_NAMES
    assert len({r.key for r in rows}) == len(rows) == 11
    for row in rows:
        assert row.value is not None and row.ratio is not None, row
    got = by_key(full_report())
    assert got["cpu_vs_floor"].ratio == pytest.approx(10.0 / 9.0)
    assert got["cpu_vs_floor"].met is True          # 1.11x <= 1.25x
    assert got["throughput_vs_floor"].met is True   # 0.9x >= 0.8x
    assert got["vs_quix"].ratio == pytest.approx(4.5) and got["vs_quix"].met is True
    assert got["http_batch_vs_per_event"].met is True  # 20x
    assert got["http_vs_ff_baseline"].ratio == pytest.approx(1.25)
    assert got["two_functions_p99"].ratio == pytest.approx(1.2)
    assert got["two_functions_p99"].met is True
    assert got["queryable_p99"].met is True
    assert got["pipeline_ev_s"].met is True
    assert got["cold_start_inprocess"].met is True
    assert got["cold_start_http"].met is False      # 1.4 s > 1 s
    assert got["replicas"].ratio == pytest.approx(1.5)
    assert got["replicas"].met is None              # reported, no target on 2 cores


def test_targets_fail_on_the_wrong_side_of_their_bound() -> None:
    got = by_key(full_report(sluice_cpu=12.0, pipeline_ev_s=9_000.0))
    assert got["cpu_vs_floor"].met is False  # 12 / 9 = 1.33x > 1.25x
    assert got["pipeline_ev_s"].met is False
    report = full_report()
    report["latency"]["p99_ms"] = 140.0  # 1.4x the floor relays
    report["queryable"]["p99_ms"] = 101.0
    got = by_key(report)
    assert got["two_functions_p99"].met is False
    assert got["queryable_p99"].met is False


def test_lost_outputs_mean_not_met_whatever_the_speed() -> None:
    report = full_report()
    report["rows"]["sluice"]["ok"] = False
    report["latency"]["received"] = 99
    got = by_key(report)
    assert got["throughput_vs_floor"].met is False
    assert "MISMATCH" in got["throughput_vs_floor"].figure
    assert got["two_functions_p99"].met is False
    assert "99/100" in got["two_functions_p99"].figure


def test_rows_not_run_or_failed_are_shown_not_dropped() -> None:
    rows = by_key({"rows": {"floor": contender(100_000, 9.0)},
                   "errors": {"cold-start": "RuntimeError: boom"}})
    assert len(rows) == len(summary.ROW_NAMES)
    assert rows["cpu_vs_floor"].figure == "not run" and rows["cpu_vs_floor"].met is None
    assert rows["cold_start_http"].figure.startswith("FAILED")
    assert rows["cold_start_http"].met is False
    text = summary.table(summary.rows({}))
    for name in summary.ROW_NAMES:
        assert name in text
