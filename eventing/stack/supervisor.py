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
    tracestore,
)
from eventing.stack.process import (
    PartRecord,
    PartSpec,
    ProcessDir,
    is_alive,
    port_open,
    tail,
    wait_healthy,
)
from eventing.stack.settings import StackSettings

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

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "pid": self.pid,
            "endpoint": self.endpoint,
            "running": self.running,
            "healthy": self.healthy,
            "uptime_s": None if self.uptime_s is None else round(self.uptime_s, 1),
            "log": self.log,
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
    return parts


class Stack:
    """The local stack of one state folder."""

    def __init__(self, settings: StackSettings, extra: list[SpecFactory] | None = None) -> None:
        self.settings = settings
        self.procs = ProcessDir(settings.state_dir)
        self.factories = core_parts(settings) + list(extra or [])

    def running(self) -> list[PartRecord]:
        return [r for r in self.procs.records() if is_alive(r)]

    def up(self, log: Callable[[str], None] = print) -> list[Registered]:
        """Start every part not already running; wait for health; register schemas."""
        self.settings.save()
        registered: list[Registered] = []
        for factory in self.factories:
            spec = factory(self.settings)
            record = self.procs.record(spec.name)
            if record and is_alive(record):
                log(f"  {spec.name:<12} already running (pid {record.pid})")
                continue
            busy = [p for p in spec.ports if port_open(self.settings.host, p, timeout=0.2)]
            if busy:
                raise StackError(
                    f"{spec.name}: port(s) {', '.join(map(str, busy))} on {self.settings.host} "
                    "are already in use by another program. Stop it, or start Sluice on "
                    "other ports with `sluice up --port-offset N`."
                )
            record = self.procs.start(spec)
            problem = wait_healthy(spec, record)
            if problem:
                self.procs.stop(record, timeout=5)
                raise StackError(
                    f"{spec.name} failed to start: {problem}\n"
                    f"--- last lines of {record.log} ---\n{tail(record.log)}"
                )
            log(f"  {spec.name:<12} up   {spec.endpoint}")
            if spec.name == broker.NAME:
                topics = {self.settings.schemas_topic: 1}
                if self.settings.pipeline:
                    topics |= topo.load(self.settings.topology_path).all_topics()
                ensure_topics(self.settings.bootstrap, topics)
            if spec.name == registry.NAME:
                registered = register_all(self.settings.registry_url, self.settings.schemas_dir)
                for r in registered:
                    log(f"  {'':<12} schema {r.subject} -> id {r.schema_id}")
        # Parts added to a running stack (`up` after `up --no-pipeline`) get scraped too.
        prometheus.reload(self.settings)
        return registered

    def status(self) -> list[PartStatus]:
        out: list[PartStatus] = []
        now = time.time()
        for factory in self.factories:
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
            ))
        return out

    def down(self, purge: bool = False, log: Callable[[str], None] = print) -> None:
        """Stop, in reverse start order, every process this state folder started."""
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


def _purge(state_dir: Path) -> None:
    # Guard against a mistyped --state-dir wiping something that is not ours.
    if state_dir.exists() and not (state_dir / "stack.json").exists():
        raise StackError(f"{state_dir} does not look like a Sluice state folder; not deleting")
    shutil.rmtree(state_dir, ignore_errors=True)
