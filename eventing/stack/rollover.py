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

Crash safety: between the broker restart and the copy-back the saved records would
exist only in this process, so step 4 also writes them to the state folder (an
*unfinished rollover* file, `unfinished_path`: written to a temporary file, fsynced,
renamed) before the broker is touched, and deletes it once the registry check passed.
A rollover that finds such a file (the `retention` part at its start and every check,
`--rollover-now`) finishes that one instead of starting anew: the same steps from the
restart on, each idempotent (a running new broker is not restarted again, topics are
created if missing, only records the new broker lacks are produced). The functions it
stopped are *held* (`ProcessDir.hold`), and the supervisor starts them again itself
once no rollover is under way and none is left to finish (`under_way`).
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from eventing import topology as topo
from eventing.stack.settings import StackSettings

ENV_HOLD_AT = "SLUICE_ROLLOVER_HOLD_AT"  # tests: hold (sleep) before the named step

log = logging.getLogger("sluice.rollover")


class Aborted(Exception):
    """A step before the broker restart failed: intake resumes, nothing is rolled over."""


@dataclass(frozen=True)
class RolloverSettings:
    """When to roll over and how long each wait may take (read once at the CLI edge)."""

    max_rss: int = 512 << 20        # roll over when the broker's RSS is above this
    check_s: float = 30.0           # how often the RSS is looked at
    # How often the loop looks for an interrupted rollover to finish (a file exists and no
    # lock is held: cheap). Short: until it is finished the new broker may lack topics,
    # and consumers subscribed to a missing topic were seen to stay unassigned.
    resume_poll_s: float = 2.0
    pause_lease_s: float = 180.0    # the gateway resumes by itself after this
    drain_timeout_s: float = 60.0   # readers not at the end by then: no rollover
    drain_poll_s: float = 0.5
    # Tests only (env SLUICE_ROLLOVER_HOLD_AT, read at the CLI edge): stop before the
    # step of this name and sleep, so a test can kill -9 the process at a known point.
    hold_at: str | None = None


Headers = list[tuple[str, bytes | None]] | None
# (topic, partition, offset, key, value, headers, timestamp ms)
Record = tuple[str, int, int, bytes | None, bytes | None, Headers, int | None]


@dataclass
class Saved:
    """Records kept across the restart: topic -> partition count, and the records."""

    partitions: dict[str, int] = field(default_factory=dict)
    compacted: set[str] = field(default_factory=set)
    records: list[Record] = field(default_factory=list)
    # The broker process they were read from (pid, start ticks): only that one is ever
    # stopped; a resume that finds it still running has nothing to restore (it holds all).
    broker: tuple[int, int] | None = None

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
    finished: str | None = None  # a resume: the interrupted rollover's start and reason


@dataclass
class Unfinished:
    """What a rollover wrote before restarting the broker: enough to finish it."""

    reason: str
    started_at: float
    stopped: list[str]
    saved: Saved


class Broker(Protocol):
    """The parts a rollover acts on (see `StackBroker` for what each does for real)."""

    def rss(self) -> int | None: ...
    def pause_intake(self, lease_s: float) -> None: ...
    def resume_intake(self) -> None: ...
    def drained(self) -> tuple[bool, str]: ...
    def stop_stateful(self) -> list[str]: ...
    def start_parts(self, names: list[str]) -> None: ...
    def save(self) -> Saved: ...
    def keep(self, unfinished: Unfinished) -> None: ...
    def unfinished(self) -> Unfinished | None: ...
    def pending(self) -> bool: ...
    def forget(self) -> None: ...
    def replaced(self, saved: Saved) -> bool: ...
    def restart(self, saved: Saved) -> None: ...
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
        keeps running); from step 5 the old broker is gone and the saved records live in
        the state folder until step 8 passed, so failures there are raised after intake
        resumes, loudly, and the next run finishes the rollover (steps 5-10 again). A run
        that finds such an unfinished rollover finishes it instead of starting anew."""
        b, s = self.broker, self.settings
        started = self.clock()
        out = Outcome(False, reason, time.time(), rss_before=b.rss())
        paused_at: float | None = None
        stopped: list[str] = []
        step = "pause"
        marks: list[str] = []

        def at(name: str) -> str:
            marks.append(f"{step} {self.clock() - started:.1f}s")
            if name == s.hold_at:
                log.warning("holding before step %r (%s, for tests)", name, ENV_HOLD_AT)
                while True:
                    self.sleep(3600)
            return name
        try:
            # 1. Pause intake: the gateway answers 503 `paused` (publishers retry) and
            #    confirms every produce it started is acknowledged: all 202s are in topics.
            #    It also makes this the one rollover under way (a lock until step 10).
            b.pause_intake(s.pause_lease_s)
            paused_at = self.clock()
            unfinished = b.unfinished()
            if unfinished is None:
                # 2. Drain: every declared reader has consumed (and committed) to the end
                #    of every pipeline topic, twice in a row with the same ends.
                step = at("drain")
                self._drain()
                # 3. Stop (hold) the functions with keyed state: on the new broker they
                #    would restore from a changelog not yet copied back.
                step = at("stop stateful functions")
                stopped = b.stop_stateful()
                # 4. Save what must survive: keep topics whole, compact topics' latest per
                #    key; written (fsynced) to the state folder before the broker goes.
                step = at("save")
                saved = b.save()
                b.keep(Unfinished(reason, out.started_at, stopped, saved))
            else:
                # A rollover that died after step 4: finish it from its file, steps 5-10.
                saved, stopped = unfinished.saved, list(unfinished.stopped)
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unfinished.started_at))
                out.finished = f"{when} ({unfinished.reason})"
                out.reason = f"{reason}; finishing an interrupted rollover: {out.finished}"
                log.warning("finishing an interrupted rollover: %s", out.finished)
                if not b.replaced(saved):
                    # It died before stopping the broker, which still holds everything.
                    b.forget()
                    raise Aborted("the interrupted rollover had not restarted the broker")
            out.saved = saved.counts()
        except Exception as exc:
            out.failed_step = step
            out.reason = f"{out.reason}; aborted at {step}: {exc}"
            log.warning("rollover aborted at step %r, broker left as it was: %s", step, exc)
            self._finish(stopped, paused_at, started, out)
            return out
        try:
            # 5. Restart the broker through its part spec (empty: memory storage); a
            #    broker that is not the one saved from already is the new one.
            step = at("restart broker")
            b.restart(saved)
            # 6. Recreate the topology's topics and the saved ones, same partition counts.
            step = at("recreate topics")
            b.recreate_topics(saved)
            # 7. Produce the saved records back (acks=all, same partition, key, headers),
            #    those the new broker does not have yet.
            step = at("restore records")
            out.offsets_moved = b.restore(saved)
            # 8. The registry's log resolves every schema id it serves, as before. Every
            #    record is back: the file goes.
            step = at("check registry")
            b.check_registry()
            b.forget()
            at("done")
            out.rolled = True
            log.info("rollover steps ended at: %s", ", ".join(marks))
        except Exception as exc:
            out.failed_step = step
            out.reason = f"{out.reason}; FAILED at {step} after the broker restart: {exc}"
            log.error("rollover failed at step %r after the broker restart (the saved "
                      "records stay in the state folder for the next run): %s", step, exc)
            raise
        finally:
            # 9. Start the stopped functions (they restore their state) once the records
            #    are back (else they stay held for the run that finishes this one),
            #    10. resume intake.
            self._finish(stopped if out.rolled else [], paused_at, started, out)
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
        """Check the broker's RSS every `check_s`; roll over when it is above the cap.
        Finish an interrupted rollover first (at the start, and whenever one is found:
        a `--rollover-now` killed while this part runs)."""
        next_rss = self.clock()
        while not stop.is_set():
            try:
                if self.broker.pending():
                    self.run("an interrupted rollover left its saved records")
                elif self.clock() >= next_rss:
                    next_rss = self.clock() + self.settings.check_s
                    if self.due():
                        self.run(f"broker RSS above {self.settings.max_rss >> 20} MiB")
            except Exception:  # noqa: BLE001 - logged; the next check tries again
                log.exception("rollover failed")
            stop.wait(min(self.settings.check_s, self.settings.resume_poll_s))


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


def unfinished_path(state_dir: Path) -> Path:
    """The saved records of a rollover that restarted (or is restarting) the broker and
    has not put them back yet."""
    return state_dir / "data" / "retention" / "rollover-unfinished.jsonl"


def lock_path(state_dir: Path) -> Path:
    return state_dir / "data" / "retention" / "rollover.lock"


def under_way(state_dir: Path) -> bool:
    """Whether a rollover holds the stack's lock, or one that died left records to put
    back: parts it held must not start yet (they would restore an empty changelog)."""
    return (unfinished_path(state_dir).exists() or _locked(state_dir)
            or unfinished_path(state_dir).exists())


def _locked(state_dir: Path) -> bool:
    """Whether a rollover holds the stack's lock (taken and given back at once if not)."""
    try:
        with open(lock_path(state_dir), "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError:
        return False
    return False


# The unfinished-rollover file: JSON lines, a header then one record per line; keys,
# values and header values base64 (bytes-exact, None kept), header names as strings
# (what confluent-kafka gives), partitions and offsets as numbers.
_FORMAT = "sluice-rollover-unfinished/1"


def _b64(b: bytes | None) -> str | None:
    return None if b is None else base64.b64encode(b).decode("ascii")


def _unb64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s, validate=True)


def write_unfinished(path: Path, unfinished: Unfinished) -> None:
    """Write `unfinished` so that a crash at any instant leaves either no file or the
    whole one: a temporary file, fsynced, renamed over, the folder fsynced."""
    saved = unfinished.saved
    head = {"format": _FORMAT, "reason": unfinished.reason,
            "started_at": unfinished.started_at, "stopped": unfinished.stopped,
            "partitions": saved.partitions, "compacted": sorted(saved.compacted),
            "broker": list(saved.broker) if saved.broker else None,
            "records": len(saved.records)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(head) + "\n")
        for topic, part, offset, key, value, headers, ts in saved.records:
            fh.write(json.dumps([topic, part, offset, _b64(key), _b64(value),
                                 None if headers is None
                                 else [[k, _b64(v)] for k, v in headers], ts]) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_unfinished(path: Path) -> Unfinished | None:
    """The file `write_unfinished` wrote, or None when there is none. A file that does
    not parse or misses records raises ValueError (it is kept: it may be the only copy)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    lines = text.splitlines()
    head = json.loads(lines[0]) if lines else {}
    if head.get("format") != _FORMAT or len(lines) - 1 != head.get("records"):
        raise ValueError(f"{path}: not a whole unfinished-rollover file "
                         f"({len(lines) - 1} records, header says {head.get('records')})")
    records: list[Record] = []
    for line in lines[1:]:
        topic, part, offset, key, value, headers, ts = json.loads(line)
        records.append((topic, part, offset, _unb64(key), _unb64(value),
                        None if headers is None else [(k, _unb64(v)) for k, v in headers],
                        ts))
    broker = head.get("broker")
    saved = Saved(dict(head["partitions"]), set(head["compacted"]), records,
                  (int(broker[0]), int(broker[1])) if broker else None)
    return Unfinished(head["reason"], float(head["started_at"]), list(head["stopped"]), saved)


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
        self._fresh = False  # this process started the broker: its saved topics are empty
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

    def identity(self) -> tuple[int, int] | None:
        """(pid, start ticks) of the running broker, None when none runs."""
        from eventing.stack.process import is_alive

        record = self._record()
        return (record.pid, record.start_ticks) if record and is_alive(record) else None

    def replaced(self, saved: Saved) -> bool:
        """Whether the broker `saved` was read from no longer runs (restarted or down)."""
        return saved.broker is None or self.identity() != saved.broker

    def restart(self, saved: Saved) -> None:
        """Replace the broker `saved` was read from; when another one runs already (a
        resume), leave it; when none runs (died mid-restart), start one."""
        from eventing.stack import broker
        from eventing.stack.process import is_alive, wait_healthy

        record = self._record()
        if record is not None and is_alive(record) and saved.broker is not None \
                and (record.pid, record.start_ticks) != saved.broker:
            log.info("the broker was already restarted (pid %d)", record.pid)
            return
        if record is not None:
            # Tansu took ~5 s to exit on SIGTERM; a memory broker has nothing to write
            # out (what must survive is saved), so SIGKILL follows after 1 s.
            self.procs.stop(record, timeout=1.0)
        spec = broker.spec(self.settings)
        new = self.procs.start(spec)
        problem = wait_healthy(spec, new)
        if problem:
            raise RuntimeError(f"the broker did not come back: {problem}")
        self._fresh = True
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
        path = lock_path(self.settings.state_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(path, "a")  # noqa: SIM115 - held until resume_intake
        # The supervisor takes the lock for an instant to see whether one is under way.
        for attempt in range(20):
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if attempt == 19:
                    self._lock.close()
                    self._lock = None
                    raise Aborted("another rollover of this stack is under way") from None
                time.sleep(0.1)
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
        """Stop the functions with keyed state, *held* (`ProcessDir.hold`): if this
        process dies the supervisor can tell them from parts `down` stopped."""
        stopped = []
        for part in self.stateful_parts():
            record = self.procs.record(part)
            if record is not None and self.procs.hold(record, timeout=15):
                stopped.append(part)
        return stopped

    def start_parts(self, names: list[str]) -> None:
        """Start held parts again with the command they ran (none twice: the supervisor
        may have started one already)."""
        from eventing.stack.pipeline import function_processes, function_specs
        from eventing.stack.process import is_alive

        specs = dict(zip([part for _, part in function_processes(self.settings)],
                         function_specs(self.settings), strict=True))
        for name in names:
            running = self.procs.record(name)
            if running is not None and is_alive(running):
                self.procs.held_path(name).unlink(missing_ok=True)
                continue
            spec = specs[name](self.settings)
            if (held := self.procs.held(name)) is not None:
                spec.argv = list(held.argv)  # exactly what ran (as the supervisor does)
            self.procs.start(spec)
            log.info("started %s again", name)

    # ------------------------------------------------------------ the unfinished file

    def keep(self, unfinished: Unfinished) -> None:
        write_unfinished(unfinished_path(self.settings.state_dir), unfinished)
        log.info("saved records written to %s", unfinished_path(self.settings.state_dir))

    def unfinished(self) -> Unfinished | None:
        return read_unfinished(unfinished_path(self.settings.state_dir))

    def pending(self) -> bool:
        """An unfinished rollover's file is there and no rollover holds the lock (the one
        writing it now, or one finishing it: nothing to do for this one)."""
        return unfinished_path(self.settings.state_dir).exists() and not _locked(
            self.settings.state_dir)

    def forget(self) -> None:
        unfinished_path(self.settings.state_dir).unlink(missing_ok=True)

    # ------------------------------------------------------------ the records

    def save(self) -> Saved:
        from confluent_kafka.admin import AdminClient

        from eventing import scan
        from eventing.kafka import admin_config

        meta = AdminClient(admin_config(self.settings.bootstrap)).list_topics(timeout=10).topics
        saved = Saved(broker=self.identity())
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

        # The saved topics first, with the partition counts they had: the records go
        # back to their partitions only if those exist (`restore`).
        ensure_topics(self.settings.bootstrap, saved.partitions,
                      config={t: {"cleanup.policy": "compact"} for t in saved.compacted})
        Stack(self.settings).after_healthy(broker.spec(self.settings), log.info)

    def present(self, saved: Saved) -> list[Record]:
        """What the broker holds now of the saved topics (a resume's copy-back may have
        got part of the way)."""
        from eventing import scan

        return [(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.headers(),
                 None) for m in scan.read(self.settings.bootstrap, sorted(saved.partitions),
                                          raw=True, idle_s=1.0, timeout_s=60.0)]

    def restore(self, saved: Saved) -> int:
        """Produce back the saved records the broker does not hold yet (all of them after
        a restart; the rest after a copy-back that was cut off); returns how many landed
        at another offset than before (of the topics copied whole; compacted ones are
        renumbered)."""
        from confluent_kafka import Producer

        from eventing.kafka import produce, producer_config

        # Reading back costs ~1 s of the pause (an idle wait): only a resume needs it,
        # a broker this process just started holds none of them.
        todo = saved.records if self._fresh else missing(saved.records, self.present(saved))
        if len(todo) < len(saved.records):
            log.info("%d of %d saved records are in the broker already",
                     len(saved.records) - len(todo), len(saved.records))
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
        # A topic just created may not show its partitions yet: producing then fails with
        # "Unknown partition" (seen once the restore no longer read the topics back first).
        # The partitions the records use, not the saved count: a topic can be there with
        # fewer (`_schemas` was auto-created with 4 while an interrupted rollover left the
        # topics missing; the stack creates it with 1 and the log uses partition 0).
        used: dict[str, int] = {}
        for r in todo:
            used[r[0]] = max(used.get(r[0], 0), r[1] + 1)
        # A topic can also exist with fewer partitions than the old one had, created by
        # another hand between the restart and step 6 (seen once for the dead-letter
        # topic: 3 saved, fewer there, and the rollover failed after the restart for good;
        # Tansu cannot add partitions). Its records then go by key to the partitions it
        # has: kept, at another place (counted in `moved`), rather than not at all.
        deadline = time.monotonic() + 15.0
        narrower: dict[str, int] = {}
        for topic, count in sorted(used.items()):
            while True:
                meta = producer.list_topics(topic, timeout=5).topics.get(topic)
                have = len(meta.partitions) if meta is not None and meta.error is None else 0
                if have >= count:
                    break
                if time.monotonic() > deadline:
                    if not have:
                        raise RuntimeError(f"{topic} is not in the broker after 15 s")
                    narrower[topic] = have
                    log.warning("%s has %d partitions, its saved records use %d: those "
                                "beyond go by key to the partitions it has", topic, have,
                                count)
                    break
                time.sleep(0.1)
        for topic, part, offset, key, value, headers, ts in todo:
            whole = topic not in saved.compacted
            if topic in narrower and part >= narrower[topic]:
                part = -1  # librdkafka's "by key" (RD_KAFKA_PARTITION_UA)
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
        from eventing.registry.errors import RegistryError

        store = SchemaStore(MemoryLog(records))
        url = self.settings.registry_url
        absent: list[str] = []
        with httpx.Client(timeout=10) as http:
            for subject in http.get(url + "/subjects").json():
                for version in http.get(f"{url}/subjects/{subject}/versions").json():
                    live = http.get(f"{url}/subjects/{subject}/versions/{version}").json()
                    try:
                        copy = store.get_version(subject, version)
                    except RegistryError:
                        absent.append(f"{subject} v{version}")
                        continue
                    if copy.id != live["id"] or copy.schema != live["schema"]:
                        raise RuntimeError(f"{subject} v{version}: id {live['id']} in the "
                                           f"registry, {copy.id} in the copied log")
        if absent:
            # Not this rollover's doing: an earlier broker crash (not a rollover) emptied
            # `_schemas` while the running registry kept them in memory, so the log the
            # rollover copied never had them (a CI run: `alerts.fraud-value`). Failing
            # here failed the rollover for good after the restart; the registry still
            # serves them, and a registry restart would lose them either way.
            log.warning("the registry serves %d versions its `_schemas` log lacks (lost by an "
                        "earlier broker restart, not by this rollover): %s", len(absent),
                        ", ".join(absent[:10]))


def missing(saved: list[Record], present: list[Record]) -> list[Record]:
    """The saved records the broker does not hold: each present record (same topic,
    partition, key, value and headers) accounts for one saved copy, so producing the
    result again gives each partition its saved records once, whatever part of them a
    cut-off copy-back produced."""
    from collections import Counter

    def ident(r: Record) -> tuple[Any, ...]:
        return (r[0], r[1], r[3], r[4], tuple(tuple(h) for h in (r[5] or ())))

    have = Counter(ident(r) for r in present)
    out = []
    for r in saved:
        if have[ident(r)] > 0:
            have[ident(r)] -= 1
        else:
            out.append(r)
    return out


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

