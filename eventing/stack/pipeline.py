"""The pipeline parts of the stack: the ingest gateway, one process per function, and
the topology's traffic generator when it ships one.

They are parts like the broker: started by `sluice up` after the infrastructure, each
with its own pid, log and health check, stopped by `sluice down`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from eventing import topology as topo
from eventing.stack import binaries
from eventing.stack.health import http_status
from eventing.stack.process import PartSpec
from eventing.stack.settings import StackSettings

GATEWAY = "gateway"


def _python_part(settings: StackSettings, name: str, args: list[str], endpoint: str,
                 health: Callable[[], bool], ports: list[int]) -> PartSpec:
    return PartSpec(
        name=name,
        argv=[sys.executable, "-m", "eventing.cli", *args],
        env=binaries.base_env() | {"PYTHONPATH": str(settings.project_dir),
                                   "PYTHONUNBUFFERED": "1"},
        cwd=settings.project_dir,
        endpoint=endpoint,
        health=health,
        ports=ports,
    )


def tracing_args(settings: StackSettings, service_name: str) -> list[str]:
    """Every pipeline process exports spans to the stack's collector (telemetry.tracing)."""
    return ["--otlp-endpoint", settings.otlp_http_url, "--service-name", service_name,
            "--trace-sampling", repr(settings.trace_sampling)]


def gateway_spec(settings: StackSettings) -> PartSpec:
    args = ["gateway", "--host", settings.host, "--port", str(settings.ports.gateway),
            "--bootstrap", settings.bootstrap, "--registry", settings.registry_url,
            "--topology", str(settings.topology_path),
            *tracing_args(settings, "sluice-gateway")]
    if settings.gateway_token_file:
        args += ["--token-file", str(settings.gateway_token_file)]
    return _python_part(
        settings, GATEWAY, args, f"ingest gateway {settings.gateway_url}",
        lambda: http_status(settings.gateway_url + "/readyz") == 200,
        [settings.ports.gateway],
    )


def function_metrics_port(settings: StackSettings, index: int) -> int:
    return settings.ports.dispatcher_metrics + index


def function_specs(settings: StackSettings) -> list[Callable[[StackSettings], PartSpec]]:
    """One factory per function of the topology, in name order (stable metrics ports)."""
    topology = topo.load(settings.topology_path)
    factories = []
    for index, name in enumerate(sorted(topology.functions)):
        def factory(s: StackSettings, name: str = name, index: int = index) -> PartSpec:
            port = function_metrics_port(s, index)
            url = f"http://{s.host}:{port}/metrics"
            health = f"http://{s.host}:{port}/healthz"  # cheap; a scrape can take seconds
            return _python_part(
                s, f"fn-{name}",
                ["run", "--function", name, "--topology", str(s.topology_path),
                 "--bootstrap", s.bootstrap, "--registry", s.registry_url,
                 "--metrics-port", str(port), "--metrics-host", s.host,
                 *tracing_args(s, f"sluice-{name}")],
                f"function {name} (metrics {url})",
                lambda: http_status(health) == 200,
                [port],
            )
        factories.append(factory)
    return factories


def has_generator(settings: StackSettings) -> bool:
    """Whether the topology ships traffic (`generate.py` beside it, example code)."""
    return settings.generator_path.exists()


def generator_spec(settings: StackSettings) -> PartSpec:
    """The topology's traffic generator, publishing through the gateway until stopped."""
    truth = settings.state_dir / "generator-truth.txt"
    args = ["generate", "--rate", str(settings.generator_rate), "--duration", "0", "--quiet",
            "--gateway", settings.gateway_url, "--truth", str(truth),
            "--topology", str(settings.topology_path)]
    if settings.gateway_token_file:
        args += ["--token-file", str(settings.gateway_token_file)]
    return _python_part(
        settings, "generator", args,
        f"traffic generator ({settings.generator_rate:g} payments/s, fraud ids in {truth.name})",
        lambda: True,
        [],
    )
