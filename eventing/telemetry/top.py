"""`sluice top`: a live terminal view of the running pipeline, from Prometheus.

For people without Grafana at hand: the same figures as the overview dashboard
(per-function rate, p99 delivery latency, lag, dead letters, retries), refreshed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

import httpx

QUERIES = {
    "rate": "sum by (function) (rate(sluice_function_events_succeeded_total[1m]))",
    "p99": "histogram_quantile(0.99, sum by (function, le) "
           "(rate(sluice_function_delivery_latency_seconds_bucket[5m])))",
    "lag": "sum by (function) (sluice_function_consumer_lag_records)",
    "dead": "sum by (function) (increase(sluice_function_dead_lettered_total[5m]))",
    "retries": "sum by (function) (increase(sluice_function_retries_total[5m]))",
    # Over a window, not the instant sample: one slow or failed scrape marks the series
    # stale, and the total would vanish from the view until the next good one.
    "total": "sum by (function) (max_over_time(sluice_function_events_succeeded_total[1m]))",
}
GATEWAY = "sum by (outcome) (rate(sluice_gateway_events_total[1m]))"


class PrometheusUnavailable(RuntimeError):
    pass


def _query(client: httpx.Client, url: str, promql: str) -> list[dict]:
    try:
        r = client.get(f"{url}/api/v1/query", params={"query": promql})
        r.raise_for_status()
    except httpx.HTTPError as exc:
        raise PrometheusUnavailable(
            f"cannot query Prometheus at {url} ({exc}); is the stack up? (`sluice status`)"
        ) from None
    return r.json()["data"]["result"]


def snapshot(prometheus_url: str, client: httpx.Client | None = None) -> dict:
    """Per-function figures and gateway rates, as plain numbers."""
    own = client is None
    client = client or httpx.Client(timeout=5.0)
    try:
        rows: dict[str, dict[str, float]] = {}
        for key, promql in QUERIES.items():
            for series in _query(client, prometheus_url, promql):
                fn = series["metric"].get("function", "?")
                rows.setdefault(fn, {})[key] = float(series["value"][1])
        gateway = {s["metric"].get("outcome", "?"): float(s["value"][1])
                   for s in _query(client, prometheus_url, GATEWAY)}
    finally:
        if own:
            client.close()
    return {"functions": rows, "gateway": gateway}


def _num(v: float | None, fmt: str) -> str:
    if v is None or v != v:  # NaN: no samples in the window yet
        return "-"
    return format(v, fmt)


def render(snap: dict) -> str:
    lines = [f"{'FUNCTION':<14}{'EV/S':>10}{'P99 MS':>10}{'LAG':>10}{'DEAD 5M':>10}"
             f"{'RETRY 5M':>10}{'TOTAL':>12}"]
    for fn, r in sorted(snap["functions"].items()):
        p99 = r.get("p99")
        lines.append(
            f"{fn:<14}{_num(r.get('rate'), '.1f'):>10}"
            f"{_num(None if p99 is None else p99 * 1000, '.0f'):>10}"
            f"{_num(r.get('lag'), '.0f'):>10}{_num(r.get('dead'), '.0f'):>10}"
            f"{_num(r.get('retries'), '.0f'):>10}{_num(r.get('total'), '.0f'):>12}")
    if not snap["functions"]:
        lines.append("(no function metrics yet: is the pipeline running?)")
    gw = ", ".join(f"{k} {v:.1f}/s" for k, v in sorted(snap["gateway"].items())) or "-"
    lines.append(f"\ngateway: {gw}")
    return "\n".join(lines)


def run(prometheus_url: str, out: TextIO, *, interval: float = 2.0, once: bool = False,
        clock: Callable[[], str] = lambda: time.strftime("%H:%M:%S"),
        terminal: bool = True) -> None:
    """Print snapshots every `interval` s; on a `terminal` each replaces the last (escape
    codes clear the screen), otherwise they follow one another as plain text."""
    clear = "\x1b[H\x1b[2J" if terminal else "\n"
    with httpx.Client(timeout=5.0) as client:
        while True:
            text = render(snapshot(prometheus_url, client))
            if once:
                out.write(text + "\n")
                return
            out.write(clear + f"sluice top  {clock()}  (Ctrl-C quits)\n\n" + text + "\n")
            out.flush()
            time.sleep(interval)
