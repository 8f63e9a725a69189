"""A function host's configuration contract: its environment, entry file and command.

What `eventing.deploy` (images, Knative Services) and local processes need to start a
function's HTTP host (`eventing.fn.host`), kept apart from the server so that building
manifests imports neither Flask nor the function runtime. The host is an ordinary
`functions-framework` HTTP target, started as `serve_command` says:

    functions-framework --source <entry file> --target handle --signature-type http \\
        --port $PORT [--host 127.0.0.1]

`write_entry_file` writes that entry file. It is the only place that reads the
environment (the edge: it hands `os.environ` to `eventing.fn.host.handler_from_env`);
the variable names are the `ENV_*` constants below, which the deploy generator uses for
a Knative Service's `env` section:

    SLUICE_FUNCTION_NAME      function name (the `source` of events it returns)
    SLUICE_FUNCTION_SOURCE    path of the function's source file (main.py)
    SLUICE_FUNCTION_TARGET    the function's name in that file (default: name, - → _)
    SLUICE_OUTPUTS            JSON: {"topic": ["event type" | "*", ...]} or ["topic", ...]
    KAFKA_BOOTSTRAP_SERVERS   where outputs are produced (needed when there are outputs)
    SCHEMA_REGISTRY_URL       Avro decode/encode (optional: without it, JSON or bytes only)

Tracing (`eventing.telemetry.tracing`, the OpenTelemetry SDK) follows the standard
OpenTelemetry variables: `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` (unset = no spans),
`OTEL_EXPORTER_OTLP_PROTOCOL` (`http/protobuf` or `grpc`), `OTEL_EXPORTER_OTLP_HEADERS`,
`OTEL_SERVICE_NAME` (default: the function name), `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` (default parent-based, ratio 1).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from eventing.topology import Delivery, Function

ENV_FUNCTION_NAME = "SLUICE_FUNCTION_NAME"
ENV_SOURCE = "SLUICE_FUNCTION_SOURCE"
ENV_TARGET = "SLUICE_FUNCTION_TARGET"
ENV_OUTPUTS = "SLUICE_OUTPUTS"
ENV_BOOTSTRAP = "KAFKA_BOOTSTRAP_SERVERS"
ENV_REGISTRY = "SCHEMA_REGISTRY_URL"
# The topology's business ids (`traceIds`) as JSON {data field: span attribute}.
ENV_TRACE_IDS = "SLUICE_TRACE_IDS"
ENV_NAMES = (ENV_FUNCTION_NAME, ENV_SOURCE, ENV_TARGET, ENV_OUTPUTS, ENV_BOOTSTRAP, ENV_REGISTRY)

ENTRY_TARGET = "handle"  # the functions-framework --target of every entry file


class HostConfigError(ValueError):
    """The host's configuration (environment of the entry file) is incomplete or wrong."""


def function_env(function: Function, bootstrap: str | None,
                 registry_url: str | None) -> dict[str, str]:
    """The environment that configures a host for `function` (Knative `env`, local process)."""
    env = {
        ENV_FUNCTION_NAME: function.name,
        ENV_SOURCE: str(function.source),
        ENV_TARGET: function.target,
        ENV_OUTPUTS: json.dumps({t: list(types) for t, types in function.outputs.items()}),
    }
    if bootstrap:
        env[ENV_BOOTSTRAP] = bootstrap
    if registry_url:
        env[ENV_REGISTRY] = registry_url
    return env


def function_from_env(env: Mapping[str, str]) -> tuple[Function, str | None, str | None]:
    """Parse `function_env`'s variables back into (function, bootstrap, registry_url).

    Only what the host needs is set; subscription fields (topics, delivery) belong to
    whoever delivers events, so they keep their defaults.
    """
    source = env.get(ENV_SOURCE)
    if not source:
        raise HostConfigError(f"{ENV_SOURCE} is not set: the path of the function's main.py")
    path = Path(source)
    main = path / "main.py" if path.is_dir() else path
    name = env.get(ENV_FUNCTION_NAME) or main.parent.name
    raw_outputs = env.get(ENV_OUTPUTS) or "{}"
    try:
        outputs = json.loads(raw_outputs)
    except json.JSONDecodeError as exc:
        raise HostConfigError(f"{ENV_OUTPUTS} is not JSON: {exc}") from None
    if isinstance(outputs, list):
        outputs = {t: ["*"] for t in outputs}
    if not isinstance(outputs, dict) or not all(isinstance(t, str) for t in outputs):
        raise HostConfigError(f'{ENV_OUTPUTS}: use {{"topic": ["type", ...]}} or ["topic", ...]')
    bootstrap = env.get(ENV_BOOTSTRAP) or None
    if outputs and not bootstrap:
        raise HostConfigError(f"{ENV_BOOTSTRAP} is not set but the function has outputs")
    function = Function(
        name=name,
        source=main,
        target=env.get(ENV_TARGET) or name.replace("-", "_"),
        topics=(),
        consumer_group="",
        outputs={t: tuple([types] if isinstance(types, str) else types or ["*"])
                 for t, types in outputs.items()},
        delivery=Delivery(),
        invoke="http",
    )
    return function, bootstrap, env.get(ENV_REGISTRY) or None


def tracing_from_env(env: Mapping[str, str], service_name: str) -> Any:
    """`TracingSettings` from the standard OpenTelemetry variables, or None (no endpoint)."""
    from eventing.telemetry.tracing import settings_from_env

    try:
        settings = settings_from_env(env, service_name)
    except ValueError as exc:
        raise HostConfigError(str(exc)) from None
    if not (settings.endpoint or settings.traces_endpoint):
        return None
    try:
        business_ids = json.loads(env.get(ENV_TRACE_IDS) or "{}")
        if not isinstance(business_ids, dict):
            raise ValueError
    except ValueError:
        raise HostConfigError(f"{ENV_TRACE_IDS} must be a JSON object "
                              '{"data field": "span attribute"}') from None
    import dataclasses

    return dataclasses.replace(settings, business_ids=business_ids,
                               resource={"sluice.function": service_name, **settings.resource})


_ENTRY_HEADER = '''"""Sluice function host entry, written by eventing.fn.env.write_entry_file.

Run: functions-framework --source {path} --target {target} --signature-type http --port $PORT
"""
'''


def write_entry_file(function: Function | None, path: str | os.PathLike[str],
                     bootstrap: str | None = None, registry_url: str | None = None) -> Path:
    """Write the functions-framework entry file that defines `handle`.

    With `function=None` the file reads its configuration from the process environment
    (the `ENV_*` variables): that is the file a container image carries. With a function,
    the same variables are written into the file, so a local process needs no environment.
    """
    path = Path(path)
    text = _ENTRY_HEADER.format(path=path.name, target=ENTRY_TARGET)
    if function is None:
        text += f"import os\n\nfrom eventing.fn.host import handler_from_env\n\n" \
                f"{ENTRY_TARGET} = handler_from_env(os.environ)\n"
    else:
        env = function_env(function, bootstrap, registry_url)
        text += f"from eventing.fn.host import handler_from_env\n\nENV = {env!r}\n\n" \
                f"{ENTRY_TARGET} = handler_from_env(ENV)\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def serve_command(entry: str | os.PathLike[str], port: int, *, host: str = "127.0.0.1",
                  executable: str = "functions-framework") -> list[str]:
    """The command line that serves an entry file (Knative images pass host 0.0.0.0)."""
    return [executable, "--source", str(entry), "--target", ENTRY_TARGET,
            "--signature-type", "http", "--host", host, "--port", str(port)]
