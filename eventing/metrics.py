"""Prometheus instruments for Sluice processes.

Dispatcher figures are read from its plain counters at scrape time (a custom
collector), so the per-record hot path pays nothing for being observed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

_COUNTERS = {
    "consumed": ("sluice_function_events_consumed_total", "Records consumed from source topics"),
    "succeeded": ("sluice_function_events_succeeded_total", "Records the function processed"),
    "failed_attempts": ("sluice_function_failed_attempts_total", "Delivery attempts that failed"),
    "retries": ("sluice_function_retries_total", "Retries scheduled after a failure"),
    "dead_lettered": ("sluice_function_dead_lettered_total",
                      "Records sent to the dead-letter topic"),
    "commits": ("sluice_function_commits_total", "Offset commits"),
    "batches": ("sluice_function_batches_total", "Invocation batches"),
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
        for name, d in self.dispatchers.items():
            for key, fam in families.items():
                fam.add_metric([name], getattr(d.stats, key))
            backlog.add_metric([name], sum(len(lane.queue) for lane in d.lanes.values()))
        yield from families.values()
        yield backlog


def serve_dispatcher_metrics(dispatchers: Mapping[str, Any], host: str, port: int) -> None:
    REGISTRY.register(DispatcherCollector(dispatchers))
    start_http_server(port, addr=host)
