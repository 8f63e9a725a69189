"""Prometheus instruments for Sluice processes.

Dispatcher figures are read from its plain counters at scrape time (a custom
collector), so the per-record hot path pays nothing for being observed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import REGISTRY, Collector
from prometheus_client.samples import Exemplar

_COUNTERS = {
    "consumed": ("sluice_function_events_consumed_total", "Records consumed from source topics"),
    "succeeded": ("sluice_function_events_succeeded_total", "Records the function processed"),
    "failed_attempts": ("sluice_function_failed_attempts_total", "Delivery attempts that failed"),
    "retries": ("sluice_function_retries_total", "Retries scheduled after a failure"),
    "dead_lettered": ("sluice_function_dead_lettered_total",
                      "Records sent to the dead-letter topic"),
    "commits": ("sluice_function_commits_total", "Offset commits"),
    "batches": ("sluice_function_batches_total", "Invocation batches"),
    "topic_resets": ("sluice_function_topic_resets_total",
                     "Source partitions found recreated (a new log, e.g. a broker restart)"),
}


class DispatcherCollector(Collector):
    """Exposes `Dispatcher.stats` and backlog for each running dispatcher."""

    def __init__(self, dispatchers: Mapping[str, Any]) -> None:
        self.dispatchers = dispatchers

    def collect(self) -> Iterable:
        families = {k: CounterMetricFamily(n.removesuffix("_total"), h, labels=["function"])
                    for k, (n, h) in _COUNTERS.items()}
        backlog = GaugeMetricFamily("sluice_function_backlog_records",
                                    "Consumed records not yet done", labels=["function"])
        lag = GaugeMetricFamily("sluice_function_consumer_lag_records",
                                "Records behind the end of each owned partition",
                                labels=["function", "topic", "partition"])
        cold = CounterMetricFamily("sluice_function_cold_starts",
                                   "Function instance starts (code loaded, state restored)",
                                   labels=["function"])
        started = GaugeMetricFamily("sluice_function_start_time_seconds",
                                    "When this function instance started (unix time)",
                                    labels=["function"])
        latency = HistogramMetricFamily(
            "sluice_function_delivery_latency_seconds",
            "Record timestamp to processed by the function, per function", labels=["function"])
        batch = HistogramMetricFamily("sluice_function_batch_size_records",
                                      "Records per invocation batch", labels=["function"])
        for name, d in self.dispatchers.items():
            for key, fam in families.items():
                fam.add_metric([name], getattr(d.stats, key))
            backlog.add_metric([name], sum(len(lane.queue) for lane in d.lanes.values()))
            for (topic, partition), behind in d.lag().items():
                lag.add_metric([name, topic, str(partition)], behind)
            cold.add_metric([name], 1)
            started.add_metric([name], d.stats.started_at)
            lat = d.stats.delivery_latency
            latency.add_metric([name], _buckets(lat), lat.sum)
            batch.add_metric([name], _buckets(d.stats.batch_size), d.stats.batch_size.sum)
        yield from families.values()
        yield from (backlog, lag, cold, started, latency, batch)


def _buckets(h) -> list[tuple]:
    """Cumulative (le, count[, exemplar]) as Prometheus histograms want them; exemplars
    (trace ids) reach scrapers that ask for OpenMetrics."""
    out: list[tuple] = []
    total = 0
    exemplars = getattr(h, "exemplars", None) or [None] * len(h.counts)
    for bound, count, ex in zip((*h.bounds, float("inf")), h.counts, exemplars, strict=True):
        total += count
        le = "+Inf" if bound == float("inf") else str(bound)
        out.append((le, total, Exemplar(*ex)) if ex is not None else (le, total))
    return out


# How long a dispatcher may go without finishing a cycle before /healthz says so. A cycle
# waits at most for one batch's invocations (HTTP modes: the per-attempt timeout).
STALL_S = 120.0

Health = Callable[[], tuple[bool, dict[str, Any]]]


def serve_metrics(host: str, port: int, health: Health | None = None) -> None:
    """`/metrics` (the default registry) and a cheap `/healthz` on one port, in a thread.

    Why a separate `/healthz`: a scrape runs every collector (consumer lag per partition,
    histograms) and took 0.1-3.8 s here, so a probe on `/metrics` with a 1 s timeout
    flapped on a working process. `health()` reads a few fields and answers at once:
    200 with its detail when healthy, 503 when not.
    """
    from wsgiref.simple_server import make_server

    from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

    metrics_app = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok, detail = health() if health else (True, {})
            body = json.dumps({"status": "ok" if ok else "unhealthy", **detail},
                              default=str).encode()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
            return [body]
        return metrics_app(environ, start_response)

    server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()


def serve_dispatcher_metrics(dispatchers: Mapping[str, Any], host: str, port: int) -> None:
    """Metrics of the dispatchers, and `/healthz`: every dispatcher cycled recently."""
    REGISTRY.register(DispatcherCollector(dispatchers))

    def health() -> tuple[bool, dict[str, Any]]:
        now = time.monotonic()
        ages = {name: round(now - d.last_cycle, 1) for name, d in dispatchers.items()}
        return all(a < STALL_S for a in ages.values()), {"seconds_since_cycle": ages}

    serve_metrics(host, port, health)
