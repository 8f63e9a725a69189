"""Drained rollover of the memory broker: restart it empty without losing anything accepted.

Why: Tansu 0.6's memory engine keeps every record for ever (~4 MiB/min at the example's
rate), has no retention, panics on DeleteRecords, and nothing outside its process can
delete a record (README "Broker retention"). A restart is the only way to give memory
back, and a plain restart loses what was not consumed yet, the committed offsets and
the keyed state. A *drained* rollover first makes sure nothing is left that only the
broker holds, then keeps what must outlive it:

- records of pipeline topics (`delete` kind in `eventing.stack.retention.policies`) are
  not copied: the rollover waits until every declared reader (function groups, lake sink
  groups, the real-time table's positions from its `/healthz`) has read to the end;
- `keep` topics (`_schemas`) and topics no declared reader consumes (the dead-letter
  topic) are copied whole, in order, into the same partitions (offsets stay the same
  when the old log started at 0, which a memory broker's does: `sluice deadletters`
  and redrive ledgers keep naming the same offsets);
- `compact` topics (state changelogs, redrive ledgers) keep the latest record per key.

The order is `Rollover.run`'s numbered steps (one place, like Quix Streams'
`checkpoint.py`). Every step before the broker stops can fail or time out: intake then
resumes and nothing was rolled over. `Broker` is the world the steps act on; the stack's
(`StackBroker`) talks to the real gateway, broker, registry and parts, tests use fakes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from eventing import topology as topo
from eventing.stack.settings import StackSettings

log = logging.getLogger("sluice.rollover")


class Aborted(Exception):
    """A step before the broker restart failed: intake resumes, nothing is rolled over."""


@dataclass(frozen=True)
class RolloverSettings:
    """When to roll over and how long each wait may take (read once at the CLI edge)."""

    max_rss: int = 512 << 20        # roll over when the broker's RSS is above this
    check_s: float = 30.0           # how often the RSS is looked at
    pause_lease_s: float = 180.0    # the gateway resumes by itself after this
    drain_timeout_s: float = 60.0   # readers not at the end by then: no rollover
    drain_poll_s: float = 0.5


@dataclass
class Saved:
    """Records kept across the restart: topic -> partition count, and the records."""

    partitions: dict[str, int] = field(default_factory=dict)
    compacted: set[str] = field(default_factory=set)
    # (topic, partition, offset, key, value, headers, timestamp ms)
    records: list[tuple[str, int, int, bytes | None, bytes | None,
                        list[tuple[str, bytes]] | None, int | None]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(self.partitions, 0)
        for r in self.records:
            out[r[0]] += 1
        return out


@dataclass
class Outcome:
    """What one rollover did (logged, written for `status` and the metrics)."""

    rolled: bool
    reason: str
    started_at: float
    pause_s: float = 0.0
    total_s: float = 0.0
    rss_before: int | None = None
    rss_after: int | None = None
    saved: dict[str, int] = field(default_factory=dict)
    offsets_moved: int = 0   # copied records whose offset changed (should be 0)
    failed_step: str | None = None


class Broker(Protocol):
    """The parts a rollover acts on (see `StackBroker` for what each does for real)."""

    def rss(self) -> int | None: ...
    def pause_intake(self, lease_s: float) -> None: ...
    def resume_intake(self) -> None: ...
    def drained(self) -> tuple[bool, str]: ...
    def stop_stateful(self) -> list[str]: ...
    def start_parts(self, names: list[str]) -> None: ...
    def save(self) -> Saved: ...
    def restart(self) -> None: ...
    def recreate_topics(self, saved: Saved) -> None: ...
    def restore(self, saved: Saved) -> int: ...
    def check_registry(self) -> None: ...


class Rollover:
    """One drained rollover (`run`), or a loop rolling over when the broker is too big."""

    def __init__(self, broker: Broker, settings: RolloverSettings,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 record: Callable[[Outcome], None] | None = None) -> None:
        self.broker = broker
        self.settings = settings
        self.clock = clock
        self.sleep = sleep
        self.record = record or (lambda outcome: None)

    def due(self) -> bool:
        """Whether the broker's RSS is above the cap."""
        rss = self.broker.rss()
        return rss is not None and rss > self.settings.max_rss

    def run(self, reason: str) -> Outcome:
        """The commit order of a rollover. Steps 1-4 may abort (intake resumes, the broker
        keeps running); from step 5 the old broker is gone and the saved records are the
        only copy, so failures there are raised after intake resumes, loudly."""
        b, s = self.broker, self.settings
        started = self.clock()
        out = Outcome(False, reason, time.time(), rss_before=b.rss())
        paused_at: float | None = None
        stopped: list[str] = []
        step = "pause"
        marks: list[str] = []

        def at(name: str) -> str:
            marks.append(f"{step} {self.clock() - started:.1f}s")
            return name
        try:
            # 1. Pause intake: the gateway answers 503 `paused` (publishers retry) and
            #    confirms every produce it started is acknowledged: all 202s are in topics.
            b.pause_intake(s.pause_lease_s)
            paused_at = self.clock()
            # 2. Drain: every declared reader has consumed (and committed) to the end of
            #    every pipeline topic, twice in a row with the same ends (nothing moved).
            step = at("drain")
            self._drain()
            # 3. Stop the functions with keyed state: on the new broker they would restore
            #    from a changelog not yet copied back (their restore reads it at start).
            step = at("stop stateful functions")
            stopped = b.stop_stateful()
            # 4. Save what must survive: keep topics whole, compact topics' latest per key.
            step = at("save")
            saved = b.save()
            out.saved = saved.counts()
        except Exception as exc:
            out.failed_step = step
            out.reason = f"{reason}; aborted at {step}: {exc}"
            log.warning("rollover aborted at step %r, broker left as it was: %s", step, exc)
            self._finish(stopped, paused_at, started, out)
            return out
        try:
            # 5. Restart the broker through its part spec (empty: memory storage).
            step = at("restart broker")
            b.restart()
            # 6. Recreate the topology's topics and the saved ones, same partition counts.
            step = at("recreate topics")
            b.recreate_topics(saved)
            # 7. Produce the saved records back (acks=all, same partition, key, headers).
            step = at("restore records")
            out.offsets_moved = b.restore(saved)
            # 8. The registry's log resolves every schema id it serves, as before.
            step = at("check registry")
            b.check_registry()
            at("done")
            out.rolled = True
            log.info("rollover steps ended at: %s", ", ".join(marks))
        except Exception as exc:
            out.failed_step = step
            out.reason = f"{reason}; FAILED at {step} after the broker restart: {exc}"
            log.error("rollover failed at step %r after the broker restart: %s", step, exc)
            raise
        finally:
            # 9. Start the stopped functions (they restore their state), 10. resume intake.
            self._finish(stopped, paused_at, started, out)
        out.rss_after = b.rss()
        self.record(out)
        return out

    def _drain(self) -> None:
        deadline = self.clock() + self.settings.drain_timeout_s
        last = ""
        in_a_row = 0
        while True:
            ok, detail = self.broker.drained()
            in_a_row = in_a_row + 1 if ok and detail == last else (1 if ok else 0)
            last = detail
            if in_a_row >= 2:
                return
            if self.clock() >= deadline:
                raise Aborted(f"readers not at the end within {self.settings.drain_timeout_s:g}s"
                              f": {detail}")
            self.sleep(self.settings.drain_poll_s)

    def _finish(self, stopped: list[str], paused_at: float | None, started: float,
                out: Outcome) -> None:
        try:
            if stopped:
                self.broker.start_parts(stopped)
        finally:
            if paused_at is not None or out.failed_step == "pause":
                try:
                    self.broker.resume_intake()
                except Exception as exc:  # noqa: BLE001 - the pause lease ends it anyway
                    log.warning("could not resume intake (its lease ends the pause): %s", exc)
            now = self.clock()
            out.pause_s = now - paused_at if paused_at is not None else 0.0
            out.total_s = now - started
            if not out.rolled:
                self.record(out)

    def loop(self, stop: Any) -> None:
        """Check the broker's RSS every `check_s`; roll over when it is above the cap."""
        while not stop.is_set():
            try:
                if self.due():
                    self.run(f"broker RSS above {self.settings.max_rss >> 20} MiB")
            except Exception:  # noqa: BLE001 - logged; the next check tries again
                log.exception("rollover failed")
            stop.wait(self.settings.check_s)


# --------------------------------------------------------------------------- the stack


def rss_of(pid: int) -> int | None:
    """Resident set size of `pid` in bytes (from /proc), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def outcomes_path(state_dir: Path) -> Path:
    return state_dir / "data" / "retention" / "rollovers.json"


def load_outcomes(state_dir: Path) -> dict[str, Any]:
    """`{"rolled": n, "aborted": n, "last": {...}}` (empty when none ran)."""
    try:
        return json.loads(outcomes_path(state_dir).read_text())
    except (OSError, ValueError):
        return {}


def write_outcome(state_dir: Path, outcome: Outcome) -> None:
    """Count the rollover and keep the last one, for `status` and the supervisor's metrics."""
    data = load_outcomes(state_dir)
    key = "rolled" if outcome.rolled else "aborted"
    data[key] = int(data.get(key, 0)) + 1
    data["pause_seconds_sum"] = float(data.get("pause_seconds_sum", 0.0)) + (
        outcome.pause_s if outcome.rolled else 0.0)
    data["last"] = asdict(outcome)
    path = outcomes_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


class StackBroker:
    """`Broker` for the local stack of `settings` running `topology`."""

    def __init__(self, settings: StackSettings, topology: topo.Topology,
                 gateway_token: str | None = None, http_timeout_s: float = 30.0) -> None:
        from eventing.stack.process import ProcessDir
        from eventing.stack.retention import RetentionSettings, policies

        self.settings = settings
        self.topology = topology
        self.token = gateway_token
        self.http_timeout_s = http_timeout_s
        self.procs = ProcessDir(settings.state_dir, settings.log_rotation)
        self._lock: Any = None  # the rollover lock file while intake is paused
        self.policy = policies(topology, RetentionSettings(), settings.schemas_topic)
        # Pipeline topics (drained, not copied) and who must have read them.
        self.groups: dict[str, set[str]] = {}
        for pol in self.policy.values():
            for g in pol.groups:
                self.groups.setdefault(g, set()).add(pol.topic)
        self.realtime_topics = sorted({t.topic for t in topology.realtime_tables()})
        self.drained_topics = sorted(
            {t for ts in self.groups.values() for t in ts} | set(self.realtime_topics))
        # Copied: keep, compact, and topics no declared reader consumes (dead letters).
        self.copied = sorted(p.topic for p in self.policy.values()
                             if p.kind != "delete" or p.topic not in self.drained_topics)

    # ------------------------------------------------------------ the broker process

    def _record(self) -> Any:
        from eventing.stack import broker

        return self.procs.record(broker.NAME)

    def rss(self) -> int | None:
        from eventing.stack.process import is_alive

        record = self._record()
        return rss_of(record.pid) if record and is_alive(record) else None

    def restart(self) -> None:
        from eventing.stack import broker
        from eventing.stack.process import wait_healthy

        record = self._record()
        if record is not None:
            # Tansu took ~5 s to exit on SIGTERM; a memory broker has nothing to write
            # out (what must survive is saved), so SIGKILL follows after 1 s.
            self.procs.stop(record, timeout=1.0)
        spec = broker.spec(self.settings)
        new = self.procs.start(spec)
        problem = wait_healthy(spec, new)
        if problem:
            raise RuntimeError(f"the broker did not come back: {problem}")
        log.info("broker restarted (pid %d)", new.pid)

    # ------------------------------------------------------------ intake (the gateway)

    def _gateway(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        r = httpx.post(self.settings.gateway_url + path, json=body or {}, headers=headers,
                       timeout=self.http_timeout_s)
        if r.status_code != 200:
            raise Aborted(f"gateway {path} answered {r.status_code}: {r.text[:200]}")
        return r.json()

    def pause_intake(self, lease_s: float) -> None:
        # One rollover at a time per stack (the part's RSS loop and `--rollover-now`).
        import fcntl

        path = outcomes_path(self.settings.state_dir).with_name("rollover.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(path, "w")  # noqa: SIM115 - held until resume_intake
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise Aborted("another rollover of this stack is under way") from None
        answer = self._gateway("/admin/pause", {"lease_s": lease_s})
        if answer.get("in_flight"):
            raise Aborted(f"{answer['in_flight']} produce requests still in flight")

    def resume_intake(self) -> None:
        try:
            if self._lock is not None:
                self._gateway("/admin/resume")
        finally:
            if self._lock is not None:
                self._lock.close()  # releases the flock
                self._lock = None

    # ------------------------------------------------------------ drain

    def drained(self) -> tuple[bool, str]:
        """Whether every declared reader is at the end of every pipeline topic; the detail
        names the ends (two equal answers in a row mean nothing moved in between)."""
        import httpx

        from eventing import scan
        from eventing.stack.retention import Positions

        ends = scan.ends(self.settings.bootstrap, self.drained_topics)
        behind: list[str] = []
        positions = Positions(self.settings.bootstrap)
        for group, topics in sorted(self.groups.items()):
            committed = positions.committed(group)
            for (t, p), end in sorted(ends.items()):
                if t in topics and committed.get((t, p), 0) < end:
                    behind.append(f"{group} {t}[{p}] {committed.get((t, p), 0)}/{end}")
        if self.realtime_topics:
            r = httpx.get(self.settings.realtime_url + "/healthz", timeout=10)
            read = r.json().get("positions", {})
            for (t, p), end in sorted(ends.items()):
                if t in self.realtime_topics and int(read.get(t, {}).get(str(p), 0)) < end:
                    behind.append(f"realtime {t}[{p}] {read.get(t, {}).get(str(p), 0)}/{end}")
        detail = ", ".join(f"{t}[{p}]={e}" for (t, p), e in sorted(ends.items()))
        return not behind, ("behind: " + "; ".join(behind[:6])) if behind else detail

    # ------------------------------------------------------------ functions with state

    def stateful_parts(self) -> list[str]:
        from eventing.deploy.strimzi import function_state_topics
        from eventing.stack.pipeline import function_processes

        stateful = {name for name, fn in self.topology.functions.items()
                    if function_state_topics(fn)}
        return [part for name, part in function_processes(self.settings) if name in stateful]

    def stop_stateful(self) -> list[str]:
        stopped = []
        for part in self.stateful_parts():
            record = self.procs.record(part)
            if record is not None and self.procs.stop(record, timeout=15):
                stopped.append(part)
        return stopped

    def start_parts(self, names: list[str]) -> None:
        from eventing.stack.pipeline import function_processes, function_specs

        specs = dict(zip([part for _, part in function_processes(self.settings)],
                         function_specs(self.settings), strict=True))
        for name in names:
            self.procs.start(specs[name](self.settings))
            log.info("started %s again", name)

    # ------------------------------------------------------------ the records

    def save(self) -> Saved:
        from confluent_kafka.admin import AdminClient

        from eventing import scan
        from eventing.kafka import admin_config

        meta = AdminClient(admin_config(self.settings.bootstrap)).list_topics(timeout=10).topics
        saved = Saved()
        dropped = sorted(t for t in meta if t not in self.policy and not t.startswith("__"))
        if dropped:
            log.warning("not kept (the topology does not declare them): %s", ", ".join(dropped))
        # Topics never created (a ledger before the first redrive) have nothing to keep.
        for topic in self.copied:
            if topic in meta and meta[topic].error is None:
                saved.partitions[topic] = len(meta[topic].partitions)
                if self.policy[topic].kind == "compact":
                    saved.compacted.add(topic)
        # One read of every copied topic: the end is "reported end reached, then idle",
        # so one read waits out one idle period, not one per topic.
        per_topic: dict[str, list[Any]] = {t: [] for t in saved.partitions}
        for m in scan.read(self.settings.bootstrap, sorted(saved.partitions), raw=True,
                           idle_s=1.0, timeout_s=60.0):
            per_topic[m.topic()].append(
                (m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers(),
                 m.timestamp()[1] if m.timestamp()[0] else None))
        for topic, records in per_topic.items():
            records.sort(key=lambda r: (r[1], r[2]))
            saved.records += latest_per_key(records) if topic in saved.compacted else records
        log.info("saved %s", saved.counts())
        return saved

    def recreate_topics(self, saved: Saved) -> None:
        from eventing.kafka import ensure_topics
        from eventing.stack import broker
        from eventing.stack.supervisor import Stack

        Stack(self.settings).after_healthy(broker.spec(self.settings), log.info)
        ensure_topics(self.settings.bootstrap, saved.partitions,
                      config={t: {"cleanup.policy": "compact"} for t in saved.compacted})

    def restore(self, saved: Saved) -> int:
        """Produce the saved records back; returns how many landed at another offset
        than before (of the topics copied whole; compacted ones are renumbered)."""
        from confluent_kafka import Producer

        from eventing.kafka import produce, producer_config

        moved = failed = 0
        errors: list[str] = []

        def on_delivery(err: Any, msg: Any, was: int = -1, whole: bool = True) -> None:
            nonlocal moved, failed
            if err is not None:
                failed += 1
                errors.append(str(err))
            elif whole and msg.offset() != was:
                moved += 1

        producer = Producer(producer_config(self.settings.bootstrap,
                                            **{"enable.idempotence": True}))
        for topic, part, offset, key, value, headers, ts in saved.records:
            whole = topic not in saved.compacted
            kwargs: dict[str, Any] = {"partition": part, "headers": headers or None,
                                      "on_delivery": (lambda e, m, o=offset, w=whole:
                                                      on_delivery(e, m, o, w))}
            if ts is not None and ts > 0:
                kwargs["timestamp"] = ts
            produce(producer, topic, value, key, **kwargs)
        left = producer.flush(60)
        if left or failed:
            raise RuntimeError(f"{failed + left} saved records not acknowledged: "
                               f"{errors[:3]}")
        if moved:
            log.warning("%d copied records landed at another offset than before", moved)
        return moved

    def check_registry(self) -> None:
        """Every schema id the running registry serves resolves to the same subject,
        version and text in the copied `_schemas` log, so a registry restart after the
        rollover gives the gateway and the functions the ids they already use."""
        import httpx

        from eventing import scan
        from eventing.registry.store import MemoryLog, SchemaStore, _decode_record

        records = [r for m in scan.read(self.settings.bootstrap, [self.settings.schemas_topic],
                                        raw=True, idle_s=1.0, timeout_s=60.0)
                   if (r := _decode_record(m.key(), m.value(), m.offset())) is not None]
        store = SchemaStore(MemoryLog(records))
        url = self.settings.registry_url
        with httpx.Client(timeout=10) as http:
            for subject in http.get(url + "/subjects").json():
                for version in http.get(f"{url}/subjects/{subject}/versions").json():
                    live = http.get(f"{url}/subjects/{subject}/versions/{version}").json()
                    copy = store.get_version(subject, version)
                    if copy.id != live["id"] or copy.schema != live["schema"]:
                        raise RuntimeError(f"{subject} v{version}: id {live['id']} in the "
                                           f"registry, {copy.id} in the copied log")


def latest_per_key(records: list[Any]) -> list[Any]:
    """The latest record of each (partition, key), in offset order; records without a key
    are never the latest of anything (what Kafka's compaction keeps, tombstones kept)."""
    latest: dict[tuple[int, bytes], Any] = {}
    for r in records:
        if r[3] is not None:
            latest[(r[1], r[3])] = r
    return sorted(latest.values(), key=lambda r: (r[1], r[2]))


def build(settings: StackSettings, topology: topo.Topology, rollover: RolloverSettings,
          gateway_token: str | None = None) -> Rollover:
    """A `Rollover` of the local stack `settings`, recording into its state folder."""
    return Rollover(StackBroker(settings, topology, gateway_token), rollover,
                    record=lambda outcome: write_outcome(settings.state_dir, outcome))

