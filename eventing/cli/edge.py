"""The CLI edge: what every `sluice` command takes from the outside world, taken once.

Configuration is read here and nowhere else: flags, then `SLUICE_*` environment
variables, then the defaults of the settings dataclasses (`StackSettings`,
`GatewaySettings`, `LakeSinkConfig` ...), turned into typed settings and passed down.
Process-wide set-up lives here too (logging, signals that end a foreground command,
tracing), and so does loading the topology, so its errors read the same everywhere.
The command modules only parse, call into the platform and print.

Why flag defaults are None and not the dataclasses' values: reading those values means
importing the modules that define them (pyiceberg, duckdb, uvicorn ...), which would add
seconds to every `sluice status`. A flag names its dataclass field instead
(`default_of`); `--help` shows that field's value and `Edge.given` passes a flag to
the dataclass only when the user gave it, so the dataclass default applies otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import inspect
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from eventing.stack.settings import (
    ENV_GATEWAY_TOKEN,
    ENV_QUERY_TOKEN,
    StackSettings,
    generator_path,
    load_settings,
)

if TYPE_CHECKING:
    from eventing.topology import Topology

ENV_STATE_DIR = "SLUICE_STATE_DIR"
ENV_PORT_OFFSET = "SLUICE_PORT_OFFSET"
ENV_PROJECT_DIR = "SLUICE_PROJECT_DIR"
ENV_BROKER_STORAGE = "SLUICE_BROKER_STORAGE"
ENV_GATEWAY_TOKEN_FILE = "SLUICE_GATEWAY_TOKEN_FILE"
ENV_TOPOLOGY = "SLUICE_TOPOLOGY"
# A lake sink on a cluster takes its S3 keys from a Secret through these (never flags).
ENV_S3_ACCESS_KEY = "SLUICE_S3_ACCESS_KEY"
ENV_S3_SECRET_KEY = "SLUICE_S3_SECRET_KEY"
LOG_FORMAT = "%(asctime)s %(name)s %(message)s"
LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]
# One line per registry lookup is noise, not news.
QUIET_LOGGERS = ("httpx", "httpx2")


class CommandFailed(Exception):
    """An expected failure: `main` prints `error: <message>` and exits with `code`."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class Edge:
    """One command's view of its flags, environment and settings, each read once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    # ------------------------------------------------------------------ settings

    @cached_property
    def settings(self) -> StackSettings:
        """The stack settings: flags, then env, then defaults, then what the state folder
        was started with (so `status`, `down` and every part agree on ports and storage)."""
        a = self.args
        offset = a.port_offset if a.port_offset is not None else int(
            os.environ.get(ENV_PORT_OFFSET, "0"))
        storage = getattr(a, "storage", None)
        settings = load_settings(
            state_dir=a.state_dir or os.environ.get(ENV_STATE_DIR),
            project_dir=self.project_dir,
            port_offset=offset,
            broker_storage=storage or os.environ.get(ENV_BROKER_STORAGE),
            pipeline=not getattr(a, "no_pipeline", False),
            generator=not getattr(a, "no_generator", False),
            generator_rate=getattr(a, "generator_rate", None),
            gateway_token_file=getattr(a, "token_file", None)
            or os.environ.get(ENV_GATEWAY_TOKEN_FILE),
            gateway_token=self.gateway_token(),
            query_token=self.query_token(),
            trace_sampling=getattr(a, "trace_sampling", None),
            trace_retention_s=getattr(a, "trace_retention", None),
            trace_max_bytes=getattr(a, "trace_max_size", None),
            broker_max_rss=getattr(a, "broker_max_rss", None) if a.command == "up" else None,
            topology=(getattr(a, "topology", None) if a.command == "up"
                      else None) or os.environ.get(ENV_TOPOLOGY),
            replicas=self.replicas,
        )
        if settings.settings_file.exists():
            # A state folder keeps the ports and broker storage it was first started
            # with, so `up` after `down` brings back the same stack (an s3 broker's
            # topics included); `up` may add the pipeline, and `up --storage` still wins.
            settings = settings.with_saved(keep_pipeline=a.command == "up")
            if storage:
                settings = dataclasses.replace(settings, broker_storage=storage)
        return settings

    @cached_property
    def project_dir(self) -> Path | None:
        """The project: `--project`, else env SLUICE_PROJECT_DIR, else the current folder
        when it holds `functions/topology.yaml` (a project made by `sluice new project`),
        else None (Sluice's own checkout, the example)."""
        given = getattr(self.args, "project", None) or os.environ.get(ENV_PROJECT_DIR)
        if given:
            path = Path(given)
            if not (path / "functions" / "topology.yaml").exists():
                raise CommandFailed(f"{path} is not a Sluice project: no functions/"
                                    "topology.yaml (`sluice new project DIR` makes one)")
            return path
        cwd = Path.cwd()
        return cwd if (cwd / "functions" / "topology.yaml").exists() else None

    @property
    def replicas(self) -> dict[str, int]:
        """`--replicas NAME=N` flags, checked: a bad one stops the command with the fix."""
        out: dict[str, int] = {}
        for item in getattr(self.args, "replicas", None) or ():
            name, sep, count = item.partition("=")
            if not sep or not name or not count.isdigit() or int(count) < 1:
                raise SystemExit(f"--replicas {item!r}: expected NAME=N with N >= 1, "
                                 "e.g. --replicas score=2")
            out[name] = int(count)
        return out

    def given(self, *names: str, **renamed: str) -> dict[str, Any]:
        """The flags the user gave, as settings keywords (`field=flag dest` to rename).

        Left-out flags are left out, so the settings dataclass's default applies.
        """
        pairs = [(n, n) for n in names] + list(renamed.items())
        return {field: getattr(self.args, dest) for field, dest in pairs
                if getattr(self.args, dest, None) is not None}

    # ------------------------------------------------------------------ topology

    @property
    def topology_path(self) -> Path:
        given = getattr(self.args, "topology", None)
        return Path(given) if given else self.settings.topology_path

    def topology(self) -> Topology:
        """The topology file (`--topology`, else the project's), or a clear error."""
        from eventing import topology as topo

        try:
            return topo.load(self.topology_path)
        except topo.TopologyError as exc:
            raise CommandFailed(str(exc)) from None

    def generator(self) -> ModuleType:
        """The topology's traffic generator (`generate.py` beside the topology file).

        Loaded from its file, not imported: it is example code, and no platform module
        imports an example module.
        """
        path = generator_path(self.topology_path.resolve())
        if not path.exists():
            raise CommandFailed(f"no traffic generator for this topology: {path} not found")
        spec = importlib.util.spec_from_file_location("sluice_topology_generate", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module

    # ------------------------------------------------------------------ process set-up

    def foreground(self, service_name: str) -> threading.Event:
        """Set up a long-running command: logging, tracing, and an Event that SIGINT or
        SIGTERM sets (`sluice down` sends SIGTERM) so it stops cleanly."""
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        for noisy in QUIET_LOGGERS:
            logging.getLogger(noisy).setLevel(logging.WARNING)
        self.tracing(service_name)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        return stop

    @staticmethod
    def interrupt_on_sigterm() -> None:
        """For a blocking loop that ends on Ctrl-C: make SIGTERM end it the same way."""
        signal.signal(signal.SIGTERM, _interrupt)

    def tracing(self, service_name: str, **resource: str) -> None:
        """This process's tracing: the standard `OTEL_*` variables, overridden by
        `--otlp-endpoint`, `--otlp-protocol`, `--service-name`, `--trace-sampling`
        (no endpoint from either: no spans). `resource` adds resource attributes."""
        from eventing.telemetry import tracing

        try:
            settings = tracing.settings_from_env(
                os.environ, service_name,
                endpoint=getattr(self.args, "otlp_endpoint", None),
                protocol=getattr(self.args, "otlp_protocol", None),
                service_name=getattr(self.args, "service_name", None),
                sampling=getattr(self.args, "trace_sampling", None))
        except ValueError as exc:
            raise SystemExit(f"sluice: tracing configuration: {exc}") from None
        function = getattr(self.args, "function", None)
        if isinstance(function, str):
            resource.setdefault("sluice.function", function)
        topology = getattr(self.args, "topology", None)
        if topology:
            resource.setdefault("sluice.topology", str(topology))
        if resource:
            settings = dataclasses.replace(settings, resource={**resource, **settings.resource})
        if settings.endpoint or settings.traces_endpoint:
            tracing.configure(dataclasses.replace(settings, business_ids=self.trace_ids()))

    def trace_ids(self) -> dict[str, str]:
        """The business ids the topology declares (`traceIds`: data field -> span
        attribute), for spans and for the trace store's index."""
        return dict(self.topology().trace_ids)

    def lake_config(self, **given: Any) -> Any:
        """Where the lake is and its keys: the S3 keys from the environment when set
        (a Secret on a cluster), else the local stack's state folder."""
        from eventing.tables.lakehouse import LakeConfig

        s = self.settings
        access, secret = os.environ.get(ENV_S3_ACCESS_KEY), os.environ.get(ENV_S3_SECRET_KEY)
        if bool(access) != bool(secret):
            raise CommandFailed(f"set both {ENV_S3_ACCESS_KEY} and {ENV_S3_SECRET_KEY}, "
                                "or neither (then the state folder's keys are used)")
        if not access:
            return LakeConfig.from_settings(s, **given)
        return LakeConfig(catalog_uri=s.iceberg_url, s3_endpoint=s.s3_endpoint,
                          access_key=access, secret_key=secret or "",
                          warehouse=f"s3://{s.warehouse_bucket}", region=s.region, **given)

    @staticmethod
    def gateway_token() -> str | None:
        """The gateway's bearer token from the environment (never a flag: `ps` shows flags)."""
        return os.environ.get(ENV_GATEWAY_TOKEN) or None

    @staticmethod
    def rollover_hold_at() -> str | None:
        """Tests only: the rollover step to hold (sleep) before, so a test can kill -9
        the rollover at a known point (`eventing.stack.rollover.ENV_HOLD_AT`)."""
        from eventing.stack.rollover import ENV_HOLD_AT

        return os.environ.get(ENV_HOLD_AT) or None

    @staticmethod
    def query_token() -> str | None:
        """The real-time server's query token from the environment (never a flag)."""
        return os.environ.get(ENV_QUERY_TOKEN) or None


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


# ---------------------------------------------------------------------- parser helpers


Command = Callable[[Edge], int]


def location_flags(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """`--state-dir` and `--port-offset`: before the command or after it.

    After a command the defaults are suppressed, so a value given before it survives.
    """
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--state-dir", default=default,
                        help=f"state folder (default ./.state, env {ENV_STATE_DIR})")
    parser.add_argument("--port-offset", type=int, default=default,
                        help=f"shift every default port by N (env {ENV_PORT_OFFSET})")
    parser.add_argument("--project", default=default, metavar="DIR",
                        help="the project (its functions/topology.yaml and schemas/; default: "
                             f"the current folder if it is one, env {ENV_PROJECT_DIR})")


def add_command(sub: argparse._SubParsersAction, name: str, run: Command | None, *,
                help: str, example: str) -> argparse.ArgumentParser:
    """A `sluice <name>` command taking the location flags, run with an `Edge`.

    `help` is its one-line description (the command list of `sluice --help` shows it)
    and `example` one or more command lines its own `--help` ends with.
    """
    parser = sub.add_parser(name, description=help, formatter_class=HelpFormatter,
                            epilog="example:\n" + "\n".join(
                                f"  {line}" for line in example.strip().splitlines()))
    parser.summary = help  # type: ignore[attr-defined]
    location_flags(parser, suppress=True)
    if run is not None:
        parser.set_defaults(run=run)
    return parser


def settings_flag(parser: argparse.ArgumentParser, *flags: str, default_of: str, help: str,
                  **kwargs: Any) -> argparse.Action:
    """A flag whose default is a settings field's, e.g.
    `default_of="eventing.tables.lake:LakeSinkConfig.batch_size"` (a dataclass field or
    a function parameter). The parsed value is None unless given: see `Edge.given`.
    `help` is required: argparse shows no default for a flag without one."""
    action = parser.add_argument(*flags, default=None, help=help, **kwargs)
    action.default_of = default_of  # type: ignore[attr-defined]
    return action


def settings_default(ref: str) -> Any:
    """The value `ref` (`module:Owner.name`) names: imported only when asked for."""
    module, _, attr = ref.partition(":")
    owner_name, _, name = attr.rpartition(".")
    owner: Any = importlib.import_module(module)
    for part in owner_name.split("."):
        owner = getattr(owner, part)
    if dataclasses.is_dataclass(owner):
        for f in dataclasses.fields(owner):
            if f.name == name:
                if f.default is not dataclasses.MISSING:
                    return f.default
                return f.default_factory()  # type: ignore[misc]
        raise KeyError(ref)
    return inspect.signature(owner).parameters[name].default


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows a settings flag's default, read from its dataclass only when help is shown;
    keeps the line breaks of descriptions and examples."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        ref = getattr(action, "default_of", None)
        if ref is None:
            return text
        return f"{text} (default {str(settings_default(ref)).replace('%', '%%')})"


def duration_arg(text: str) -> float:
    """An argparse type: `1h`, `30m`, `250ms` -> seconds, or the parser's usage error."""
    from eventing.units import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def size_arg(text: str) -> int:
    """An argparse type: `1GiB`, `200MB` -> bytes, or the parser's usage error."""
    from eventing.units import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def tracing_flags(parser: argparse.ArgumentParser, service_name: str) -> None:
    parser.add_argument("--otlp-endpoint", help="export spans over OTLP to this collector "
                        "(e.g. http://127.0.0.1:4318; default OTEL_EXPORTER_OTLP_ENDPOINT, "
                        "else no spans; `sluice up` sets it)")
    parser.add_argument("--otlp-protocol", choices=("http/protobuf", "grpc"),
                        help="OTLP transport (default OTEL_EXPORTER_OTLP_PROTOCOL, else "
                             "http/protobuf; grpc wants the collector's :4317)")
    parser.add_argument("--service-name", help=f"service.name of the spans "
                        f"(default {service_name})")
    settings_flag(parser, "--trace-sampling", type=float,
                  default_of="eventing.telemetry.tracing:TracingSettings.sampling",
                  help="share of new traces recorded, 0..1 (a sampled or unsampled "
                       "incoming traceparent is obeyed)")
