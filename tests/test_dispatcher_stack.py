"""The dispatcher on the real broker and registry: chains, retries, dead letters, crashes."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from eventing import topology as topo
from eventing.cloudevent import event as ce_event
from eventing.cloudevent import kafka as ce_kafka
from eventing.delivery.runner import RunSettings, build
from eventing.serde import AvroSerde
from tests.helpers import ROOT, stop_process, unique
from tests.pipeline import (
    CONVERT,
    CONVERTED_SCHEMA,
    consume_all,
    headers_of,
    payment,
    produce_payments,
    register,
    setup_topics,
)

pytestmark = pytest.mark.stack


def _topology(tmp_path: Path, raw: str, mid: str, out: str, dlq: str, *,
              first: str = "validate", first_source: str | None = None,
              delivery: str = "") -> topo.Topology:
    src = first_source or str(ROOT / "functions" / first)
    text = f"""
functions:
  first:
    source: {src}
    target: {first}
    topics: [{raw}]
    consumerGroup: {unique('g-first-')}
    outputs: [{mid}]
    delivery:
      deadLetterSink: {dlq}
      {delivery}
  second:
    source: {CONVERT}
    target: convert
    topics: [{mid}]
    consumerGroup: {unique('g-second-')}
    outputs: [{out}]
    delivery:
      deadLetterSink: {dlq}
"""
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    return topo.load(path)


@pytest.fixture()
def topics(stack):
    raw, mid, out, dlq = (unique(p) for p in ("raw.", "mid.", "out.", "dlq."))
    setup_topics(stack.bootstrap, {raw: 4, mid: 4, out: 4, dlq: 1})
    register(stack.registry_url, raw, "payments.raw.avsc")
    register(stack.registry_url, mid, "payments.valid.avsc")
    register(stack.registry_url, out, CONVERTED_SCHEMA)
    return raw, mid, out, dlq


def _run_until(dispatchers, done, timeout=120):
    stop = threading.Event()
    threads = [threading.Thread(target=d.run, args=(stop,), daemon=True) for d in dispatchers]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(30)


def test_10k_events_through_two_functions_arrive_in_key_order(stack, topics, tmp_path):
    raw, mid, out, dlq = topics
    serde = AvroSerde(stack.registry_url)
    n = 10_000
    payments = [payment(i, card=i % 97) for i in range(n)]
    produce_payments(stack.bootstrap, serde, raw, payments)

    topology = _topology(tmp_path, raw, mid, out, dlq)
    settings = RunSettings(stack.bootstrap, stack.registry_url)
    dispatchers = [build(topology.function("first"), settings),
                   build(topology.function("second"), settings)]
    _run_until(dispatchers, lambda: dispatchers[1].stats.succeeded >= n)

    msgs = consume_all(stack.bootstrap, out, n)
    seen = defaultdict(list)
    for msg in msgs:
        record = serde.decode(msg.value())
        assert record["amount_eur"] == pytest.approx(record["amount"])
        assert msg.key() == record["card_id"].encode()
        seen[record["card_id"]].append(int(record["payment_id"].split("-")[1]))
    ids = {i for seq in seen.values() for i in seq}
    assert ids == set(range(n)), f"missing {len(set(range(n)) - ids)} events"
    for card, seq in seen.items():
        firsts = list(dict.fromkeys(seq))  # duplicates (replays) allowed; order is not
        assert firsts == sorted(firsts), f"{card} out of order"
    assert dispatchers[0].stats.dead_lettered == 0


def test_failing_events_are_retried_then_dead_lettered(stack, topics, tmp_path):
    raw, mid, out, dlq = topics
    serde = AvroSerde(stack.registry_url)
    n = 200
    produce_payments(stack.bootstrap, serde, raw, [payment(i, card=i % 7) for i in range(n)])
    topology = _topology(
        tmp_path, raw, mid, out, dlq, first="failing_ids",
        first_source=str(ROOT / "tests" / "functions" / "failing_ids"),
        delivery="retry: 2\n      backoffPolicy: linear\n      backoffDelay: PT0.05S",
    )
    failing = {i for i in range(n) if str(i).endswith("7")}
    rejected = {i for i in range(n) if str(i).endswith("13")} - failing
    settings = RunSettings(stack.bootstrap, stack.registry_url)
    first = build(topology.function("first"), settings)
    second = build(topology.function("second"), settings)
    expected_ok = n - len(failing) - len(rejected)
    _run_until([first, second], lambda: second.stats.succeeded >= expected_ok
               and first.stats.dead_lettered >= len(failing) + len(rejected))

    assert first.stats.retries == 2 * len(failing)  # rejected events are never retried
    dead = consume_all(stack.bootstrap, dlq, len(failing) + len(rejected))
    by_id = {}
    for msg in dead:
        h = headers_of(msg)
        by_id[int(h["ce_id"].split("-")[1])] = h
        assert serde.decode(msg.value())["payment_id"] == h["ce_id"]  # original data
    assert set(by_id) == failing | rejected
    for i, h in by_id.items():
        assert h["ce_knativeerrordest"] == "inprocess://first"
        data = base64.b64decode(h["ce_knativeerrordata"]).decode()
        if i in rejected:
            assert h["ce_knativeerrorcode"] == "422" and "unprocessable" in data
        else:
            assert h["ce_knativeerrorcode"] == "500"
            assert data == f"RuntimeError: downstream unavailable for p-{i}"
    arrived = {serde.decode(m.value())["payment_id"]
               for m in consume_all(stack.bootstrap, out, expected_ok)}
    assert arrived == {f"p-{i}" for i in range(n)} - {f"p-{i}" for i in failing | rejected}


def test_sigkill_mid_stream_loses_nothing(stack, topics, tmp_path):
    raw, mid, out, dlq = topics
    serde = AvroSerde(stack.registry_url)
    n = 30_000
    produce_payments(stack.bootstrap, serde, raw, [payment(i, card=i % 31) for i in range(n)])
    topology = _topology(tmp_path, raw, mid, out, dlq)
    cmd = [sys.executable, "-m", "eventing.cli", "run", "--topology", str(topology.path),
           "--bootstrap", stack.bootstrap, "--registry", stack.registry_url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Kill once some, but not all, outputs exist.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            partial = consume_all(stack.bootstrap, out, 1000, timeout=2, settle=0)
            if len(partial) >= 1000:
                break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        before = len(consume_all(stack.bootstrap, out, n, timeout=3, settle=0))
        assert 0 < before < n, "kill landed before or after the stream: nothing proven"
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        msgs = consume_all(stack.bootstrap, out, n, timeout=120)
    finally:
        stop_process(proc, 30, group=True)
    ids = {serde.decode(m.value())["payment_id"] for m in msgs}
    assert ids == {f"p-{i}" for i in range(n)}


def test_records_that_are_not_cloudevents_reach_functions_as_knative_does(stack, tmp_path):
    """A plain JSON record becomes dev.knative.kafka.event, as a KafkaSource delivers it."""
    src, out, dlq = unique("plain."), unique("plainout."), unique("dlq.")
    setup_topics(stack.bootstrap, {src: 1, out: 1, dlq: 1})
    fn_dir = tmp_path / "echo"
    fn_dir.mkdir()
    (fn_dir / "main.py").write_text(
        "def echo(event):\n"
        "    a = event._get_attributes()\n"
        "    return {'type': a['type'], 'id': a['id'], 'key': a.get('key'),\n"
        "            'subject': a['subject'], 'hdr': a.get('kafkaheaderorigin'),\n"
        "            'data': event.data}\n"
    )
    (tmp_path / "t.yaml").write_text(f"""
functions:
  echo:
    source: {fn_dir}
    topics: [{src}]
    consumerGroup: {unique('g-echo-')}
    outputs: [{out}]
    delivery: {{deadLetterSink: {dlq}}}
""")
    from confluent_kafka import Producer

    from eventing.kafka import producer_config

    p = Producer(producer_config(stack.bootstrap))
    p.produce(src, b'{"x": 1}', b"k1", headers=[("origin", b"legacy")])
    assert p.flush(10) == 0
    d = build(topo.load(tmp_path / "t.yaml").function("echo"),
              RunSettings(stack.bootstrap, None))
    _run_until([d], lambda: d.stats.succeeded >= 1, timeout=60)
    [msg] = consume_all(stack.bootstrap, out, 1)
    event = ce_kafka.from_record(msg.key(), msg.value(), msg.headers(), topic=out,
                                 partition=0, offset=0, timestamp_ms=None)
    body = ce_event.json_data(event)
    assert body["type"] == "dev.knative.kafka.event"
    assert body["id"] == "partition:0/offset:0"
    assert body["subject"] == "partition:0#0"
    assert body["key"] == "k1" and body["hdr"] == "legacy"
