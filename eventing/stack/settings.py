"""Typed settings for the local stack, read once at the CLI edge and passed down.

Why a port offset instead of one flag per port: SeaweedFS alone opens a dozen listeners,
and a test run must start a second stack beside a developer's running one without a
clash. Shifting every default by one number keeps the well-known ports (9092, 8081,
8333 …) for the normal case and makes a parallel stack a single flag.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

BrokerStorage = Literal["memory", "s3"]
# The environment variable that carries the gateway's bearer token to the parts that need it.
ENV_GATEWAY_TOKEN = "SLUICE_GATEWAY_TOKEN"
ENV_QUERY_TOKEN = "SLUICE_QUERY_TOKEN"


@dataclass(frozen=True)
class Ports:
    """Every TCP port the local stack listens on (all on the loopback host)."""

    broker: int = 9092
    registry: int = 8081
    gateway: int = 8080
    dispatcher_metrics: int = 9464  # one port per function from here upwards
    realtime: int = 8090
    lake_metrics: int = 9480
    supervisor: int = 9479  # the supervisor's /metrics and /healthz
    s3: int = 8333
    iceberg: int = 8181
    prometheus: int = 9090
    otlp_grpc: int = 4317
    otlp_http: int = 4318
    tracestore: int = 4319  # the trace store's OTLP/HTTP receiver (the collector exports to it)
    # SeaweedFS internals: named explicitly, or `weed mini` binds defaults of its own.
    weed_master: int = 9333
    weed_master_grpc: int = 19333
    weed_volume: int = 8380
    weed_volume_grpc: int = 18380
    weed_filer: int = 8888
    weed_filer_grpc: int = 18888
    weed_s3_grpc: int = 18333
    weed_metrics: int = 9327
    weed_debug: int = 6060
    weed_admin: int = 23646
    weed_admin_grpc: int = 33646

    def shifted(self, offset: int) -> Ports:
        """Return the same layout moved by `offset` (e.g. 20000 for a test stack)."""
        return Ports(**{f.name: getattr(self, f.name) + offset for f in fields(self)})

    def all(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Credentials:
    """S3 keys for the embedded object store, generated per state folder, never in git."""

    access_key: str
    secret_key: str

    @staticmethod
    def load_or_create(path: Path) -> Credentials:
        if path.exists():
            data = json.loads(path.read_text())
            return Credentials(data["access_key"], data["secret_key"])
        creds = Credentials("sluice" + secrets.token_hex(4), secrets.token_urlsafe(24))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"access_key": creds.access_key, "secret_key": creds.secret_key}, fh)
        return creds

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return f"Credentials(access_key={self.access_key!r}, secret_key='***')"


@dataclass(frozen=True)
class Liveness:
    """How the supervisor finds a hung part (Kubernetes' livenessProbe, same names).

    Each part's cheap liveness endpoint is probed every `period_s` with `timeout_s`;
    after `failure_threshold` failures in a row the part is killed (SIGTERM, SIGKILL
    after `termination_grace_s`) and restarted under the usual backoff. Probes start
    counting once a probe passed after a start, or `startup_grace_s` after it (the
    part's own start timeout when longer), so a slow start is not killed.

    Why these values rather than the kubelet's (10 s, 1 s, 3): on a shared 2-core machine
    at load average 30, probes took up to 0.78 s (HTTP) and 1.76 s (the broker's Kafka
    probe; `benchmarks/liveness_probes.py`), so a 1 s timeout would flap; 5 s x 3 in a
    row still ends a hang in about 30-45 s, what a kill -9 restart costs here anyway.
    """

    period_s: float = 10.0
    timeout_s: float = 5.0
    failure_threshold: int = 3
    startup_grace_s: float = 60.0
    termination_grace_s: float = 10.0


@dataclass(frozen=True)
class LogRotation:
    """Bound on each part's log: rotated at `max_bytes`, `keep` old files kept.

    Why: a part writes to `logs/<part>.log` for as long as the stack runs (days of `make
    up`); at the default 10 MiB x (1 + 5) a part's logs stay under 60 MiB.
    """

    max_bytes: int = 10 * 1024 * 1024
    keep: int = 5


@dataclass(frozen=True)
class StackSettings:
    """Everything `sluice up` needs to know, resolved before any process starts."""

    state_dir: Path
    project_dir: Path
    host: str = "127.0.0.1"
    ports: Ports = field(default_factory=Ports)
    broker_storage: BrokerStorage = "memory"
    broker_bucket: str = "tansu"
    warehouse_bucket: str = "warehouse"
    schemas_topic: str = "_schemas"
    region: str = "us-east-1"
    # Start the gateway and the topology's functions after the infrastructure.
    pipeline: bool = True
    generator: bool = True
    generator_rate: float = 20.0
    gateway_token_file: Path | None = None
    # The bearer token itself (env SLUICE_GATEWAY_TOKEN): handed to the gateway and the
    # generator through their environment, never a flag or the settings file.
    gateway_token: str | None = field(default=None, repr=False, compare=False)
    # The real-time server's query token (env SLUICE_QUERY_TOKEN), the same way.
    query_token: str | None = field(default=None, repr=False, compare=False)
    # Root sampling ratio of the pipeline's traces (parent-based; see eventing.telemetry.tracing).
    trace_sampling: float = 1.0
    # Trace store bounds; None leaves `eventing.telemetry.traces.RetentionPolicy`'s default.
    trace_retention_s: float | None = None
    trace_max_bytes: int | None = None
    # Memory broker: RSS above which the `retention` part rolls it over; None leaves
    # `eventing.stack.rollover.RolloverSettings`'s default.
    broker_max_rss: int | None = None
    # The pipeline this stack runs (`sluice up --topology`); None: the payments example.
    topology_file: Path | None = None
    # Processes per function in one consumer group, where `--replicas NAME=N` overrides the
    # topology's `scale.min` (at least 1): see `pipeline.replica_count`.
    replicas: tuple[tuple[str, int], ...] = ()
    # The supervisor's liveness probes and the parts' log bound (defaults live here).
    liveness: Liveness = field(default_factory=Liveness)
    log_rotation: LogRotation = field(default_factory=LogRotation)

    # SeaweedFS bounds (eventing/stack/objectstore.py says why): its filer's metadata log
    # is kept this long, a volume is compacted once this share of it is deleted (each
    # janitor round, every filer_log_keep_s / 2), and Go's soft memory limit for `weed
    # mini` (GOMEMLIMIT, bytes).
    filer_log_keep_s: float = 300.0
    objectstore_garbage_threshold: float = 0.1
    objectstore_memory_limit: int = 512 << 20
    # Prometheus keeps this much (its defaults: 15 days, no size bound): what a local
    # stack's dashboards and alerts look at, not an archive.
    metrics_retention: str = "2d"
    metrics_max_size: str = "512MB"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.ports.broker}"

    @property
    def registry_url(self) -> str:
        return f"http://{self.host}:{self.ports.registry}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.ports.s3}"

    @property
    def iceberg_url(self) -> str:
        return f"http://{self.host}:{self.ports.iceberg}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.host}:{self.ports.prometheus}"

    @property
    def realtime_url(self) -> str:
        return f"http://{self.host}:{self.ports.realtime}"

    @property
    def otlp_http_url(self) -> str:
        """Where the pipeline's processes export spans (the collector's OTLP/HTTP)."""
        return f"http://{self.host}:{self.ports.otlp_http}"

    @property
    def tracestore_url(self) -> str:
        """The trace store's OTLP/HTTP receiver (the collector's exporter endpoint)."""
        return f"http://{self.host}:{self.ports.tracestore}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host}:{self.ports.gateway}"

    @property
    def gateway_requires_token(self) -> bool:
        """Whether the gateway must refuse unauthenticated events (a token or token file)."""
        return bool(self.gateway_token or self.gateway_token_file)

    @property
    def schemas_dir(self) -> Path:
        """The topology's schemas (its `schemas:` key, else `schemas/` beside it), so each
        pipeline registers its own."""
        from eventing import topology as topo

        return topo.load(self.topology_path).schemas

    @property
    def topology_path(self) -> Path:
        return self.topology_file or self.project_dir / "functions" / "topology.yaml"

    @property
    def generator_path(self) -> Path:
        """The example's traffic generator, if the topology ships one (`sluice up` runs it)."""
        return generator_path(self.topology_path)

    @property
    def credentials(self) -> Credentials:
        return Credentials.load_or_create(self.state_dir / "credentials.json")

    # The settings file pins a state folder to the ports and storage it was started
    # with, so `status` and `down` need no flags and never guess.
    @property
    def settings_file(self) -> Path:
        return self.state_dir / "stack.json"

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "host": self.host,
            "ports": self.ports.all(),
            "broker_storage": self.broker_storage,
            "pipeline": self.pipeline,
            "generator": self.generator,
            "topology": str(self.topology_file) if self.topology_file else None,
            "replicas": [list(r) for r in self.replicas],
        }
        self.settings_file.write_text(json.dumps(data, indent=2))

    def with_saved(self, *, keep_pipeline: bool = False) -> StackSettings:
        """Return these settings overridden by what the state folder was started with.

        `keep_pipeline` keeps this request's choice of starting the pipeline, so a
        second `up` can add the gateway and functions to a running infrastructure.
        """
        if not self.settings_file.exists():
            return self
        data = json.loads(self.settings_file.read_text())
        return replace(
            self,
            host=data.get("host", self.host),
            ports=saved_ports(data["ports"]),
            broker_storage=data.get("broker_storage", self.broker_storage),
            pipeline=self.pipeline if keep_pipeline else data.get("pipeline", self.pipeline),
            generator=self.generator if keep_pipeline else data.get("generator", self.generator),
            topology_file=(self.topology_file if keep_pipeline and self.topology_file
                           else Path(data["topology"]) if data.get("topology")
                           else self.topology_file),
            replicas=self.replicas if keep_pipeline and self.replicas else tuple(
                (str(n), int(c)) for n, c in data.get("replicas", self.replicas)),
        )


def saved_ports(saved: dict[str, int]) -> Ports:
    """The ports a state folder was started with; ports added to Sluice since then take
    the same offset (read from the broker's port) so an older state folder still works."""
    offset = saved.get("broker", Ports.broker) - Ports.broker
    known = {f.name for f in fields(Ports)}
    return replace(Ports().shifted(offset), **{k: v for k, v in saved.items() if k in known})


def generator_path(topology_path: Path) -> Path:
    """Where a topology's traffic generator lives: `generate.py` beside the topology file.

    Traffic is example-specific (the payments example publishes card payments), so it
    lives with the example and the platform only knows where to look.
    """
    return topology_path.parent / "generate.py"


def default_project_dir() -> Path:
    """The source checkout that holds `schemas/`, `functions/` and `infra/`."""
    return Path(__file__).resolve().parents[2]


def load_settings(
    *,
    state_dir: str | os.PathLike[str] | None = None,
    port_offset: int = 0,
    broker_storage: BrokerStorage | None = None,
    project_dir: str | os.PathLike[str] | None = None,
    pipeline: bool = True,
    generator: bool = True,
    generator_rate: float | None = None,
    gateway_token_file: str | os.PathLike[str] | None = None,
    gateway_token: str | None = None,
    query_token: str | None = None,
    trace_sampling: float | None = None,
    trace_retention_s: float | None = None,
    trace_max_bytes: int | None = None,
    broker_max_rss: int | None = None,
    topology: str | os.PathLike[str] | None = None,
    replicas: dict[str, int] | None = None,
) -> StackSettings:
    """Build settings from explicit values; the CLI maps flags and env vars onto these.

    A value left None takes the `StackSettings` default, the one place defaults live.
    """
    project = Path(project_dir) if project_dir else default_project_dir()
    state = Path(state_dir) if state_dir else project / ".state"
    optional = {"generator_rate": generator_rate, "trace_sampling": trace_sampling}
    settings = StackSettings(
        state_dir=state.resolve(),
        project_dir=project.resolve(),
        ports=Ports().shifted(port_offset),
        pipeline=pipeline,
        generator=generator,
        gateway_token_file=Path(gateway_token_file).resolve() if gateway_token_file else None,
        trace_retention_s=trace_retention_s,
        trace_max_bytes=trace_max_bytes,
        broker_max_rss=broker_max_rss,
        gateway_token=gateway_token or None,
        query_token=query_token or None,
        topology_file=Path(topology).resolve() if topology else None,
        replicas=tuple(sorted((replicas or {}).items())),
        **{k: v for k, v in optional.items() if v is not None},
    )
    if broker_storage:
        settings = replace(settings, broker_storage=broker_storage)
    return settings
