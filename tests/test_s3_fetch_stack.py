"""Consumers on an s3 broker read through a long partition (issue 12's stalled group).

Tansu on s3 storage spends a fetch's `max_wait` as its budget: it LISTs the partition's
batch objects from the oldest and, when the wait is spent before the listing reaches the
fetch offset, answers error NONE with no records, and the consumer asks again for ever
(`eventing.kafka`, README "Broker storage"). The example's `validate` group stalled so
because its part ran with memory's 10 ms wait. These tests build the long partition
for real (one object per record, as the gateway writes at 20 events/s) on a real Tansu
over a real SeaweedFS: the quirk itself, the s3 tuning reading through it, and the
function group `sluice up --storage s3` starts reading past where it used to stall.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from eventing import topology as topo
from eventing.fn.state import KeyedState
from eventing.kafka import client_tuning, consumer_config, ensure_topics, producer_config
from eventing.serde import AvroSerde
from eventing.stack import retention as ret
from eventing.stack.settings import StackSettings, load_settings
from tests.helpers import ROOT, free_port_offset, sluice
from tests.pipeline import payment, payment_record

pytestmark = pytest.mark.stack

# Objects in the partition: its LIST took 20-162 ms here (load average ~20), so longer
# than a 10 ms wait on any machine and shorter than the s3 tuning's wait (`eventing.kafka`).
OBJECTS = 600


@pytest.fixture(scope="module")
def s3_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackSettings]:
    """Object store + Tansu on s3 storage (+ registry ...), its pipeline added by a test."""
    state = tmp_path_factory.mktemp("s3fetch") / "state"
    offset = free_port_offset(start=23000, step=100)
    try:
        sluice("up", "--storage", "s3", "--no-pipeline", state_dir=state, offset=offset,
               timeout=300)
        yield load_settings(state_dir=state, port_offset=offset).with_saved()
    finally:
        sluice("down", "--purge", state_dir=state, offset=offset, check=False)


def _one_object_each(bootstrap: str, topic: str,
                     records: list[tuple[bytes, bytes, list[tuple[str, bytes]] | None]]) -> None:
    """Produce to partition 0 with one flush per record: Tansu writes a batch object per
    produce request, so each record becomes one S3 object."""
    producer = Producer(producer_config(bootstrap))
    for key, value, headers in records:
        producer.produce(topic, value, key, partition=0, headers=headers)
        assert producer.flush(30) == 0


def _read(bootstrap: str, topic: str, start: int, overrides: dict, *, until: int,
          timeout_s: float) -> list[int]:
    """Offsets an `assign()` consumer with `overrides` reads from `start`, until offset
    `until` arrived or `timeout_s` passed."""
    consumer = Consumer(consumer_config(bootstrap, f"probe-{uuid.uuid4().hex[:8]}", **overrides))
    got: list[int] = []
    try:
        consumer.assign([TopicPartition(topic, 0, start)])
        deadline = time.monotonic() + timeout_s
        while (not got or got[-1] < until) and time.monotonic() < deadline:
            got += [m.offset() for m in consumer.consume(500, 0.1) if not m.error()]
    finally:
        consumer.close()
    return got


def test_a_fetch_wait_shorter_than_the_listing_reads_nothing_and_the_s3_tuning_all(
        s3_stack: StackSettings) -> None:
    bootstrap = s3_stack.bootstrap
    topic = f"long-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, {topic: 1})
    _one_object_each(bootstrap, topic, [(b"k", b"v%d" % i, None) for i in range(OBJECTS)])
    last = OBJECTS - 1

    # The quirk, pinned with a 1 ms wait (no LIST of 600 objects fits in it on any
    # machine): records below the high watermark, and nothing comes, fetch after fetch.
    assert _read(bootstrap, topic, 0, {"fetch.wait.max.ms": 1}, until=last, timeout_s=8) == []

    tuned = client_tuning("s3").consumer
    # Through the whole partition in order, none missing, and from near its end (where a
    # caught-up consumer fetches: the listing must cover every object before it).
    assert _read(bootstrap, topic, 0, tuned, until=last, timeout_s=60) == list(range(OBJECTS))
    assert _read(bootstrap, topic, last - 20, tuned, until=last, timeout_s=30) == \
        list(range(last - 20, OBJECTS))


def test_the_s3_stacks_first_function_reads_past_where_it_stalled(
        s3_stack: StackSettings) -> None:
    """`validate` (group sluice-validate) stopped after ~180 records per partition in the
    soak; here it must commit past a partition of 600 single-record objects."""
    bootstrap = s3_stack.bootstrap
    ensure_topics(bootstrap, topo.load(ROOT / "functions" / "topology.yaml").all_topics())
    serde = AvroSerde(s3_stack.registry_url)
    _one_object_each(bootstrap, "payments.raw", [
        payment_record(serde, "payments.raw", payment(i, card=1)) for i in range(OBJECTS)])
    offset = s3_stack.ports.broker - load_settings().ports.broker
    sluice("up", "--no-generator", state_dir=s3_stack.state_dir, offset=offset, timeout=300)

    positions = ret.Positions(bootstrap)
    committed = -1  # none yet
    deadline = time.monotonic() + 180
    while committed < OBJECTS and time.monotonic() < deadline:
        time.sleep(2)
        committed = positions.committed("sluice-validate").get(("payments.raw", 0), -1)
    assert committed == OBJECTS, f"sluice-validate committed payments.raw[0] up to {committed}"


def test_keyed_state_restores_a_long_changelog_with_the_storage_tuning(
        s3_stack: StackSettings) -> None:
    """A function's state restore reads its changelog from the start: with the general
    10 ms wait it timed out on s3 (same quirk); the dispatcher now hands it the tuning."""
    bootstrap = s3_stack.bootstrap
    topic = f"state-{uuid.uuid4().hex[:8]}"
    ensure_topics(bootstrap, {topic: 1}, config={topic: {"cleanup.policy": "compact"}})
    _one_object_each(bootstrap, topic, [(b"k%d" % (i % 50), orjson.dumps(i), None)
                                        for i in range(OBJECTS)])
    latest = {f"k{i % 50}": i for i in range(OBJECTS)}

    with pytest.raises(TimeoutError):
        KeyedState("untuned", topic, partitions=1).restore(
            bootstrap, timeout=8, consumer_overrides={"fetch.wait.max.ms": 1})
    store = KeyedState("tuned", topic, partitions=1)
    assert store.restore(bootstrap, timeout=60,
                         consumer_overrides=client_tuning("s3").consumer) == len(latest)
    assert {k: store.get(k) for k in latest} == latest
