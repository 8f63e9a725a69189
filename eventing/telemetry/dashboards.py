"""Grafana dashboards as code: the pipeline overview and the per-function detail.

Written by hand as Grafana JSON (schemaVersion 39) from the panel lists below, into
`infra/grafana/` by `sluice dashboards`. Every panel's PromQL is run against a live
Prometheus by the tests after traffic, so no panel ships without data. The queries use
only metrics Sluice's own processes expose (`sluice_*`) and `up`.
"""

from __future__ import annotations

import json
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

# (title, PromQL, unit)
OVERVIEW = [
    ("Gateway events/s by outcome",
     "sum by (outcome) (rate(sluice_gateway_events_total[1m]))", "ops"),
    ("Gateway p99 request latency",
     "histogram_quantile(0.99, sum by (le) (rate(sluice_gateway_request_duration_seconds_bucket"
     "[5m])))", "s"),
    ("Events processed/s by function",
     "sum by (function) (rate(sluice_function_events_succeeded_total[1m]))", "ops"),
    ("Delivery latency p99 by function",
     "histogram_quantile(0.99, sum by (function, le) "
     "(rate(sluice_function_delivery_latency_seconds_bucket[5m])))", "s"),
    ("Consumer lag by function",
     "sum by (function) (sluice_function_consumer_lag_records)", "short"),
    ("Dead-lettered events (5m) by function",
     "sum by (function) (increase(sluice_function_dead_lettered_total[5m]))", "short"),
    ("Retries/s by function", "sum by (function) (rate(sluice_function_retries_total[1m]))",
     "ops"),
    ("Parts up", 'up{job=~"sluice-.*|seaweedfs|prometheus"}', "short"),
]

FUNCTION = [
    ("Consumed and processed/s",
     'sum(rate(sluice_function_events_consumed_total{function="$function"}[1m]))', "ops"),
    ("Failed attempts/s",
     'sum(rate(sluice_function_failed_attempts_total{function="$function"}[1m]))', "ops"),
    ("Delivery latency p50",
     "histogram_quantile(0.5, sum by (le) (rate(sluice_function_delivery_latency_seconds_bucket"
     '{function="$function"}[5m])))', "s"),
    ("Delivery latency p99",
     "histogram_quantile(0.99, sum by (le) (rate(sluice_function_delivery_latency_seconds_bucket"
     '{function="$function"}[5m])))', "s"),
    ("Lag by partition",
     'sum by (topic, partition) (sluice_function_consumer_lag_records{function="$function"})',
     "short"),
    ("Batch size p50",
     "histogram_quantile(0.5, sum by (le) (rate(sluice_function_batch_size_records_bucket"
     '{function="$function"}[5m])))', "short"),
    ("Backlog (fetched, not done)",
     'sum(sluice_function_backlog_records{function="$function"})', "short"),
    ("Instance starts (cold starts)",
     'sum(sluice_function_cold_starts_total{function="$function"})', "short"),
]


def _panels(specs: list[tuple[str, str, str]]) -> list[dict]:
    return [{
        "id": i + 1, "type": "timeseries", "title": title,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [{"refId": "A", "expr": expr, "legendFormat": "__auto",
                     "datasource": DATASOURCE}],
    } for i, (title, expr, unit) in enumerate(specs)]


def overview() -> dict:
    return {
        "uid": "sluice-overview", "title": "Sluice: pipeline overview", "schemaVersion": 39,
        "version": 1, "editable": False, "tags": ["sluice"], "timezone": "utc",
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s",
        "templating": {"list": []}, "panels": _panels(OVERVIEW),
    }


def function_detail() -> dict:
    variable = {
        "name": "function", "label": "Function", "type": "query", "datasource": DATASOURCE,
        "query": {"query": "label_values(sluice_function_events_consumed_total, function)",
                  "refId": "function"},
        "definition": "label_values(sluice_function_events_consumed_total, function)",
        "refresh": 2, "includeAll": False, "multi": False,
    }
    return {
        "uid": "sluice-function", "title": "Sluice: function detail", "schemaVersion": 39,
        "version": 1, "editable": False, "tags": ["sluice"], "timezone": "utc",
        "time": {"from": "now-1h", "to": "now"}, "refresh": "10s",
        "templating": {"list": [variable]}, "panels": _panels(FUNCTION),
    }


DASHBOARDS = {"pipeline-overview.json": overview, "function-detail.json": function_detail}


def render() -> dict[str, str]:
    return {name: json.dumps(make(), indent=2) + "\n" for name, make in DASHBOARDS.items()}


def write(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, text in render().items():
        (folder / name).write_text(text)
        out.append(folder / name)
    return out


def queries(dashboard: dict, variables: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL with template variables filled in) for every panel."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in (variables or {}).items():
                expr = expr.replace(f"${name}", value)
            out.append((panel["title"], expr))
    return out
