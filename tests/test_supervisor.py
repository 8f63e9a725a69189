"""The stack's supervisor with real (tiny) processes: restarts, backoff, crash loops."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from eventing.stack import watchdog
from eventing.stack.process import PartSpec, ProcessDir, is_alive
from eventing.stack.settings import Liveness
from eventing.stack.watchdog import Prober, Supervisor, backoff_for, load_states
from tests.helpers import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _spec(name: str, code: str) -> PartSpec:
    return PartSpec(name=name, argv=[sys.executable, "-c", code], endpoint=name,
                    health=lambda: True, env=dict(os.environ))


@pytest.fixture
def procs(tmp_path: Path):
    procs = ProcessDir(tmp_path)
    yield procs
    for record in procs.records():
        procs.stop(record, timeout=2)


def _supervisor(procs: ProcessDir, tmp_path: Path, specs: dict[str, PartSpec],
                clock: Clock) -> Supervisor:
    def parts():
        for name, spec in specs.items():
            yield name, (lambda s=spec: PartSpec(**{**s.__dict__, "argv": list(s.argv)}))

    return Supervisor(parts, procs, tmp_path, clock=clock)


def _wait_dead(procs: ProcessDir, name: str) -> None:
    wait_until(lambda: not is_alive(procs.record(name)), 10, f"{name} to exit")


def test_backoff_doubles_from_the_second_quick_exit_and_caps() -> None:
    assert [backoff_for(n) for n in range(1, 6)] == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert backoff_for(50) == watchdog.MAX_BACKOFF_S


def test_a_killed_part_is_restarted_with_its_exit_reason(procs, tmp_path) -> None:
    specs = {"sleeper": _spec("sleeper", "import time; print('serving'); time.sleep(60)")}
    clock = Clock()
    sup = _supervisor(procs, tmp_path, specs, clock)
    first = procs.start(specs["sleeper"])
    wait_until(lambda: "serving" in Path(first.log).read_text(), 10, "the part to log")
    sup.tick()
    assert sup.states["sleeper"].restarts == 0

    os.kill(first.pid, signal.SIGKILL)  # started by `up`: not the supervisor's child
    _wait_dead(procs, "sleeper")
    sup.tick()
    second = procs.record("sleeper")
    assert second.pid != first.pid and is_alive(second)
    st = sup.states["sleeper"]
    assert st.restarts == 1
    assert st.last_exit_reason.startswith("exited (status unknown")
    assert "serving" in st.last_exit_reason  # the log's last line

    os.kill(second.pid, signal.SIGKILL)  # now its child: the exact reason is known
    _wait_dead(procs, "sleeper")
    clock.now += 5
    sup.tick()  # second quick exit: waits 1 s first
    assert st.last_exit_reason.startswith("killed by SIGKILL")
    assert st.last_exit_code == -signal.SIGKILL
    assert st.state == "Waiting" and st.restarts == 1 and st.backoff_s == 1.0
    clock.now += 1.0
    sup.tick()
    assert st.restarts == 2 and is_alive(procs.record("sleeper"))
    saved = load_states(tmp_path)["sleeper"]
    assert saved["restarts"] == 2 and saved["last_exit_code"] == -signal.SIGKILL


def test_a_part_that_keeps_failing_is_in_crash_loop_backoff(procs, tmp_path) -> None:
    specs = {"bad": _spec("bad", "import sys; print('config is broken'); sys.exit(3)")}
    clock = Clock()
    sup = _supervisor(procs, tmp_path, specs, clock)
    procs.start(specs["bad"])
    waits = []
    for _ in range(5):
        _wait_dead(procs, "bad")
        sup.tick()  # notes the exit; restarts when no backoff is due
        st = sup.states["bad"]
        waits.append(st.backoff_s)
        if st.next_start_at is not None:
            clock.now = st.next_start_at
            sup.tick()
    assert waits == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert st.state == "CrashLoopBackOff"
    assert st.last_exit_reason == "exit code 3; log: config is broken"
    assert st.restarts == 5

    # Up for RESET_AFTER_S: running again, the backoff forgotten.
    sleeper = _spec("bad", "import time; time.sleep(60)")
    procs.start(sleeper)
    clock.now += watchdog.RESET_AFTER_S + 1
    sup.tick()
    assert (st.state, st.quick_exits, st.backoff_s) == ("Running", 0, 0.0)


def test_a_part_being_stopped_or_never_started_is_left_alone(procs, tmp_path) -> None:
    specs = {"gone": _spec("gone", "import time; time.sleep(60)"),
             "never": _spec("never", "import time; time.sleep(60)")}
    sup = _supervisor(procs, tmp_path, specs, Clock())
    procs.start(specs["gone"])
    procs.stop(procs.record("gone"), timeout=2)  # what `down` does: record removed
    sup.tick()
    assert procs.record("gone") is None and procs.record("never") is None

    record = procs.start(specs["gone"])
    procs.stopping_path("gone").touch()  # a stop under way
    os.kill(record.pid, signal.SIGKILL)
    _wait_dead(procs, "gone")
    sup.tick()
    assert procs.record("gone").pid == record.pid  # not restarted
    procs.stopping_path("gone").unlink()


def test_a_part_held_by_a_rollover_that_died_is_started_again_once_none_is_under_way(
        procs, tmp_path) -> None:
    # What a broker rollover does to fn-score: stop it, held (its record kept aside).
    spec = _spec("held", "import sys, time; print(sys.argv); time.sleep(60)")
    spec.argv = [*spec.argv, "--as-started"]
    rollover = {"under_way": True}
    sup = Supervisor(lambda: iter([("held", lambda: _spec("held", "raise SystemExit(9)"))]),
                     procs, tmp_path, clock=Clock(), may_start_held=lambda: not rollover[
                         "under_way"])
    first = procs.start(spec)
    assert procs.hold(first, timeout=2)
    assert procs.record("held") is None and procs.held("held") is not None
    for _ in range(3):
        sup.tick()
    assert procs.record("held") is None  # the rollover still runs (or has to restore)
    assert sup.states["held"].state == "Held" and load_states(tmp_path)["held"]["state"] == "Held"

    rollover["under_way"] = False  # it died, and no saved records wait to be put back
    sup.tick()
    again = procs.record("held")
    assert again is not None and is_alive(again) and again.pid != first.pid
    assert again.argv == spec.argv  # the command it was started with, not the spec's now
    assert procs.held("held") is None
    assert sup.states["held"].restarts == 1 and sup.states["held"].state == "Running"
    assert "rollover" in sup.states["held"].last_exit_reason
    sup.tick()
    assert procs.record("held").pid == again.pid  # started once


def test_a_broker_that_exited_during_a_rollover_is_left_to_the_rollover(procs, tmp_path):
    """The rollover kills the broker and starts the new one itself: a supervisor that
    restarted it too raced it for the port (a CI run). Once no rollover is under way, an
    exited broker is the supervisor's to restart again."""
    spec = _spec("broker", "import time; time.sleep(60)")
    rollover = {"under_way": True}
    sup = Supervisor(lambda: iter([("broker", lambda: spec)]), procs, tmp_path, clock=Clock(),
                     may_start_held=lambda: not rollover["under_way"],
                     rollover_restarts=frozenset({"broker"}))
    first = procs.start(spec)
    os.kill(first.pid, signal.SIGKILL)  # as the rollover's stop ends
    _wait_dead(procs, "broker")
    for _ in range(3):
        sup.tick()
    assert procs.record("broker").pid == first.pid  # not started by the supervisor
    assert sup.states["broker"].state == "Held" and sup.states["broker"].restarts == 0

    rollover["under_way"] = False  # the rollover died before starting one
    sup.tick()
    again = procs.record("broker")
    assert again.pid != first.pid and is_alive(again)
    assert sup.states["broker"].restarts == 1


def test_a_part_stopped_by_down_stays_stopped_even_when_no_rollover_runs(procs, tmp_path):
    spec = _spec("plain", "import time; time.sleep(60)")
    sup = Supervisor(lambda: iter([("plain", lambda: spec)]), procs, tmp_path, clock=Clock(),
                     may_start_held=lambda: True)
    procs.stop(procs.start(spec), timeout=2)
    sup.tick()
    assert procs.record("plain") is None


def test_a_later_part_waits_for_an_earlier_one_to_be_healthy(procs, tmp_path) -> None:
    healthy = {"ok": False}
    first = _spec("first", "import time; time.sleep(60)")
    first.health = lambda: healthy["ok"]
    specs = {"first": first, "second": _spec("second", "import time; time.sleep(60)")}
    sup = _supervisor(procs, tmp_path, specs, Clock())
    a, b = procs.start(specs["first"]), procs.start(specs["second"])
    for r in (a, b):
        os.kill(r.pid, signal.SIGKILL)
        _wait_dead(procs, r.name)
    sup.tick()
    assert is_alive(procs.record("first")) and not is_alive(procs.record("second"))
    sup.tick()
    assert not is_alive(procs.record("second"))  # `first` is not healthy yet
    healthy["ok"] = True
    sup.tick()
    assert is_alive(procs.record("second"))


def test_up_refuses_a_layout_with_a_taken_port_before_starting_anything(tmp_path) -> None:
    """Offsets 1000 apart: weed's master gRPC port of one stack is the other's S3 gRPC
    port (19333 + 3000 = 18333 + 4000). `up` names the port and a free offset."""
    import socket

    from eventing.stack.settings import Ports, load_settings
    from eventing.stack.supervisor import Stack, StackError
    from tests.helpers import free_port_offset

    offset = free_port_offset()
    settings = load_settings(state_dir=tmp_path / "state", port_offset=offset,
                             pipeline=False)
    other_master_grpc = Ports().shifted(offset - 1000).weed_master_grpc
    assert other_master_grpc == settings.ports.weed_s3_grpc
    stack = Stack(settings)
    with socket.socket() as other:
        other.bind(("127.0.0.1", other_master_grpc))
        other.listen()
        taken = rf"objectstore {other_master_grpc}.*--port-offset \d+"
        with pytest.raises(StackError, match=taken):
            stack.up(log=lambda _: None)
    assert stack.procs.records() == []  # nothing was started


# --------------------------------------------------------------------------- liveness


def test_the_liveness_state_machine_kills_after_threshold_failures_in_a_row() -> None:
    """Kubelet rules on a fake clock: failures in the startup grace do not count, a pass
    ends the grace and resets the count, `failure_threshold` in a row kills."""
    live = Liveness(period_s=10, timeout_s=5, failure_threshold=3, startup_grace_s=60)
    pr = Prober(live, started_at=1000.0, grace_s=60.0, next_at=1000.0)
    now = 1000.0
    assert pr.due(now)
    # A slow start: failing for 50 s is no reason to kill.
    for _ in range(5):
        assert not pr.observe(now, "connection refused")
        assert not pr.due(now + 9.9) and pr.due(now + 10)
        now += 10
    assert pr.failures == 0
    assert not pr.observe(now, None)  # healthy: the grace is over from now on
    now += 10
    assert not pr.observe(now, "no answer within 5s")
    now += 10
    assert not pr.observe(now, "no answer within 5s")
    now += 10
    assert not pr.observe(now, None)  # one pass: the count starts again
    assert pr.failures == 0
    results = []
    for _ in range(3):
        now += 10
        results.append(pr.observe(now, "GET /healthz: HTTP 503"))
    assert results == [False, False, True]
    assert pr.last_error == "GET /healthz: HTTP 503"

    # Never healthy: once the grace is over, failures count.
    stuck = Prober(live, started_at=0.0, grace_s=60.0)
    assert [stuck.observe(t, "refused") for t in (10, 30, 59, 61, 71, 81)] == \
        [False, False, False, False, False, True]
    # Not counted while an earlier part restarts (count=False).
    held = Prober(live, started_at=0.0, grace_s=0.0)
    assert not any(held.observe(t, "refused", count=False) for t in range(0, 100, 10))
    assert held.failures == 0


def test_run_probe_names_a_timeout_and_a_status() -> None:
    import httpx

    from eventing.stack.health import ProbeFailed
    from eventing.stack.watchdog import run_probe

    def slow(timeout: float) -> None:
        raise httpx.ReadTimeout("timed out")

    def bad(timeout: float) -> None:
        raise ProbeFailed("GET http://x/healthz: HTTP 503")

    assert run_probe(slow, 2.5) == "no answer within 2.5s"
    assert run_probe(bad, 1) == "GET http://x/healthz: HTTP 503"
    assert run_probe(lambda timeout: None, 1) is None


SERVER = """
import http.server, signal, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
signal.signal(signal.SIGTERM, lambda *a: (print("got SIGTERM", flush=True), sys.exit(0)))
print("serving", flush=True)
srv.serve_forever()
"""


def test_a_hung_part_is_killed_and_restarted_with_the_reason(procs, tmp_path) -> None:
    """A real HTTP part, SIGSTOPped: its probe times out, it is terminated (SIGTERM plus
    SIGCONT, so it shuts down cleanly), restarted, probed healthy again."""
    from eventing.stack.health import http_probe
    from tests.helpers import free_port

    port = free_port()
    spec = PartSpec(name="web", argv=[sys.executable, "-c", SERVER, str(port)], endpoint="web",
                    health=lambda: True, env=dict(os.environ), start_timeout=0.0,
                    liveness=http_probe(f"http://127.0.0.1:{port}/"))
    # The startup grace matters here too: with none, a restarted Python process that
    # is not listening yet (a second or more under load) is killed again and again.
    live = Liveness(period_s=0.2, timeout_s=0.5, failure_threshold=3, startup_grace_s=60.0,
                    termination_grace_s=5.0)

    def parts():
        yield "web", (lambda: PartSpec(**{**spec.__dict__, "argv": list(spec.argv)}))

    sup = Supervisor(parts, procs, tmp_path, liveness=live)
    first = procs.start(spec)
    wait_until(lambda: "serving" in Path(first.log).read_text(), 20, "the part to serve")

    def tick_until(pred, what: str, timeout: float = 30):
        def step():
            sup.tick()
            return pred()
        wait_until(step, timeout, what, interval=0.1)

    tick_until(lambda: "web" in sup.probers and sup.probers["web"].passed, "a passing probe")
    os.kill(first.pid, signal.SIGSTOP)
    tick_until(lambda: sup.states["web"].restarts == 1, "the hung part to be restarted")
    st = sup.states["web"]
    assert st.liveness_kills == 1 and st.last_exit_liveness
    assert st.last_exit_reason.startswith("liveness probe failed 3 times in a row "
                                          "(last: no answer within 0.5s)")
    assert "got SIGTERM" in st.last_exit_reason  # the log's last line: a clean shutdown
    assert procs.record("web").pid != first.pid
    tick_until(lambda: "web" in sup.probers and sup.probers["web"].passed,
               f"the new process to pass its probe ({sup.probers.get('web')}; "
               f"log: {Path(first.log).read_text()[-300:]})")
    assert st.liveness_failures == 0 and load_states(tmp_path)["web"]["liveness_kills"] == 1


def test_a_part_without_a_liveness_probe_is_never_probed(procs, tmp_path) -> None:
    spec = _spec("quiet", "import time; time.sleep(60)")
    sup = _supervisor(procs, tmp_path, {"quiet": spec}, Clock())
    record = procs.start(spec)
    os.kill(record.pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            sup.tick()
        assert sup.probers["quiet"].future is None and not sup.probers["quiet"].due(1e12)
        assert procs.record("quiet").pid == record.pid
    finally:
        os.kill(record.pid, signal.SIGCONT)


def test_the_kafka_probe_needs_an_answer_not_just_a_connection() -> None:
    """A listening socket nobody serves (what a stopped broker looks like to a client:
    the kernel completes the handshake) fails the probe; one that answers ApiVersions
    with the request's correlation id passes."""
    import socket
    import struct
    import threading

    from eventing.stack.health import kafka_probe
    from eventing.stack.watchdog import run_probe

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    answering = socket.socket()
    answering.bind(("127.0.0.1", 0))
    answering.listen()

    def serve() -> None:
        conn, _ = answering.accept()
        with conn:
            size = struct.unpack(">i", conn.recv(4))[0]
            request = conn.recv(size)
            correlation = request[4:8]
            body = correlation + b"\0\0" + b"\0\0\0\0"
            conn.sendall(struct.pack(">i", len(body)) + body)

    threading.Thread(target=serve, daemon=True).start()
    try:
        assert run_probe(kafka_probe("127.0.0.1", silent.getsockname()[1]), 0.5) == \
            "no answer within 0.5s"
        assert run_probe(kafka_probe("127.0.0.1", answering.getsockname()[1]), 5) is None
    finally:
        silent.close()
        answering.close()
