"""Compose the parts of the local stack: start in dependency order, report, stop.

Order matters: the broker may keep its log in the object store, the registry keeps its
log in the broker, the trace store receives spans from the collector so it starts
first (spans never pass through the broker). `up` waits for each part's health check
before starting the next one, so a failure names the part that failed rather than the
first part that noticed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from eventing import topology as topo
from eventing.kafka import ensure_topics
from eventing.registry.files import Registered, register_all
from eventing.stack import (
    broker,
    collector,
    lakesink,
    objectstore,
    pipeline,
    prometheus,
    realtime,
    registry,
    retention,
    rollover,
    tracestore,
    watchdog,
)
from eventing.stack.process import (
    PartRecord,
    PartSpec,
    ProcessDir,
    is_alive,
    tail,
    wait_healthy,
)
from eventing.stack.settings import Ports, StackSettings

SpecFactory = Callable[[StackSettings], PartSpec]


class StackError(RuntimeError):
    """A part failed to start; the message names it and carries its log's tail."""


@dataclass
class PartStatus:
    name: str
    pid: int | None
    endpoint: str
    running: bool
    healthy: bool
    uptime_s: float | None
    log: str | None
    # From the supervisor: Running | Waiting | CrashLoopBackOff, restarts, why it last exited.
    state: str | None = None
    restarts: int = 0
    last_exit_reason: str | None = None

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "pid": self.pid,
            "endpoint": self.endpoint,
            "running": self.running,
            "healthy": self.healthy,
            "uptime_s": None if self.uptime_s is None else round(self.uptime_s, 1),
            "log": self.log,
            "state": self.state,
            "restarts": self.restarts,
            "last_exit_reason": self.last_exit_reason,
        }


def core_parts(settings: StackSettings) -> list[SpecFactory]:
    """The infrastructure parts, in start order."""
    parts: list[SpecFactory] = []
    if settings.broker_storage == "s3":
        parts.append(objectstore.spec)
    parts.append(broker.spec)
    if settings.broker_storage != "s3":
        parts.append(objectstore.spec)
    parts += [registry.spec, tracestore.spec, collector.spec, prometheus.spec, realtime.spec]
    if settings.pipeline:
        parts += [pipeline.gateway_spec, *pipeline.function_specs(settings)]
        if lakesink.has_tables(settings):
            parts.append(lakesink.spec)
        if settings.generator and pipeline.has_generator(settings):
            parts.append(pipeline.generator_spec)
        # Tansu trims nothing itself: s3 storage is trimmed from outside, a memory
        # broker is rolled over (drained) above its RSS cap.
        parts.append(retention.spec)
    return parts


class Stack:
    """The local stack of one state folder."""

    def __init__(self, settings: StackSettings, extra: list[SpecFactory] | None = None) -> None:
        self.settings = settings
        self.procs = ProcessDir(settings.state_dir, settings.log_rotation)
        self.factories = core_parts(settings) + list(extra or [])

    def running(self) -> list[PartRecord]:
        return [r for r in self.procs.records() if is_alive(r)]

    def check_ports(self, specs: list[PartSpec]) -> None:
        """Refuse, before anything starts, when a port of a part still to start is taken.

        Two stacks whose port offsets differ by the distance between two of Sluice's
        ports (8333 + 4000 = 9333 + 3000) would share a listener; no layout avoids that
        for every pair of offsets, so `up` checks the whole layout first and names a
        free offset, rather than failing half-way (or, on a gRPC port, after start).
        """
        busy = [f"{spec.name} {p}" for spec in specs
                if not ((r := self.procs.record(spec.name)) and is_alive(r))
                for p in spec.ports if not can_bind(self.settings.host, p)]
        if busy:
            hint = free_offset(self.settings.host, {p for s in specs for p in s.ports},
                               self.settings.ports.broker - Ports().broker)
            raise StackError(
                f"port(s) already in use on {self.settings.host}: {', '.join(busy)} (another "
                "program, or another Sluice stack whose --port-offset collides with this "
                "one's). Stop it, or start this stack on other ports: "
                + (f"`sluice up --port-offset {hint}` is free now." if hint is not None
                   else "`sluice up --port-offset N`."))

    def after_healthy(self, spec: PartSpec, log: Callable[[str], None] = print
                      ) -> list[Registered]:
        """What a part needs once it is healthy (also after the supervisor restarted it):
        the broker its topics (a memory broker comes back empty), the registry the
        project's schemas."""
        if spec.name == broker.NAME:
            topics = {self.settings.schemas_topic: 1}
            if self.settings.pipeline:
                topics |= topo.load(self.settings.topology_path).all_topics()
            ensure_topics(self.settings.bootstrap, topics)
        if spec.name == registry.NAME:
            registered = register_all(self.settings.registry_url, self.settings.schemas_dir)
            for r in registered:
                log(f"  {'':<12} schema {r.subject} -> id {r.schema_id}")
            return registered
        return []

    def up(self, log: Callable[[str], None] = print) -> list[Registered]:
        """Start every part not already running; wait for health; register schemas;
        leave the supervisor running. It is stopped first, so it never races `up`."""
        self.stop_supervisor()
        self.settings.save()
        registered: list[Registered] = []
        specs = [factory(self.settings) for factory in self.factories]
        self.check_ports([*specs, watchdog_spec(self.settings)])
        for spec in specs:
            record = self.procs.record(spec.name)
            if record and is_alive(record):
                log(f"  {spec.name:<12} already running (pid {record.pid})")
                continue
            record = self.procs.start(spec)
            problem = wait_healthy(spec, record)
            if problem:
                self.procs.stop(record, timeout=5)
                raise StackError(
                    f"{spec.name} failed to start: {problem}\n"
                    f"--- last lines of {record.log} ---\n{tail(record.log)}"
                )
            log(f"  {spec.name:<12} up   {spec.endpoint}")
            registered = self.after_healthy(spec, log) or registered
        # Parts added to a running stack (`up` after `up --no-pipeline`) get scraped too.
        prometheus.reload(self.settings)
        spec = watchdog_spec(self.settings)
        record = self.procs.start(spec)
        problem = wait_healthy(spec, record)
        if problem:
            raise StackError(f"{spec.name} failed to start: {problem}\n"
                             f"--- last lines of {record.log} ---\n{tail(record.log)}")
        log(f"  {spec.name:<12} up   {spec.endpoint}")
        return registered

    def stop_supervisor(self) -> bool:
        record = self.procs.record(watchdog.NAME)
        return bool(record) and self.procs.stop(record, timeout=5)

    def supervise(self) -> watchdog.Supervisor:
        """The supervisor of this stack (what `sluice supervise` runs)."""
        def parts():
            for factory in self.factories:
                spec = factory(self.settings)
                yield spec.name, (lambda f=factory: f(self.settings))

        return watchdog.Supervisor(parts, self.procs, self.settings.state_dir,
                                   after_healthy=lambda spec: self.after_healthy(spec, _quiet),
                                   liveness=self.settings.liveness,
                                   log_rotation=self.settings.log_rotation,
                                   may_start_held=lambda: not rollover.under_way(
                                       self.settings.state_dir),
                                   rollover_restarts=frozenset({broker.NAME}))

    def status(self) -> list[PartStatus]:
        out: list[PartStatus] = []
        now = time.time()
        supervised = watchdog.load_states(self.settings.state_dir)
        for factory in [*self.factories, watchdog_spec]:
            spec = factory(self.settings)
            record = self.procs.record(spec.name)
            alive = bool(record and is_alive(record))
            healthy = False
            if alive:
                try:
                    healthy = bool(spec.health())
                except Exception:  # noqa: BLE001 - a failing probe is "unhealthy"
                    healthy = False
            out.append(PartStatus(
                name=spec.name,
                pid=record.pid if alive and record else None,
                endpoint=spec.endpoint,
                running=alive,
                healthy=healthy,
                uptime_s=(now - record.started_at) if alive and record else None,
                log=record.log if record else None,
                state=supervised.get(spec.name, {}).get("state"),
                restarts=supervised.get(spec.name, {}).get("restarts", 0),
                last_exit_reason=supervised.get(spec.name, {}).get("last_exit_reason"),
            ))
        return out

    def down(self, purge: bool = False, log: Callable[[str], None] = print) -> None:
        """Stop, in reverse start order, every process this state folder started."""
        # The supervisor first, or it would restart what is being stopped.
        if self.stop_supervisor():
            log(f"  {watchdog.NAME:<12} stopped")
        known = {r.name: r for r in self.procs.records()}
        order = [f(self.settings).name for f in self.factories]
        names = [n for n in reversed(order) if n in known]
        names += [n for n in known if n not in names]  # parts of an older topology
        for name in names:
            stopped = self.procs.stop(known[name])
            log(f"  {name:<12} {'stopped' if stopped else 'was not running'}")
        if purge:
            _purge(self.settings.state_dir)
            log(f"  removed {self.settings.state_dir}")


def _quiet(_: str) -> None:
    pass


def watchdog_spec(settings: StackSettings) -> PartSpec:
    """The supervisor as a part: `sluice supervise`, metrics on `ports.supervisor`."""
    from eventing.stack.health import http_status
    from eventing.stack.pipeline import _python_part

    port = settings.ports.supervisor
    url = f"http://{settings.host}:{port}"
    spec = _python_part(
        settings, watchdog.NAME, ["--state-dir", str(settings.state_dir), "supervise"],
        f"supervisor: restarts parts that exit (metrics {url}/metrics)",
        lambda: http_status(url + "/healthz") == 200, [port])
    return spec


def can_bind(host: str, port: int) -> bool:
    """Whether a server could listen on `port` now. Stricter than a connect probe: a port
    bound by a socket that does not listen (yet) counts as taken too."""
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_offset(host: str, ports: set[int], current: int) -> int | None:
    """A port offset (multiple of 100, 20000 at most) whose shift of `ports` is all free."""
    base = {p - current for p in ports}
    for offset in range(100, 20001, 100):
        if offset != current and all(can_bind(host, p + offset) for p in base):
            return offset
    return None


def _purge(state_dir: Path) -> None:
    # Guard against a mistyped --state-dir wiping something that is not ours.
    if state_dir.exists() and not (state_dir / "stack.json").exists():
        raise StackError(f"{state_dir} does not look like a Sluice state folder; not deleting")
    shutil.rmtree(state_dir, ignore_errors=True)
