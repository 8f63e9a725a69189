"""rotel, the OTLP collector: receives spans on 4317/4318 and exports them to the trace store.

Spans go over OTLP/HTTP to the `tracestore` part, never through the broker: Tansu keeps
every record of a topic until restart, so a traces topic grew broker memory by ~30 MiB/min
at the example's rate. The collector stays the one address every process exports to (as
on a cluster, where the shipped OpenTelemetry Collector config sends spans to Tempo).
"""

from __future__ import annotations

from eventing.stack import binaries
from eventing.stack.health import http_probe, http_status
from eventing.stack.process import PartSpec
from eventing.stack.settings import StackSettings

NAME = "collector"


def spec(settings: StackSettings) -> PartSpec:
    p = settings.ports
    run_dir = settings.state_dir / "data" / NAME
    run_dir.mkdir(parents=True, exist_ok=True)
    http = f"http://{settings.host}:{p.otlp_http}"
    argv = [
        binaries.rotel(), "start",
        "--otlp-grpc-endpoint", f"{settings.host}:{p.otlp_grpc}",
        "--otlp-http-endpoint", f"{settings.host}:{p.otlp_http}",
        # Own pid/log names: the defaults are fixed paths in /tmp that two stacks share.
        "--pid-file", str(run_dir / "rotel.pid"),
        "--log-file", str(run_dir / "rotel.log"),
        "--otlp-receiver-metrics-disabled", "--otlp-receiver-logs-disabled",
        "--exporter", "otlp",
        "--otlp-exporter-endpoint", settings.tracestore_url,  # rotel appends /v1/traces
        "--otlp-exporter-protocol", "http",
        "--otlp-exporter-compression", "none",  # loopback: gzip would only cost CPU
        # A busy machine can hold a batch up for seconds; a retry after the default 5 s
        # would send it twice (harmless: the store's writes are idempotent, but wasted).
        "--otlp-exporter-request-timeout", "30s",
        "--batch-timeout", "10ms",
        "--traces-batch-max-size", "200",  # bounds one write to the trace store (~200 KiB)
    ]
    return PartSpec(
        name=NAME,
        argv=argv,
        env=binaries.base_env(),
        cwd=run_dir,
        endpoint=f"otlp grpc {settings.host}:{p.otlp_grpc}  http {http}",
        health=lambda: http_status(
            http + "/v1/traces", method="POST", content=b'{"resourceSpans": []}',
            headers={"Content-Type": "application/json"},
        ) == 200,
        ports=[p.otlp_grpc, p.otlp_http],
        # rotel has no health endpoint: an empty export is answered by its receiver.
        liveness=http_probe(http + "/v1/traces", method="POST", content=b'{"resourceSpans": []}',
                            headers={"Content-Type": "application/json"}),
    )
