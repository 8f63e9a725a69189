"""Unit tests of the memory broker's drained rollover: the order of its steps and every
abort path (`eventing.stack.rollover.Rollover` against a fake broker and a fake clock),
the gateway's intake pause (a fake producer holding acks) and the publisher's retry of
a paused gateway. The real thing, end to end, is tests/test_rollover_stack.py."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from eventing.ingest.publish import GatewayError, Publisher
from eventing.stack.rollover import (
    Outcome,
    Rollover,
    RolloverSettings,
    Saved,
    Unfinished,
    latest_per_key,
)
from tests.test_gateway import TYPE, Harness, payment, structured


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


class FakeBroker:
    """Records the calls in order; `fail` names a step that raises, `drain` the answers.
    `file` stands for the unfinished-rollover file in the state folder and `broker_id`
    for the broker process running (a restart gives a new one): both outlive a
    `Rollover`, as the state folder and the broker outlive a killed rollover process."""

    def __init__(self, drain: list[tuple[bool, str]] | None = None,
                 fail: str | None = None) -> None:
        self.calls: list[str] = []
        self.drain = drain if drain is not None else [(True, "ends=5"), (True, "ends=5")]
        self.fail = fail
        self.size = 600 << 20
        self.file: Unfinished | None = None
        self.broker_id = (100, 1)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.fail == name:
            raise RuntimeError(f"{name} broke")

    def rss(self) -> int | None:
        return self.size

    def pause_intake(self, lease_s: float) -> None:
        self._call("pause")

    def resume_intake(self) -> None:
        self._call("resume")

    def drained(self) -> tuple[bool, str]:
        self._call("drained")
        return self.drain.pop(0) if len(self.drain) > 1 else self.drain[0]

    def stop_stateful(self) -> list[str]:
        self._call("stop")
        return ["fn-score"]

    def start_parts(self, names: list[str]) -> None:
        self._call("start " + ",".join(names))

    def save(self) -> Saved:
        self._call("save")
        return Saved({"_schemas": 1}, set(), [("_schemas", 0, 0, b"k", b"v", None, None)],
                     broker=self.broker_id)

    def keep(self, unfinished: Unfinished) -> None:
        self._call("keep")
        self.file = unfinished

    def unfinished(self) -> Unfinished | None:
        return self.file

    def pending(self) -> bool:
        return self.file is not None

    def forget(self) -> None:
        self._call("forget")
        self.file = None

    def replaced(self, saved: Saved) -> bool:
        return self.broker_id != saved.broker

    def restart(self, saved: Saved) -> None:
        if self.broker_id == saved.broker:
            self._call("restart")
            self.broker_id = (self.broker_id[0] + 1, 1)
            self.size = 30 << 20

    def recreate_topics(self, saved: Saved) -> None:
        self._call("recreate")

    def restore(self, saved: Saved) -> int:
        self._call("restore")
        return 0

    def check_registry(self) -> None:
        self._call("registry")


def rollover(broker: FakeBroker, **settings: Any) -> tuple[Rollover, list[Outcome], FakeClock]:
    clock = FakeClock()
    recorded: list[Outcome] = []
    r = Rollover(broker, RolloverSettings(**settings), clock=clock, sleep=clock.sleep,
                 record=recorded.append)
    return r, recorded, clock


def test_a_rollover_runs_its_steps_in_order_and_resumes_last():
    b = FakeBroker()
    r, recorded, _ = rollover(b)
    out = r.run("test")
    assert b.calls == ["pause", "drained", "drained", "stop", "save", "keep", "restart",
                       "recreate", "restore", "registry", "forget", "start fn-score", "resume"]
    assert b.file is None
    assert out.rolled and recorded == [out]
    assert out.saved == {"_schemas": 1}
    assert out.rss_before == 600 << 20 and out.rss_after == 30 << 20


def test_drained_needs_two_equal_answers_in_a_row():
    # Ends that moved between two checks: something was still producing.
    b = FakeBroker(drain=[(True, "a=1"), (True, "a=2"), (False, "behind"), (True, "a=2"),
                          (True, "a=2")])
    r, _, _ = rollover(b)
    assert r.run("test").rolled
    assert b.calls.count("drained") == 5


def test_drain_timeout_resumes_intake_without_a_rollover():
    b = FakeBroker(drain=[(False, "behind: fn x[0] 1/2")])
    r, recorded, clock = rollover(b, drain_timeout_s=10.0, drain_poll_s=0.5)
    out = r.run("test")
    assert not out.rolled and out.failed_step == "drain" and "behind" in out.reason
    assert "restart" not in b.calls and "stop" not in b.calls
    assert b.calls[-1] == "resume" and recorded == [out]
    assert 10.0 <= clock.now <= 11.0  # bounded by the timeout, not by the readers


@pytest.mark.parametrize("step", ["pause", "stop", "save"])
def test_a_failure_before_the_restart_leaves_the_broker_and_restarts_what_stopped(step):
    b = FakeBroker(fail=step)
    r, recorded, _ = rollover(b)
    out = r.run("test")
    assert not out.rolled and "restart" not in b.calls and recorded == [out]
    assert b.calls[-1] == "resume"
    assert ("start fn-score" in b.calls) == (step == "save")  # stopped -> started again


def test_a_failure_after_the_restart_keeps_the_file_and_the_functions_held_then_is_finished():
    b = FakeBroker(fail="restore")
    r, recorded, _ = rollover(b)
    with pytest.raises(RuntimeError, match="restore broke"):
        r.run("test")
    # Intake resumes, but score is not started on a broker without its changelog.
    assert b.calls[-1] == "resume" and "start fn-score" not in b.calls
    assert len(recorded) == 1 and recorded[0].failed_step == "restore records"
    assert b.file is not None and b.file.stopped == ["fn-score"]
    # The next run finishes it: no drain, no second save or restart, the records back.
    b.fail, b.calls = None, []
    out = r.run("again")
    assert b.calls == ["pause", "recreate", "restore", "registry", "forget",
                       "start fn-score", "resume"]
    assert out.rolled and out.finished and "test" in out.finished and b.file is None


def test_due_only_above_the_cap():
    b = FakeBroker()
    r, _, _ = rollover(b, max_rss=700 << 20)
    assert not r.due()
    b.size = 701 << 20
    assert r.due()


def test_latest_per_key_keeps_the_last_record_of_each_key_per_partition():
    recs = [("t", 0, 0, b"a", b"1", None, None), ("t", 0, 1, b"b", b"1", None, None),
            ("t", 0, 2, b"a", b"2", None, None), ("t", 1, 0, b"a", b"x", None, None),
            ("t", 0, 3, None, b"n", None, None), ("t", 0, 4, b"b", None, None, None)]
    assert [(r[1], r[2]) for r in latest_per_key(recs)] == [(0, 2), (0, 4), (1, 0)]


# --------------------------------------------------------------------------- the gateway


def test_pause_waits_for_in_flight_acks_then_refuses_until_resumed():
    h = Harness()
    with TestClient(h.app) as client:
        assert client.post("/", json=structured(1),
                           headers={"content-type": "application/cloudevents+json"}
                           ).status_code == 202
        assert h.producer is not None
        h.producer.release.clear()  # the broker holds the next ack
        answers: dict[str, Any] = {}
        slow = threading.Thread(target=lambda: answers.update(slow=client.post(
            "/", json=structured(2), headers={"content-type": "application/cloudevents+json"})))
        slow.start()
        while len(h.producer.records) < 2:
            time.sleep(0.01)
        pause = threading.Thread(target=lambda: answers.update(pause=client.post(
            "/admin/pause", json={"lease_s": 30})))
        pause.start()
        time.sleep(0.3)
        assert pause.is_alive(), "pause answered while a produce was still in flight"
        refused = client.post("/", json=structured(3),
                              headers={"content-type": "application/cloudevents+json"})
        assert refused.status_code == 503 and refused.json()["error"] == "paused"
        assert refused.headers["retry-after"] == "1"
        h.producer.release.set()
        pause.join(5)
        slow.join(5)
        assert answers["slow"].status_code == 202
        assert answers["pause"].status_code == 200 and answers["pause"].json()["in_flight"] == 0
        assert [r[2] for r in h.producer.records].count(None) == 0
        assert len(h.producer.records) == 2  # the refused event was never produced
        assert client.post("/admin/resume").json() == {"paused": False, "was_paused": True}
        assert client.post("/", json=structured(4), headers={
            "content-type": "application/cloudevents+json"}).status_code == 202


def test_a_pause_ends_by_itself_when_its_lease_runs_out():
    h = Harness()
    with TestClient(h.app) as client:
        assert client.post("/admin/pause", json={"lease_s": 0.2}).json()["paused"]
        ce = {"content-type": "application/cloudevents+json"}
        assert client.post("/", json=structured(1), headers=ce).status_code == 503
        time.sleep(0.3)
        assert client.post("/", json=structured(2), headers=ce).status_code == 202


def test_pause_and_resume_need_the_token_when_one_is_set():
    h = Harness(token="s3cret")
    with TestClient(h.app) as client:
        assert client.post("/admin/pause", json={"lease_s": 5}).status_code == 401
        assert client.post("/admin/resume").status_code == 401
        ok = client.post("/admin/pause", json={"lease_s": 5},
                         headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["paused"]


def test_the_publisher_waits_out_a_pause_beyond_its_retries():
    calls = {"n": 0}

    def gateway(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] <= 5:  # more pause answers than `retries`
            return httpx.Response(503, headers={"retry-after": "0.1"},
                                  json={"error": "paused", "reason": "rollover"})
        return httpx.Response(202, json={"accepted": 1, "ids": ["x"]})

    pub = Publisher("http://gw", client=httpx.Client(transport=httpx.MockTransport(gateway)),
                    retries=1)
    assert pub.send({"type": TYPE, "data": payment()})
    assert calls["n"] == 6
    calls["n"] = 0
    pub.pause_wait_s = 0.15  # a pause that outlasts the wait is reported
    with pytest.raises(GatewayError) as info:
        pub.send({"type": TYPE, "data": payment()})
    assert info.value.status == 503 and info.value.error == "paused"


def test_the_loop_rolls_over_only_when_the_rss_is_above_the_cap():
    b = FakeBroker()
    r, recorded, _ = rollover(b, max_rss=500 << 20, check_s=0.0)

    class StopAfter:
        def __init__(self, n: int) -> None:
            self.n = n

        def is_set(self) -> bool:
            return self.n <= 0

        def wait(self, _s: float) -> None:
            self.n -= 1

    r.loop(StopAfter(3))  # 600 MiB: rolls over, then the new broker (30 MiB) is left alone
    assert b.calls.count("restart") == 1 and len(recorded) == 1
    assert "above 500 MiB" in recorded[0].reason


def test_up_hands_the_rss_cap_and_token_file_to_the_rollover_part(tmp_path):
    from eventing.stack import retention
    from eventing.stack.settings import load_settings

    token = tmp_path / "token"
    token.write_text("t")
    s = load_settings(state_dir=tmp_path / "state", broker_max_rss=64 << 20,
                      gateway_token_file=token)
    argv = retention.spec(s).argv
    assert argv[argv.index("--max-broker-rss") + 1] == str(64 << 20)
    assert argv[argv.index("--token-file") + 1] == str(token)
    assert "64 MiB" in retention.spec(s).endpoint
    from eventing.stack.supervisor import core_parts

    assert retention.spec in core_parts(s)  # memory storage runs it too now


# --------------------------------------------------------------------------- crash and resume


class Killed(BaseException):
    """Stands for kill -9 of the rollover process at the held step (nothing after it in
    that process matters: the next `Rollover` starts from the fake's lasting state)."""


def test_a_rollover_killed_after_the_broker_restart_is_finished_by_the_next_run():
    b = FakeBroker()
    clock = FakeClock()

    def killed(s: float) -> None:  # the drain's polls pass; the hold is where it dies
        if s >= 3600:
            raise Killed
        clock.sleep(s)

    dying = Rollover(b, RolloverSettings(hold_at="recreate topics"), clock=clock, sleep=killed)
    with pytest.raises(Killed):
        dying.run("rss")
    assert b.calls[:7] == ["pause", "drained", "drained", "stop", "save", "keep", "restart"]
    assert "start fn-score" not in b.calls  # score stays held with the file
    assert b.file is not None and b.file.saved.records == [
        ("_schemas", 0, 0, b"k", b"v", None, None)]
    # The retention part restarted by the supervisor: same steps from the one reached.
    b.calls = []
    r, recorded, _ = rollover(b)
    out = r.run("an interrupted rollover left its saved records")
    assert b.calls == ["pause", "recreate", "restore", "registry", "forget",
                       "start fn-score", "resume"]
    assert out.rolled and out.finished.endswith("(rss)") and recorded == [out]
    assert out.saved == {"_schemas": 1}


def test_an_interrupted_rollover_whose_broker_never_stopped_only_starts_and_resumes():
    # Killed between writing the file and stopping the broker: the old broker still
    # holds every record, so nothing is restored; score starts, intake resumes.
    b = FakeBroker()
    b.file = Unfinished("rss", 1.0, ["fn-score"], Saved({"_schemas": 1}, set(), [],
                                                        broker=b.broker_id))
    r, recorded, _ = rollover(b)
    out = r.run("again")
    assert b.calls == ["pause", "forget", "start fn-score", "resume"]
    assert not out.rolled and "had not restarted the broker" in out.reason
    assert b.file is None and recorded == [out]


def test_the_loop_finishes_an_interrupted_rollover_below_the_cap():
    b = FakeBroker()
    b.size = 10 << 20
    b.broker_id = (200, 1)  # restarted before the rollover died
    b.file = Unfinished("rss", 1.0, ["fn-score"], Saved({"_schemas": 1}, set(), [],
                                                        broker=(100, 1)))
    r, recorded, _ = rollover(b, max_rss=500 << 20, check_s=0.0)

    class Once:
        n = 1

        def is_set(self) -> bool:
            return self.n <= 0

        def wait(self, _s: float) -> None:
            self.n -= 1

    r.loop(Once())
    assert recorded and recorded[0].rolled and b.file is None
    assert "restart" not in b.calls and "start fn-score" in b.calls


def test_the_unfinished_file_keeps_every_byte_and_a_cut_file_is_refused(tmp_path):
    from eventing.stack.rollover import read_unfinished, write_unfinished

    records = [("_schemas", 0, 0, b'{"k":1}', b"\x00\xff\xfe", None, 1700000000000),
               ("dl", 1, 7, None, b"v", [("ce_id", b"\x80\x81"), ("empty", None),
                                         ("ce_id", b"")], None),
               ("score.state", 2, 3, b"card\x00", None, [], 5)]  # a tombstone
    saved = Saved({"_schemas": 1, "dl": 2, "score.state": 3}, {"score.state"}, records,
                  broker=(4242, 99))
    path = tmp_path / "data" / "retention" / "unfinished.jsonl"
    assert read_unfinished(path) is None
    write_unfinished(path, Unfinished("why", 12.5, ["fn-score"], saved))
    back = read_unfinished(path)
    assert back is not None
    assert back.saved.records == [(t, p, o, k, v, None if h is None else list(h), ts)
                                  for t, p, o, k, v, h, ts in records]
    assert (back.saved.partitions, back.saved.compacted, back.saved.broker) == (
        saved.partitions, saved.compacted, (4242, 99))
    assert (back.reason, back.started_at, back.stopped) == ("why", 12.5, ["fn-score"])
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # a record missing
    with pytest.raises(ValueError, match="not a whole"):
        read_unfinished(path)


def test_missing_counts_each_present_record_once():
    from eventing.stack.rollover import missing

    saved = [("t", 0, 0, b"a", b"1", None, None), ("t", 0, 1, b"a", b"1", None, None),
             ("t", 0, 2, b"b", b"2", [("h", b"x")], None), ("t", 1, 0, b"a", b"1", None, None)]
    # A copy-back cut off after the first record of partition 0; headers as read back.
    present = [("t", 0, 0, b"a", b"1", None, None)]
    assert missing(saved, present) == saved[1:]
    everything = [(t, p, o, k, v, list(h) if h else None, None) for t, p, o, k, v, h, _ in saved]
    assert missing(saved, everything) == []
    # Same bytes under another header value is another record.
    assert missing(saved[2:3], [("t", 0, 0, b"b", b"2", [("h", b"y")], None)]) == saved[2:3]


def test_under_way_while_the_lock_is_held_or_a_file_is_left(tmp_path):
    import fcntl

    from eventing.stack.rollover import lock_path, under_way, unfinished_path

    assert not under_way(tmp_path)  # no folder yet
    lock_path(tmp_path).parent.mkdir(parents=True)
    with open(lock_path(tmp_path), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert under_way(tmp_path)
    assert not under_way(tmp_path)  # released (as by the kernel at kill -9)
    unfinished_path(tmp_path).write_text("x")
    assert under_way(tmp_path)
