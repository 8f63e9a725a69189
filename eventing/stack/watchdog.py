"""The stack's supervisor: restart any part that exits or hangs, with backoff and crash loops.

`sluice up` leaves this one small process running (part `supervisor`, `sluice supervise`).
Every `TICK_S` it looks at each part `up` recorded; a part whose process is gone is
started again with the exact command it was first started with (its record's argv),
the environment and health check of its spec. The rules are the kubelet's for a pod's
`restartPolicy: Always`, scaled to a laptop:

- the first exit restarts at once; each further exit that comes within `RESET_AFTER_S`
  of the last start doubles the wait (`INITIAL_BACKOFF_S`, 2 s, 4 s ... `MAX_BACKOFF_S`);
- `CRASH_LOOP_EXITS` such quick exits in a row mark the part `CrashLoopBackOff` (still
  restarted, after the backoff) in `sluice status`, in Prometheus and in an alert;
- a part that stays up for `RESET_AFTER_S` is `Running` again with its backoff reset;
- parts restart in start order, and a part waits while one before it (the broker, say)
  is being restarted and not yet healthy, so dependants are not started into a crash;
- after the broker comes back its topics are created again, after the registry the
  schemas registered again (`Stack.after_healthy`, what `up` does).

A part that hangs (deadlocked, stopped, a worker thread stuck) does not exit, so it is
also probed, as the kubelet's livenessProbe does (`Prober`; timings in
`settings.Liveness`): its `PartSpec.liveness` every `period_s` with `timeout_s`, in a
thread pool so a hung part never delays the round; `failure_threshold` failures in a
row and it is terminated (SIGTERM and SIGCONT, SIGKILL after `termination_grace_s`),
then restarted by the rules above, its reason "liveness probe failed ...". Failures
do not count during a start (until a probe passed, or the startup grace is over) nor
while an earlier part is being restarted (a dependant's probe may wait on it). A part
without a liveness probe (the traffic generator) is supervised by its exit only.

Each round also bounds the parts' logs (`logs.rotate_if_needed`).

Why not the parts' own parent: `up` returns to the shell, so the parts it starts are
orphans; only parts this process restarted are its children and have an exact exit
status (signal or code). For a part `up` started the reason is the last line of its log.

A part being stopped (`ProcessDir.stop` leaves a marker) or with no record (never started,
or stopped by `down`) is not restarted, except a part *held* by a broker rollover
(`ProcessDir.hold`: the functions with keyed state, stopped while the broker is replaced):
while `may_start_held()` says no (a rollover is under way, or one that died left saved
records for the next one to restore first) it shows `Held`; after that it is started
again from its held record, so a rollover that died never leaves a function stopped.
`up` and `down` stop the supervisor first, so it never races them. State is written to
`data/supervisor/parts.json` for `sluice status`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eventing.stack import logs
from eventing.stack.process import (
    LivenessProbe,
    PartRecord,
    PartSpec,
    is_alive,
    kill,
    tail,
    terminate,
)
from eventing.stack.settings import Liveness, LogRotation

log = logging.getLogger("sluice.supervisor")

NAME = "supervisor"
TICK_S = 0.5
INITIAL_BACKOFF_S = 1.0
MAX_BACKOFF_S = 300.0     # the kubelet's cap
RESET_AFTER_S = 120.0     # up this long since its start: the next exit is not a crash loop
CRASH_LOOP_EXITS = 3


@dataclass
class PartState:
    """What the supervisor knows about one part (the `status` and metrics view)."""

    state: str = "Running"               # Running | Waiting | CrashLoopBackOff | Held
    restarts: int = 0
    last_exit_reason: str | None = None
    last_exit_code: int | None = None    # exit code, or -signal; None when unknown
    last_exit_at: float | None = None    # wall clock
    quick_exits: int = 0                 # exits within RESET_AFTER_S of a start, in a row
    backoff_s: float = 0.0
    next_start_at: float | None = None   # wall clock of a pending restart
    awaiting_health: bool = False        # restarted, not yet healthy
    liveness_failures: int = 0           # consecutive failed liveness probes now
    liveness_kills: int = 0              # times killed for failing its liveness probe
    last_exit_liveness: bool = False     # the last exit was such a kill
    killing: str | None = None           # why it is being terminated (liveness), until it exits

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def state_path(state_dir: Path) -> Path:
    return state_dir / "data" / NAME / "parts.json"


def load_states(state_dir: Path) -> dict[str, dict[str, Any]]:
    """The supervisor's last written view (empty when it never ran)."""
    try:
        return json.loads(state_path(state_dir).read_text())
    except (OSError, ValueError):
        return {}


def backoff_for(quick_exits: int) -> float:
    """Seconds to wait before the restart after `quick_exits` quick exits in a row."""
    if quick_exits <= 1:
        return 0.0
    return min(MAX_BACKOFF_S, INITIAL_BACKOFF_S * 2 ** (quick_exits - 2))


def describe_exit(code: int | None, log_path: str | None) -> str:
    """A one-line reason: the signal or exit code when known, and the log's last line."""
    if code is None:
        head = "exited (status unknown: not started by the supervisor)"
    elif code < 0:
        try:
            head = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            head = f"killed by signal {-code}"
    else:
        head = f"exit code {code}"
    lines = tail(log_path, 5).splitlines() if log_path else []
    last = next((ln.strip() for ln in reversed(lines)
                 if ln.strip() and not ln.startswith("--- start ")), "")
    return f"{head}; log: {last[:300]}" if last else head


@dataclass
class Prober:
    """The liveness probe state of one started process of a part (the kubelet's rules).

    Pure bookkeeping on the supervisor's clock, so it is tested with a fake one: `due`
    says when to probe next, `observe` counts a result and says when to kill.
    """

    settings: Liveness
    started_at: float                    # the process's start (wall clock)
    grace_s: float                       # startup grace: failures before it do not count
    next_at: float = 0.0
    failures: int = 0
    passed: bool = False                 # a probe passed since the start: grace is over
    last_error: str | None = None
    pid: int = 0                         # the process these results are about
    probe: LivenessProbe | None = None   # None: exit only, never due
    future: Future | None = None         # a probe in flight
    sent_at: float = 0.0

    def due(self, now: float) -> bool:
        return self.future is None and now >= self.next_at

    def in_grace(self, now: float) -> bool:
        return not self.passed and now - self.started_at < self.grace_s

    def observe(self, now: float, error: str | None, *, count: bool = True) -> bool:
        """Count one probe's result (`error` None: it passed); True when the part has now
        failed `failure_threshold` probes in a row and must be killed. A failure is not
        counted during the startup grace or when `count` is False."""
        self.next_at = now + self.settings.period_s
        if error is None:
            self.failures, self.passed, self.last_error = 0, True, None
            return False
        if not count or self.in_grace(now):
            return False
        self.failures += 1
        self.last_error = error
        return self.failures >= self.settings.failure_threshold


def run_probe(probe: LivenessProbe, timeout: float) -> str | None:
    """None when `probe` passed, else why not (a timeout, refused connection, status)."""
    try:
        probe(timeout)
    except Exception as exc:  # noqa: BLE001 - every failure is a reason, not a crash
        text = str(exc) or type(exc).__name__
        if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
            return f"no answer within {timeout:g}s"
        return text[:200]
    return None


class Supervisor:
    """Watches the parts of one stack; `tick` does one round, `run` loops until stopped.

    `parts()` yields (name, spec factory) in start order; `procs` is the stack's
    `ProcessDir`; `after_healthy(spec)` runs once a restarted part is healthy again.
    """

    def __init__(self, parts: Callable[[], Iterable[tuple[str, Callable[[], PartSpec]]]],
                 procs: Any, state_dir: Path, *,
                 after_healthy: Callable[[PartSpec], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 liveness: Liveness | None = None,
                 log_rotation: LogRotation | None = None,
                 may_start_held: Callable[[], bool] | None = None,
                 rollover_restarts: frozenset[str] = frozenset()) -> None:
        self.parts = parts
        # Whether parts a rollover held (stopped) may be started again now.
        self.may_start_held = may_start_held or (lambda: True)
        # Parts a rollover under way restarts itself (the broker): the supervisor
        # restarting one too raced it for the port (the rollover's broker "exited during
        # start" in a CI run) and the rollover failed after the restart.
        self.rollover_restarts = rollover_restarts
        self.procs = procs
        self.state_dir = state_dir
        self.after_healthy = after_healthy or (lambda spec: None)
        self.clock = clock
        self.states: dict[str, PartState] = {}
        self.children: dict[str, subprocess.Popen] = {}
        self.liveness = liveness or Liveness()
        self.log_rotation = log_rotation or LogRotation()
        self.probers: dict[str, Prober] = {}
        self._kill_at: dict[str, float] = {}  # SIGKILL a terminated part from then on
        # Probes run here, never in the round: a hung part must not hold the others up.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="liveness")
        self._written = ""

    def tick(self) -> None:
        now = self.clock()
        blocked = False  # an earlier part is down or not yet healthy after its restart
        for name, factory in self.parts():
            if name == NAME:
                continue
            st = self.states.setdefault(name, PartState())
            record = self.procs.record(name)
            if record is None or self.procs.stopping(name):
                self._reap(name)
                self.probers.pop(name, None)
                held = None if record is not None or self.procs.stopping(name) \
                    else self.procs.held(name)
                if held is None:
                    continue
                if blocked or not self.may_start_held():
                    st.state = "Held"  # its rollover starts it (or has to restore first)
                    continue
                log.warning("%s was held by a broker rollover that never started it again; "
                            "starting it", name)
                st.state, st.next_start_at = "Waiting", None
                st.last_exit_reason = "stopped by a broker rollover that did not finish"
                self._restart(name, held, factory(), st)
                blocked = True
                continue
            self._bound_log(record)
            if st.state == "Held":  # started again by its rollover (or `up`)
                st.state = "Running"
            if is_alive(record):
                if st.killing is not None:
                    self._finish_kill(name, record, st, now)
                    blocked = True  # as good as down: later parts wait for it
                    continue
                self._probe(name, record, factory, st, now, count=not blocked)
                if st.awaiting_health:
                    spec = factory()
                    if _healthy(spec):
                        st.awaiting_health = False
                        log.info("%s is healthy again", name)
                        try:
                            self.after_healthy(spec)
                        except Exception:  # noqa: BLE001 - logged; the part runs anyway
                            log.exception("after restarting %s", name)
                    else:
                        blocked = True
                if st.state != "Running" and now - record.started_at >= RESET_AFTER_S:
                    st.state, st.quick_exits, st.backoff_s = "Running", 0, 0.0
                continue
            if name in self.rollover_restarts and not self.may_start_held():
                st.state = "Held"  # the rollover under way starts it (or its resume does)
                blocked = True
                continue
            if st.next_start_at is None:
                self._note_exit(name, record, st, now)
            if blocked or now < (st.next_start_at or now):
                blocked = True
                continue
            self._restart(name, record, factory(), st)
            blocked = True  # later parts wait until this one is healthy
        self._write()

    def _probe(self, name: str, record: PartRecord, factory: Callable[[], PartSpec],
               st: PartState, now: float, *, count: bool) -> None:
        """Start a due liveness probe of `name`, or count the one that finished; begin
        terminating the part when it failed `failure_threshold` in a row."""
        pr = self.probers.get(name)
        if pr is None or pr.pid != record.pid:
            spec = factory()  # once per started process: building a spec reads files
            pr = Prober(self.liveness, record.started_at,
                        max(self.liveness.startup_grace_s, spec.start_timeout),
                        pid=record.pid, probe=spec.liveness,
                        next_at=record.started_at if spec.liveness else float("inf"))
            self.probers[name] = pr
            st.liveness_failures = 0
        if pr.future is not None:
            if pr.future.done():
                error = pr.future.result()
            elif now - pr.sent_at > self.liveness.timeout_s + 5.0:
                error = f"no answer within {self.liveness.timeout_s:g}s (probe stuck)"
            else:
                return
            pr.future = None
            must_kill = pr.observe(now, error, count=count)
            if error is not None and pr.failures:
                log.warning("%s: liveness probe failed (%d/%d): %s", name, pr.failures,
                            self.liveness.failure_threshold, error)
            st.liveness_failures = pr.failures
            if must_kill:
                self._start_kill(name, record, st, now, pr)
        elif pr.probe is not None and pr.due(now):
            pr.sent_at = now
            pr.future = self._pool.submit(run_probe, pr.probe, self.liveness.timeout_s)

    def _start_kill(self, name: str, record: PartRecord, st: PartState, now: float,
                    pr: Prober) -> None:
        st.killing = (f"liveness probe failed {pr.failures} times in a row "
                      f"(last: {pr.last_error})")
        st.liveness_kills += 1
        st.next_start_at = None
        pr.next_at = float("inf")  # no more probes of this process
        self._kill_at[name] = now + self.liveness.termination_grace_s
        log.warning("%s: %s; terminating (pid %d)", name, st.killing, record.pid)
        terminate(record)

    def _finish_kill(self, name: str, record: PartRecord, st: PartState, now: float) -> None:
        if now >= self._kill_at.get(name, now):
            log.warning("%s: still running %gs after SIGTERM; SIGKILL", name,
                        self.liveness.termination_grace_s)
            kill(record)

    def _bound_log(self, record: PartRecord) -> None:
        try:
            if logs.rotate_if_needed(Path(record.log), self.log_rotation):
                log.info("rotated %s", record.log)
        except OSError as exc:  # a full disk must not end supervision
            log.warning("could not rotate %s: %s", record.log, exc)

    def _note_exit(self, name: str, record: PartRecord, st: PartState, now: float) -> None:
        code = self._reap(name)
        self.probers.pop(name, None)
        self._kill_at.pop(name, None)
        st.last_exit_code = code
        st.last_exit_reason = describe_exit(code, record.log)
        st.last_exit_liveness = st.killing is not None
        if st.killing is not None:
            st.last_exit_reason = f"{st.killing}; {st.last_exit_reason}"
            st.killing = None
        st.liveness_failures = 0
        st.last_exit_at = now
        quick = now - record.started_at < RESET_AFTER_S
        st.quick_exits = st.quick_exits + 1 if quick else 1
        st.backoff_s = backoff_for(st.quick_exits)
        st.next_start_at = now + st.backoff_s
        st.state = "CrashLoopBackOff" if st.quick_exits >= CRASH_LOOP_EXITS else "Waiting"
        st.awaiting_health = False
        log.warning("%s: %s; restart %d in %.0fs%s", name, st.last_exit_reason,
                    st.restarts + 1, st.backoff_s,
                    " [CrashLoopBackOff]" if st.state == "CrashLoopBackOff" else "")

    def _restart(self, name: str, record: PartRecord, spec: PartSpec, st: PartState) -> None:
        spec.argv = list(record.argv)  # exactly what was started (flags, token file, rate)
        try:
            new = self.procs.start(spec)
        except OSError as exc:
            st.last_exit_reason = f"could not start: {exc}"
            st.quick_exits += 1
            st.backoff_s = backoff_for(st.quick_exits)
            st.next_start_at = self.clock() + st.backoff_s
            log.error("%s: could not start: %s", name, exc)
            return
        child = getattr(self.procs, "last_child", None)
        if child is not None and child.pid == new.pid:
            self.children[name] = child
        st.restarts += 1
        st.next_start_at = None
        st.awaiting_health = True
        if st.state == "Waiting":
            st.state = "Running"
        log.info("%s restarted (pid %d, restart %d)", name, new.pid, st.restarts)

    def _reap(self, name: str) -> int | None:
        """The exit status of `name` when it was our child (reaps it), else None."""
        child = self.children.pop(name, None)
        if child is None:
            return None
        try:
            return child.wait(timeout=1)
        except subprocess.TimeoutExpired:
            self.children[name] = child
            return None

    def _write(self) -> None:
        text = json.dumps({n: s.as_dict() for n, s in self.states.items()}, indent=1)
        if text == self._written:
            return
        path = state_path(self.state_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        self._written = text

    def run(self, stop: threading.Event) -> None:
        log.info("supervising the stack in %s", self.state_dir)
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - one bad round must not end supervision
                log.exception("supervisor round failed")
            stop.wait(TICK_S)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _healthy(spec: PartSpec) -> bool:
    try:
        return bool(spec.health())
    except Exception:  # noqa: BLE001 - a failing probe is "not yet"
        return False


# (kind, name, help, value of a part's state or None when there is nothing to report)
PART_METRICS: list[tuple[str, str, str, Callable[[PartState], float | None]]] = [
    ("counter", "sluice_part_restarts", "Restarts of a stack part by the supervisor",
     lambda st: st.restarts),
    ("gauge", "sluice_part_crashloop", "1 while a part is in CrashLoopBackOff",
     lambda st: 1.0 if st.state == "CrashLoopBackOff" else 0.0),
    ("gauge", "sluice_part_waiting_restart", "1 while a part is down, waiting out its backoff",
     lambda st: 1.0 if st.next_start_at is not None else 0.0),
    ("gauge", "sluice_part_last_exit_code", "Exit code of the last exit (-signal; -1000 unknown)",
     lambda st: None if st.last_exit_at is None
     else -1000 if st.last_exit_code is None else st.last_exit_code),
    ("counter", "sluice_part_liveness_kills", "Times the supervisor killed a part because its "
     "liveness probe failed (a hang, not an exit)", lambda st: st.liveness_kills),
    ("gauge", "sluice_part_liveness_failures", "Liveness probes of a part failed in a row now",
     lambda st: st.liveness_failures),
    ("gauge", "sluice_part_last_exit_liveness", "1 when the part's last exit was a kill by "
     "the supervisor after failed liveness probes",
     lambda st: None if st.last_exit_at is None else float(st.last_exit_liveness)),
]


def rollover_metrics(state_dir: Path) -> Iterable[Any]:
    """The memory broker's rollovers (`eventing.stack.rollover` writes them to the state
    folder; the `retention` part serves no HTTP, so the supervisor exposes them)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from eventing.stack.rollover import load_outcomes

    data = load_outcomes(state_dir)
    count = CounterMetricFamily("sluice_broker_rollovers", "Drained rollovers of the memory "
                                "broker, by outcome (rolled; aborted: intake resumed, broker "
                                "kept)", labels=["outcome"])
    for outcome in ("rolled", "aborted"):
        count.add_metric([outcome], float(data.get(outcome, 0)))
    yield count
    yield CounterMetricFamily("sluice_broker_rollover_pause_seconds",
                              "Intake paused by rollovers that rolled over, in total",
                              value=float(data.get("pause_seconds_sum", 0.0)))
    last = data.get("last") or {}
    if last:
        yield GaugeMetricFamily("sluice_broker_rollover_last_pause_seconds",
                                "Intake pause of the last rollover attempt",
                                value=float(last.get("pause_s", 0.0)))
        yield GaugeMetricFamily("sluice_broker_rollover_last_timestamp_seconds",
                                "When the last rollover attempt started (epoch s)",
                                value=float(last.get("started_at", 0.0)))


def serve_metrics(sup: Supervisor, host: str, port: int) -> None:
    """`sluice_part_*` per part for Prometheus, and `/healthz`."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import REGISTRY, Collector

    from eventing.telemetry import metrics

    class _Collector(Collector):
        def collect(self):  # type: ignore[override]
            for kind, name, text, value in PART_METRICS:
                family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                    name, text, labels=["part"])
                for part, st in list(sup.states.items()):
                    if (v := value(st)) is not None:
                        family.add_metric([part], v)
                yield family
            yield from rollover_metrics(sup.state_dir)

    REGISTRY.register(_Collector())
    metrics.serve_metrics(host, port, lambda: (True, {"parts": len(sup.states)}))
