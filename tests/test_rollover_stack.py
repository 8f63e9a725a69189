"""A drained rollover of the memory broker mid-stream, on the real stack (issue 12).

2,000 payments stream through the example pipeline at 100/s; a third of the way in,
`sluice retention --rollover-now` pauses the gateway, drains every reader, keeps the
registry log, the dead letters and score's changelog, restarts the broker and puts them
back. Afterwards every payment is exactly once in the lake and the real-time table, the
dead letter from before is still listed (same reference), a card's window counts the
payments from before the rollover exactly as a card that saw no rollover does, schema ids
are unchanged, and the new broker is smaller than the old one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import pytest
from confluent_kafka import Producer

from eventing import scan
from eventing.ingest.publish import Publisher
from eventing.kafka import ensure_topics, produce, producer_config
from eventing.stack.process import ProcessDir
from eventing.stack.rollover import ENV_HOLD_AT, load_outcomes, rss_of, unfinished_path
from eventing.stack.watchdog import load_states
from eventing.topology import DEFAULT_DEAD_LETTER_TOPIC
from functions.generate import event_for
from tests.helpers import ROOT, sluice, unique, wait_until
from tests.test_fraud_pipeline import (
    CARDS,
    REF,
    _offset,
    _part_status,
    _rt_count,
    lake_con,  # noqa: F401 - a fixture
    lake_ids,
    paced,
    part_pid,
    publish,
    read_scored,
    traffic,
    wait_lake,
)

pytestmark = pytest.mark.stack

N = 2000
RATE = 100.0



def _before(pipeline, witness: str, tag: str, now: int, n: int, seed: int):
    """`n` payments (not yet sent), a poison one, and the witness card's three payments;
    the three and the poison are published: scored, and the poison a dead letter."""
    payments = [p for p, _ in traffic(slice(300, 650), n, seed=seed, fraud_share=0.0)]
    prefix = payments[0]["payment_id"].rsplit("-", 1)[0]
    poison = dict(payments[0], payment_id=f"{prefix}-poison", event_time=10**16)
    before = [_witness(witness, tag, now, i) for i in range(3)]
    assert publish(pipeline, [*before, poison]) == 4
    assert len(read_scored(pipeline, {p["payment_id"] for p in before})) == 3
    wait_until(lambda: poison["payment_id"] in _deadletters(pipeline) or None, 30,
               "the poison payment among the dead letters")
    return payments, prefix, poison, before

def _witness(card: str, tag: str, now: int, index: int) -> dict:
    return {"payment_id": f"w{tag}-{card}-{index}", "card_id": card, "merchant_id": "m-0001",
            "amount": 20.0 + index, "currency": "EUR", "country": REF.cards[card],
            "event_time": now - 60_000 + index * 10_000}


def _fill(pipeline, topic: str, n: int, size: int) -> None:
    ensure_topics(pipeline.bootstrap, {topic: 1})
    producer = Producer(producer_config(pipeline.bootstrap))
    for i in range(n):
        produce(producer, topic, bytes(size), str(i).encode())
    assert producer.flush(60) == 0


def _deadletters(pipeline) -> dict[str, str]:
    """Dead letter id -> its reference (topic/partition/offset), as `sluice deadletters
    list` shows them."""
    out = sluice("deadletters", "list", "-o", "json", state_dir=pipeline.state_dir,
                 offset=_offset(pipeline))
    return {r["id"]: r["ref"] for r in json.loads(out.stdout)}


def _schema_ids(pipeline) -> dict[str, int]:
    url = pipeline.registry_url
    return {s: httpx.get(f"{url}/subjects/{s}/versions/latest", timeout=10).json()["id"]
            for s in httpx.get(f"{url}/subjects", timeout=10).json()}


def test_a_rollover_mid_stream_loses_nothing_accepted(pipeline, lake_con) -> None:  # noqa: F811
    tag = str(int(time.time()))
    now = int(time.time() * 1000)
    witness, control = CARDS[660], CARDS[661]
    # Before: the witness card pays three times, and one payment is a dead letter.
    payments, prefix, poison, before = _before(pipeline, witness, tag, now, N, 61)
    letters_before = _deadletters(pipeline)
    ids_before = _schema_ids(pipeline)
    # What days of `make up` leave in a memory broker: records every reader is done
    # with (here 40 MiB in a topic no one declares, which a rollover does not keep).
    _fill(pipeline, unique("rollover.scratch."), 40_000, 1024)
    broker_pid = part_pid(pipeline, "broker")
    rss_before = rss_of(broker_pid)

    # During: 2,000 payments at 100/s, the rollover a third of the way in.
    sent: list[int] = []

    def stream() -> None:
        with Publisher(pipeline.gateway_url) as pub:
            sent.append(pub.send_many((event_for(p) for p in paced(payments, RATE)),
                                      batch_size=20))

    publisher = threading.Thread(target=stream)
    publisher.start()
    wait_until(lambda: len(lake_ids(lake_con, prefix)) >= N // 3 or None, 90,
               "a third of the payments in the lake")
    rolled = sluice("retention", "--rollover-now", state_dir=pipeline.state_dir,
                    offset=_offset(pipeline), timeout=240)
    outcome = json.loads(rolled.stdout.strip().splitlines()[-1])
    new_pid = part_pid(pipeline, "broker")
    rss_after = rss_of(new_pid)
    publisher.join(240)
    assert sent == [N], "the publisher gave up during the pause"
    assert outcome["rolled"], outcome["reason"]
    assert new_pid != broker_pid and outcome["offsets_moved"] == 0

    # After: every payment once in both tables.
    ids = {p["payment_id"] for p in payments}
    lake = wait_lake(lake_con, prefix, N, timeout=150)
    assert lake == Counter(dict.fromkeys(ids, 1)), (
        f"lake: {len(ids - set(lake))} missing, "
        f"{sum(1 for v in lake.values() if v > 1)} duplicated")
    wait_until(lambda: _rt_count(pipeline, prefix) >= N or None, 60,
               "every payment in the real-time table")
    time.sleep(1.0)
    assert _rt_count(pipeline, prefix) == N

    # Score's state continued: the witness's 4th payment counts the three from before,
    # as the same four payments of a card that saw no rollover do.
    after = _witness(witness, tag, now, 3)
    assert publish(pipeline, [after]) == 1
    [w] = read_scored(pipeline, {after["payment_id"]})[after["payment_id"]]
    same = [_witness(control, tag, now, i) for i in range(4)]
    assert publish(pipeline, same) == 4
    [c] = read_scored(pipeline, {same[-1]["payment_id"]})[same[-1]["payment_id"]]
    assert (w["count_10m"], w["count_1m"]) == (c["count_10m"], c["count_1m"])
    assert w["count_10m"] == len(before) + 1

    # The dead letters and schema ids from before are still there, unchanged.
    letters_after = _deadletters(pipeline)
    assert {k: letters_after.get(k) for k in letters_before} == letters_before
    assert _schema_ids(pipeline) == ids_before

    # The new broker is smaller; the rollover was counted and shown.
    assert rss_before is not None and rss_after is not None and rss_after < rss_before
    assert outcome["rss_after"] < outcome["rss_before"]
    assert load_outcomes(pipeline.state_dir)["rolled"] >= 1
    metrics = httpx.get(f"http://{pipeline.host}:{pipeline.ports.supervisor}/metrics",
                        timeout=10).text
    assert 'sluice_broker_rollovers_total{outcome="rolled"}' in metrics
    print(f"\nrollover: intake paused {outcome['pause_s']:.1f}s (total "
          f"{outcome['total_s']:.1f}s), kept {outcome['saved']}; broker RSS "
          f"{rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB; {N} payments once in "
          f"both tables; witness count_10m {w['count_10m']} = control {c['count_10m']}")


def _cli(pipeline, *args: str) -> list[str]:
    return [sys.executable, "-m", "eventing.cli", "--state-dir", str(pipeline.state_dir),
            "--port-offset", str(_offset(pipeline)), *args]


def _kept_counts(pipeline) -> Counter:
    """Records in the registry log and the dead-letter topic (copied whole by a rollover)."""
    topics = [pipeline.schemas_topic, DEFAULT_DEAD_LETTER_TOPIC]
    return Counter(m.topic() for m in scan.read(pipeline.bootstrap, topics, raw=True,
                                                 idle_s=1.0, timeout_s=60.0))


def _tails(pipeline, *parts: str) -> str:
    """The last lines of some parts' logs (what a failure here needs to be understood)."""
    from eventing.stack.process import tail

    procs = ProcessDir(pipeline.state_dir)
    return "\n".join(f"--- {p} ---\n{tail(procs.log_path(p), 15)}" for p in parts)


HOLD_AT = ["recreate topics", "check registry"]


# Killed right after the broker restart (nothing copied back yet), and after the copy-back
# (everything back: finishing it must produce nothing twice). 600 s: ~3.5 min each on a
# quiet machine, over 5 at load average 23.
@pytest.mark.timeout(600)
@pytest.mark.parametrize("hold_at", HOLD_AT)
def test_a_rollover_killed_after_the_broker_restart_is_finished_by_the_retention_part(
        pipeline, lake_con, tmp_path, hold_at) -> None:  # noqa: F811
    """kill -9 of `sluice retention --rollover-now` held after it restarted the broker
    (env SLUICE_ROLLOVER_HOLD_AT: a real SIGKILL at a known step, no test flag on the
    CLI), with payments streaming: the stack's retention part finds the saved records in
    the state folder and finishes the rollover; the supervisor never starts score on the
    broker without its changelog. Afterwards schema ids resolve, the dead letter is listed
    at the same reference, the registry log and dead letters hold each record once, score's
    state is kept and every payment (before, during, after) is once in both tables."""
    tag = str(int(time.time())) + "k"
    now = int(time.time() * 1000)
    # Cards of their own per case: a card's window still counts the other case's payments.
    i = HOLD_AT.index(hold_at)
    witness, control = CARDS[670 + 2 * i], CARDS[671 + 2 * i]
    payments, prefix, poison, before = _before(pipeline, witness, tag, now, 300, 67)
    letters_before = _deadletters(pipeline)
    ids_before = _schema_ids(pipeline)
    kept_before = _kept_counts(pipeline)
    broker_pid = part_pid(pipeline, "broker")
    unfinished = unfinished_path(pipeline.state_dir)
    procs = ProcessDir(pipeline.state_dir)

    # 200 payments at 20/s while the rollover runs, is killed and is finished.
    sent: list[int] = []

    def stream() -> None:
        with Publisher(pipeline.gateway_url) as pub:
            sent.append(pub.send_many((event_for(p) for p in paced(payments[:200], 20.0)),
                                      batch_size=10))

    publisher = threading.Thread(target=stream)
    publisher.start()
    log_path = tmp_path / "rollover.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env[ENV_HOLD_AT] = hold_at
    with open(log_path, "wb") as log_file:
        rolling = subprocess.Popen(_cli(pipeline, "retention", "--rollover-now"), cwd=ROOT,
                                   env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        try:
            wait_until(lambda: f"holding before step '{hold_at}'" in log_path.read_text()
                       or None, 120, f"the rollover to hold before {hold_at!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text()[-3000:]}\n"
                                 f"{_tails(pipeline, 'lakesink', 'realtime')}") from None
        assert part_pid(pipeline, "broker") != broker_pid  # the old broker is gone
        assert unfinished.exists()  # the saved records are on disk
        assert procs.record("fn-score") is None and procs.held("fn-score") is not None
        wait_until(lambda: load_states(pipeline.state_dir).get("fn-score", {}).get("state")
                   == "Held" or None, 30, "the supervisor to show score held")
    finally:
        rolling.kill()  # SIGKILL: no finally, no resume, the lock dies with it
        rolling.wait(10)
    killed_at = time.monotonic()

    # Score stays held (its changelog is not back) while the file is there; the retention
    # part's next look (every 2 s) finishes the rollover: the file goes, score runs.
    deadline = time.monotonic() + 90
    while True:
        running = procs.record("fn-score")
        left = unfinished.exists()  # read after: score must not have run while it was
        assert not (left and running), "score started before its changelog was back"
        if not left:
            break
        assert time.monotonic() < deadline, "the retention part did not finish it in 90 s"
        time.sleep(0.2)
    finished_s = time.monotonic() - killed_at
    # The file goes at step 8; the outcome is written after steps 9 and 10.
    last = wait_until(lambda: (o := load_outcomes(pipeline.state_dir).get("last", {})).get(
        "finished") and o, 60, "the finished rollover's outcome")
    print("\n" + "\n".join(ln for ln in procs.log_path("retention").read_text().splitlines()
                           if "rollover" in ln or "restore" in ln or "saved" in ln)[-3000:])
    assert last["rolled"] and last["finished"], last
    assert last["offsets_moved"] == 0
    wait_until(lambda: _part_status(pipeline, "fn-score")["healthy"] or None, 90,
               "score running again")
    assert procs.held("fn-score") is None

    # Schema ids resolve as before; the dead letter is listed at the same reference.
    assert _schema_ids(pipeline) == ids_before
    letters_after = _deadletters(pipeline)
    assert {k: letters_after.get(k) for k in letters_before} == letters_before
    assert _kept_counts(pipeline) == kept_before  # nothing lost, nothing produced twice

    # Score's state was kept: the witness's 4th payment counts the three from before.
    after = _witness(witness, tag, now, 3)
    assert publish(pipeline, [after]) == 1
    [w] = read_scored(pipeline, {after["payment_id"]})[after["payment_id"]]
    same = [_witness(control, tag, now, i) for i in range(4)]
    assert publish(pipeline, same) == 4
    [c] = read_scored(pipeline, {same[-1]["payment_id"]})[same[-1]["payment_id"]]
    assert (w["count_10m"], w["count_1m"]) == (c["count_10m"], c["count_1m"])
    assert w["count_10m"] == len(before) + 1

    # Every payment, during and after, once in both tables.
    publisher.join(240)
    assert sent == [200], "the publisher gave up during the pause"
    assert publish(pipeline, payments[200:]) == 100
    ids = {p["payment_id"] for p in payments}
    lake = wait_lake(lake_con, prefix, len(ids), timeout=150)
    assert lake == Counter(dict.fromkeys(ids, 1)), (
        f"lake: {len(ids - set(lake))} missing, "
        f"{sum(1 for v in lake.values() if v > 1)} duplicated\n"
        f"{_tails(pipeline, 'lakesink', 'fn-score', 'retention')}")
    wait_until(lambda: _rt_count(pipeline, prefix) >= len(ids) or None, 60,
               "every payment in the real-time table")
    time.sleep(1.0)
    assert _rt_count(pipeline, prefix) == len(ids)
    print(f"\nkilled before {hold_at!r}; finished by the retention part "
          f"{finished_s:.1f}s later (kept {last['saved']}); {len(ids)} payments once in "
          f"both tables; witness count_10m {w['count_10m']} = control {c['count_10m']}")
