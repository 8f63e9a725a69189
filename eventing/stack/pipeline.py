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
from eventing.stack.health import http_probe, http_status
from eventing.stack.process import LivenessProbe, PartSpec
from eventing.stack.settings import ENV_GATEWAY_TOKEN, StackSettings

GATEWAY = "gateway"


def _python_part(settings: StackSettings, name: str, args: list[str], endpoint: str,
                 health: Callable[[], bool], ports: list[int],
                 env: dict[str, str] | None = None,
                 liveness: LivenessProbe | None = None) -> PartSpec:
    return PartSpec(
        name=name,
        argv=[sys.executable, "-m", "eventing.cli", *args],
        env=binaries.base_env() | {"PYTHONPATH": str(settings.project_dir),
                                   "PYTHONUNBUFFERED": "1"} | (env or {}),
        cwd=settings.project_dir,
        endpoint=endpoint,
        health=health,
        ports=ports,
        liveness=liveness,
    )


def tracing_args(settings: StackSettings, service_name: str) -> list[str]:
    """Every pipeline process exports spans to the stack's collector (telemetry.tracing)."""
    return ["--otlp-endpoint", settings.otlp_http_url, "--otlp-protocol", "http/protobuf",
            "--service-name", service_name,
            "--trace-sampling", repr(settings.trace_sampling)]


def token_env(settings: StackSettings) -> dict[str, str]:
    """The gateway token for a child's environment (a flag would show in `ps`)."""
    return {ENV_GATEWAY_TOKEN: settings.gateway_token} if settings.gateway_token else {}


def gateway_healthy(settings: StackSettings) -> bool:
    """Ready, and refusing unauthenticated events when a token is configured: a gateway
    that would accept them is not a healthy part of this stack (it fails open)."""
    if http_status(settings.gateway_url + "/readyz") != 200:
        return False
    return not settings.gateway_requires_token or gateway_refuses_anonymous(settings)


def gateway_refuses_anonymous(settings: StackSettings) -> bool:
    """Whether `POST /` without a token is answered 401 (nothing is written: the
    token is checked before the body is read)."""
    return http_status(settings.gateway_url + "/", method="POST", content=b"{}",
                       headers={"content-type": "application/cloudevents+json"}) == 401


def gateway_spec(settings: StackSettings) -> PartSpec:
    args = ["gateway", "--host", settings.host, "--port", str(settings.ports.gateway),
            "--bootstrap", settings.bootstrap, "--registry", settings.registry_url,
            "--topology", str(settings.topology_path),
            *tracing_args(settings, "sluice-gateway")]
    if settings.gateway_token_file:
        args += ["--token-file", str(settings.gateway_token_file)]
    return _python_part(
        settings, GATEWAY, args, f"ingest gateway {settings.gateway_url}"
        + ("  (bearer token required)" if settings.gateway_requires_token else ""),
        lambda: gateway_healthy(settings),
        [settings.ports.gateway], env=token_env(settings),
        liveness=http_probe(settings.gateway_url + "/healthz"),
    )


def function_metrics_port(settings: StackSettings, index: int) -> int:
    """The metrics port of the `index`-th function process (`function_processes` order)."""
    port = settings.ports.dispatcher_metrics + index
    if port >= settings.ports.lake_metrics:
        raise ValueError(
            f"too many function processes ({index + 1}): their metrics ports run from "
            f"{settings.ports.dispatcher_metrics} into the lake sink's "
            f"{settings.ports.lake_metrics}; lower `--replicas` or a topology `scale.min`")
    return port


def replica_count(function: topo.Function, overrides: dict[str, int]) -> int:
    """How many processes run `function` locally, in one consumer group.

    `sluice up --replicas NAME=N` wins; else the topology's `scale.min` (the number the
    cluster manifests keep running too), at least one. The group spreads the partitions
    over them; keyed state follows its partitions through the changelog
    (`eventing.fn.state`: every assignment restores).
    """
    return max(1, overrides.get(function.name, function.scale.min))


def function_processes(settings: StackSettings) -> list[tuple[str, str]]:
    """(function name, part name) of every function process, in a stable order:
    functions by name, then replicas (`fn-NAME`, `fn-NAME-2`, ...)."""
    topology = topo.load(settings.topology_path)
    overrides = dict(settings.replicas)
    unknown = sorted(set(overrides) - set(topology.functions))
    if unknown:
        raise ValueError(f"--replicas names no function of the topology: {', '.join(unknown)} "
                         f"(functions: {', '.join(sorted(topology.functions))})")
    return [(name, f"fn-{name}" if r == 1 else f"fn-{name}-{r}")
            for name in sorted(topology.functions)
            for r in range(1, replica_count(topology.functions[name], overrides) + 1)]


def function_specs(settings: StackSettings) -> list[Callable[[StackSettings], PartSpec]]:
    """One factory per function process (`function_processes`: stable metrics ports)."""
    factories = []
    for index, (name, part) in enumerate(function_processes(settings)):
        def factory(s: StackSettings, name: str = name, part: str = part,
                    index: int = index) -> PartSpec:
            port = function_metrics_port(s, index)
            url = f"http://{s.host}:{port}/metrics"
            health = f"http://{s.host}:{port}/healthz"  # cheap; a scrape can take seconds
            # `--state-dir` first, as for the lake sink and the real-time table: the
            # dispatcher reads the stack's broker storage from it, hence its client
            # tuning (`eventing.kafka.client_tuning`). Without it a function on an s3
            # stack took memory's 10 ms fetch wait and stalled (README "Broker storage").
            return _python_part(
                s, part,
                ["--state-dir", str(s.state_dir),
                 "run", "--function", name, "--topology", str(s.topology_path),
                 "--bootstrap", s.bootstrap, "--registry", s.registry_url,
                 "--metrics-port", str(port), "--metrics-host", s.host,
                 *tracing_args(s, f"sluice-{name}")],
                f"function {name} (metrics {url})",
                lambda: http_status(health) == 200,
                [port],
                liveness=http_probe(health),  # every dispatcher cycled in 120 s
            )
        factories.append(factory)
    return factories


def has_generator(settings: StackSettings) -> bool:
    """Whether the topology ships traffic (`generate.py` beside it, example code)."""
    return settings.generator_path.exists()


def generator_spec(settings: StackSettings) -> PartSpec:
    """The topology's traffic generator, publishing through the gateway until stopped.
    It serves nothing to probe: supervised by exit only."""
    truth = settings.state_dir / "generator-truth.txt"
    args = ["generate", "--rate", str(settings.generator_rate), "--duration", "0", "--quiet",
            "--gateway", settings.gateway_url, "--truth", str(truth),
            "--topology", str(settings.topology_path)]
    if settings.gateway_token_file:
        args += ["--token-file", str(settings.gateway_token_file)]
    return _python_part(
        settings, "generator", args,
        f"traffic generator ({settings.generator_rate:g} events/s, injected ids in {truth.name})",
        lambda: True,
        [], env=token_env(settings),
    )
