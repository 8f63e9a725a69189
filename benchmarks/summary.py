"""The issue's figures table from one `run.py` report: row, Sluice's figure, reference, ratio, met.

Kept apart from `run.py` (which measures) so the table's rules, the one place the issue's
targets are written down, can be checked without a stack (`tests/test_bench_summary.py`).
A row whose measurement did not run or did not complete says so ("not run"), never a
made-up figure; a row whose outputs did not check out is not met, whatever its speed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    """One line of the summary; `value`, `reference_value` and `ratio` are None when the
    row was not measured; `met` is None when not measured or the row has no target."""

    key: str
    name: str
    figure: str
    value: float | None
    reference: str
    reference_value: float | None
    ratio: float | None
    target: str
    met: bool | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Report = dict[str, Any]
Measured = tuple[str, float, str, float | None, float | None, bool | None]


def _contender(report: Report, name: str) -> dict[str, Any] | None:
    return (report.get("rows") or {}).get(name)


def _ratio_row(report: Report, a: str, b: str, field: str, unit: str,
               at_most: float | None = None, at_least: float | None = None,
               ) -> Measured | None:
    """a's `field` over b's, checked against a bound; both outputs must have checked out."""
    ra, rb = _contender(report, a), _contender(report, b)
    if not ra or not rb or not rb[field]:
        return None
    ratio = ra[field] / rb[field]
    ok = ra["ok"] and rb["ok"]
    met = ok and (ratio <= at_most if at_most is not None else ratio >= at_least)
    note = "" if ok else " (outputs MISMATCH)"
    fmt = "{:,.1f} " if field == "cpu_us" else "{:,.0f} "
    return (fmt.format(ra[field]) + unit + note, ra[field],
            f"{b}: " + fmt.format(rb[field]) + unit, rb[field], ratio, met)


def _two_functions(report: Report) -> Measured | None:
    lat, floor = report.get("latency"), report.get("latency_floor_best")
    if not lat or not floor or not floor.get("p99_ms"):
        return None
    ratio = lat["p99_ms"] / floor["p99_ms"]
    complete = lat["received"] == lat["events"]
    note = "" if complete else f" (received {lat['received']:,}/{lat['events']:,})"
    return (f"p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms at {lat['rate']:,} ev/s"
            f"{note}", lat["p99_ms"],
            f"floor relays (linger {floor['relay_linger_ms']:g} ms): p50 "
            f"{floor['p50_ms']:.0f} ms, p99 {floor['p99_ms']:.0f} ms", floor["p99_ms"], ratio,
            complete and ratio <= 1.3)


def _queryable(report: Report) -> Measured | None:
    q = report.get("queryable")
    if not q or q.get("p99_ms") is None:
        return None
    complete = q["queryable"] == q["events"]
    note = "" if complete else f" (queryable {q['queryable']:,}/{q['events']:,})"
    return (f"p50 {q['p50_ms']:.0f} ms, p99 {q['p99_ms']:.0f} ms at {q['rate']:,.0f} ev/s"
            f"{note}", q["p99_ms"], "target 100 ms", 100.0, q["p99_ms"] / 100.0,
            complete and q["p99_ms"] <= 100.0)


def _pipeline(report: Report) -> Measured | None:
    t = report.get("pipeline")
    if not t or not t.get("pipeline_ev_s"):
        return None
    sustained = t.get("steady_ev_s_10_90") or t["pipeline_ev_s"]
    complete = t["scored"] == t["events"]
    note = "" if complete else f", scored {t['scored']:,}/{t['events']:,}"
    return (f"{sustained:,.0f} ev/s sustained ({t['pipeline_ev_s']:,.0f} overall; "
            f"{t['events']:,} events{note})", float(sustained), "target 10,000 ev/s",
            10_000.0, sustained / 10_000, complete and sustained >= 10_000)


def _cold(mode: str) -> Callable[[Report], Measured | None]:
    def row(report: Report) -> Measured | None:
        c = (report.get("cold_start") or {}).get(mode)
        if not c or c.get("first_output_s") is None:
            return None
        extra = (f"; port open {c['listening_s']:.2f} s" if c.get("listening_s") is not None
                 else "")
        return (f"{c['first_output_s']:.2f} s (median of {c['completed']}/{c['runs']}{extra})",
                c["first_output_s"], "target 1 s", 1.0, c["first_output_s"],
                c["first_output_s"] <= 1.0 and c["completed"] == c["runs"])
    return row


def _replicas(report: Report) -> Measured | None:
    r = report.get("replicas") or {}
    one, two = r.get("1"), r.get("2")
    if not one or not two or not one.get("ev_s") or not two.get("ev_s"):
        return None
    ok = one["ok"] and two["ok"]
    split = "/".join(f"{n:,.0f}" for n in two.get("per_replica_events", []))
    return (f"2 replicas: {two['ev_s']:,.0f} ev/s, {two['cpu_us']:.1f} CPU us/ev (split {split})"
            + ("" if ok else " (outputs MISMATCH)"), two["ev_s"],
            f"1 replica: {one['ev_s']:,.0f} ev/s, {one['cpu_us']:.1f} CPU us/ev", one["ev_s"],
            two["ev_s"] / one["ev_s"], None if ok else False)


# key, the row, target as printed, run.py parts it needs, how it is computed
ROWS: list[tuple[str, str, str, tuple[str, ...], Callable[[Report], Measured | None]]] = [
    ("cpu_vs_floor", "1. in process: CPU per event vs floor", "<= 1.25x",
     ("sluice", "floor"),
     lambda r: _ratio_row(r, "sluice", "floor", "cpu_us", "us/ev", at_most=1.25)),
    ("throughput_vs_floor", "1. in process: throughput vs floor", ">= 0.8x",
     ("sluice", "floor"),
     lambda r: _ratio_row(r, "sluice", "floor", "ev_s", "ev/s", at_least=0.8)),
    ("vs_quix", "2. in process vs Quix Streams 3.28.1, same job", ">= 3x", ("sluice", "quix"),
     lambda r: _ratio_row(r, "sluice", "quix", "ev_s", "ev/s", at_least=3.0)),
    ("http_batch_vs_per_event", "3. HTTP batched vs one POST per event", ">= 10x",
     ("sluice-http-batch", "sluice-http"),
     lambda r: _ratio_row(r, "sluice-http-batch", "sluice-http", "ev_s", "ev/s",
                          at_least=10.0)),
    ("http_vs_ff_baseline", "3. HTTP per event vs functions-framework baseline", ">= 1x",
     ("sluice-http", "ff-baseline"),
     lambda r: _ratio_row(r, "sluice-http", "ff-baseline", "ev_s", "ev/s", at_least=1.0)),
    ("two_functions_p99", "4. two functions at 5K ev/s, produce -> output", "p99 <= 1.3x",
     ("latency",), _two_functions),
    ("queryable_p99", "5. gateway 202 -> row queryable (real-time)", "p99 <= 100 ms",
     ("queryable",), _queryable),
    ("pipeline_ev_s", "6. fraud pipeline gateway -> scored, 1% traces", ">= 10K ev/s",
     ("pipeline",), _pipeline),
    ("cold_start_inprocess", "7. cold start in process: start -> first event", "<= 1 s",
     ("cold-start",), _cold("inprocess")),
    ("cold_start_http", "7. cold start behind HTTP: start -> first event", "<= 1 s",
     ("cold-start",), _cold("http")),
    ("replicas", "8. scale out: 2 vs 1 replicas of a function", "(2 cores: reported)",
     ("replicas",), _replicas),
]
ROW_NAMES = [row[1] for row in ROWS]


def rows(report: Report) -> list[Row]:
    """Every row of the issue's table: measured, "FAILED" (a part it needs raised; the
    error is in the report's `errors`) or "not run"."""
    errors = report.get("errors") or {}
    out = []
    for key, name, target, needs, compute in ROWS:
        got = compute(report)
        if got is None:
            failed = [part for part in needs if part in errors]
            figure = f"FAILED: {', '.join(failed)} (see errors)" if failed else "not run"
            out.append(Row(key, name, figure, None, "-", None, None, target,
                           False if failed else None))
        else:
            figure, value, reference, ref_value, ratio, met = got
            out.append(Row(key, name, figure, value, reference, ref_value, ratio, target, met))
    return out


def table(summary: list[Row]) -> str:
    """The rows as aligned text, one line each (figure and reference can be long)."""
    head = ("row", "Sluice", "reference", "ratio", "target", "met")
    lines = [(r.name, r.figure, r.reference, "-" if r.ratio is None else f"{r.ratio:.2f}x",
              r.target, "-" if r.met is None else ("yes" if r.met else "NO")) for r in summary]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*head), rule, *(fmt.format(*x) for x in lines)])
