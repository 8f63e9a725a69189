"""The trace store part: the OTLP/HTTP endpoint the collector exports spans to, into SQLite.

Started before the collector, so the collector's first batch has somewhere to go. It keeps
spans off the broker (see `eventing.telemetry.traces` for why) and bounds itself by age
and size (`sluice up --trace-retention/--trace-max-size`). It indexes the business ids
the topology declares (`traceIds`). The index file lives in the state folder
(`eventing.telemetry.traces.db_path`); `sluice trace` reads it directly.
"""

from __future__ import annotations

from eventing.stack.health import http_probe, http_status
from eventing.stack.pipeline import _python_part
from eventing.stack.process import PartSpec
from eventing.stack.settings import StackSettings
from eventing.telemetry.traces import db_path

NAME = "tracestore"


def spec(settings: StackSettings) -> PartSpec:
    path = db_path(settings.state_dir)
    url = settings.tracestore_url
    args = ["tracestore", "--host", settings.host, "--port", str(settings.ports.tracestore),
            "--db", str(path), "--topology", str(settings.topology_path)]
    if settings.trace_retention_s is not None:
        args += ["--retention", f"{settings.trace_retention_s}s"]
    if settings.trace_max_bytes is not None:
        args += ["--max-size", str(settings.trace_max_bytes)]
    part = _python_part(settings, NAME, args,
                        f"trace store otlp http {url}/v1/traces -> {path.name} (sluice trace)",
                        lambda: http_status(url + "/healthz") == 200, [settings.ports.tracestore])
    part.liveness = http_probe(url + "/healthz")
    return part
