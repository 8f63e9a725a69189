"""`Checkpoint.commit`'s order with fake clients: flush, check, rewind on failure, commit.

What is pinned down: nothing is committed unless the flush left nothing unacknowledged
and no delivery error was reported; a failed flush seeks every partition back to its
last commit and drops the fetched records; a record waiting for a retry holds back the
commit of every record after it. Then the same through a `Dispatcher` whose Kafka
clients are fakes, so its wiring (delivery reports, dropped lanes, the stats counter) is
covered without a broker.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from eventing.delivery import dispatcher as dispatch
from eventing.delivery.checkpoint import Checkpoint, DeliveryFailed
from eventing.delivery.invoke import Failure, InProcessInvoker
from eventing.fn.runtime import FunctionHost
from eventing.fn.state import KeyedState
from eventing.topology import Delivery, Function
from tests.helpers import FakeMessage, FakeProducer


class FakeConsumer:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.commit_error: KafkaException | None = None

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> None:
        if self.commit_error is not None:
            raise self.commit_error
        self.calls.append(("commit", [(tp.topic, tp.partition, tp.offset) for tp in offsets],
                           asynchronous))

    def seek(self, partition: TopicPartition) -> None:
        self.calls.append(("seek", (partition.topic, partition.partition, partition.offset)))


class Clients:
    def __init__(self) -> None:
        self.producer = FakeProducer()
        self.consumer = FakeConsumer()
        self.rewinds = 0

        def dropped() -> None:
            self.rewinds += 1

        self.checkpoint = Checkpoint(self.producer, self.consumer, name="fn",
                                     on_rewind=dropped)

    def process(self, topic: str, partition: int, offsets: range, *, done=None) -> None:
        """Hand out `offsets`; finish those in `done` (default: all of them)."""
        progress = self.checkpoint.progress(topic, partition)
        for offset in offsets:
            progress.seen(offset)
        for offset in offsets if done is None else done:
            progress.done(offset)

    def commits(self) -> list[tuple]:
        return [c for c in self.consumer.calls if c[0] == "commit"]


def test_commits_after_a_clean_flush_async_unless_sync() -> None:
    c = Clients()
    c.process("t", 0, range(5))
    c.process("t", 1, range(10, 12))
    assert c.checkpoint.commit(sync=False) is True
    assert c.producer.flushes == 1
    assert c.consumer.calls == [("commit", [("t", 0, 5), ("t", 1, 12)], True)]
    # Nothing new: flushed again, nothing to commit.
    assert c.checkpoint.commit(sync=True) is False
    assert c.producer.flushes == 2 and len(c.commits()) == 1
    c.process("t", 0, range(5, 7))
    assert c.checkpoint.commit(sync=True) is True
    assert c.commits()[-1] == ("commit", [("t", 0, 7)], False)


def test_unacknowledged_outputs_commit_nothing_and_rewind_to_the_last_commit() -> None:
    c = Clients()
    c.process("t", 0, range(3))
    c.process("t", 1, range(100, 101))
    c.checkpoint.commit(sync=False)  # t/0 at 3, t/1 at 101
    c.process("t", 0, range(3, 8))
    c.process("t", 2, range(40, 45))  # never committed: replays from its first record
    c.producer.unacknowledged = 2
    with pytest.raises(DeliveryFailed, match="2 output"):
        c.checkpoint.commit(sync=False)
    assert len(c.commits()) == 1  # nothing more was committed
    seeks = sorted(call[1] for call in c.consumer.calls if call[0] == "seek")
    assert seeks == [("t", 0, 3), ("t", 1, 101), ("t", 2, 40)]
    assert c.rewinds == 1
    assert c.checkpoint.partitions == {}  # progress restarts with the replayed records


def test_a_delivery_error_fails_the_next_commit_once() -> None:
    c = Clients()
    c.process("t", 0, range(4))
    c.checkpoint.delivery_failed("out: _MSG_TIMED_OUT")
    with pytest.raises(DeliveryFailed, match="_MSG_TIMED_OUT"):
        c.checkpoint.commit(sync=True)
    assert c.commits() == [] and c.rewinds == 1
    assert ("seek", ("t", 0, 0)) in c.consumer.calls
    # The error was reported once; the replayed records commit normally.
    c.process("t", 0, range(4))
    assert c.checkpoint.commit(sync=True) is True
    assert c.commits() == [("commit", [("t", 0, 4)], False)]


def test_a_record_pending_retry_holds_back_the_commit() -> None:
    c = Clients()
    # Unordered: 0, 1, 3, 4 done, 2 waits for its retry.
    c.process("t", 0, range(5), done=[0, 1, 3, 4])
    assert c.checkpoint.commit(sync=False) is True
    assert c.commits() == [("commit", [("t", 0, 2)], True)]
    assert c.checkpoint.commit(sync=False) is False  # still held back at 2
    c.checkpoint.progress("t", 0).done(2)  # the retry succeeded
    assert c.checkpoint.commit(sync=False) is True
    assert c.commits()[-1] == ("commit", [("t", 0, 5)], True)


def test_no_offset_to_commit_is_not_an_error() -> None:
    c = Clients()
    c.process("t", 0, range(2))
    c.consumer.commit_error = KafkaException(KafkaError(KafkaError._NO_OFFSET))
    assert c.checkpoint.commit(sync=True) is True
    c.consumer.commit_error = KafkaException(KafkaError(KafkaError._TRANSPORT))
    c.process("t", 0, range(2, 3))
    with pytest.raises(KafkaException):
        c.checkpoint.commit(sync=True)


# --------------------------------------------------------------------------- dispatcher


class KafkaProducer(FakeProducer):
    """Stands in for `confluent_kafka.Producer` inside the dispatcher module."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.on_delivery = config["on_delivery"]
        self.failed_topic: str | None = None  # the next flush reports this record failed

    def flush(self, timeout: float) -> int:
        if self.failed_topic is not None:
            self.on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT),
                             FakeMessage(topic=self.failed_topic))
            self.failed_topic = None
        return super().flush(timeout)


class KafkaConsumer(FakeConsumer):
    """Stands in for `confluent_kafka.Consumer`: hands out `pending` once."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.pending: list[FakeMessage] = []

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        out, self.pending = self.pending[:num_messages], self.pending[num_messages:]
        return out

    def close(self) -> None:
        pass


class FailingOffsets:
    """An invoker whose delivery of the offsets in `failing` fails (retryable)."""

    destination = "http://fake"

    def __init__(self, failing: set[int]) -> None:
        self.failing = failing

    def invoke(self, lanes, ordered: bool):
        return [(m, Failure(500, "boom") if m.offset() in self.failing else None)
                for lane in lanes for m in lane]

    def close(self) -> None:
        pass


@pytest.fixture()
def fake_kafka(monkeypatch):
    monkeypatch.setattr(dispatch, "Producer", KafkaProducer)
    monkeypatch.setattr(dispatch, "Consumer", KafkaConsumer)
    monkeypatch.setattr(dispatch, "COMMIT_INTERVAL_S", 0.0)  # every step commits


def unordered_dispatcher(failing: set[int]) -> dispatch.Dispatcher:
    fn = Function(name="fn", source=Path("main.py"), target="fn", topics=("t",),
                  consumer_group="g", outputs={"out": ("*",)},
                  delivery=Delivery(ordering="unordered", retry=3, backoff_delay="PT60S"))
    return dispatch.Dispatcher(fn, "fake:9092", lambda producer: FailingOffsets(failing))


def records(offsets: range) -> list[FakeMessage]:
    return [FakeMessage(topic="t", partition=0, offset=o, value=b"{}") for o in offsets]


def test_dispatcher_holds_the_commit_at_a_record_waiting_for_its_retry(fake_kafka) -> None:
    d = unordered_dispatcher(failing={2})
    d.consumer.pending = records(range(5))
    d.step()
    assert d.consumer.calls == [("commit", [("t", 0, 2)], True)]
    assert d.stats.commits == 1 and d.stats.retries == 1
    assert [m.offset() for m in d.lanes[("t", 0)].queue] == [2]  # waits for its backoff


def test_dispatcher_commits_nothing_when_an_output_fails_and_replays(fake_kafka) -> None:
    d = unordered_dispatcher(failing=set())
    d.consumer.pending = records(range(3))
    d.step()  # committed at 3
    d.consumer.pending = records(range(3, 6))
    d.producer.failed_topic = "out"
    with pytest.raises(DeliveryFailed, match="_MSG_TIMED_OUT"):
        d.step()
    assert d.consumer.calls == [("commit", [("t", 0, 3)], True), ("seek", ("t", 0, 3))]
    assert d.lanes == {} and d.checkpoint.partitions == {} and d.stats.commits == 1
    d.close()  # the final sync commit finds nothing new: no error, no commit
    assert [c for c in d.consumer.calls if c[0] == "commit"] == [("commit", [("t", 0, 3)], True)]


def test_a_recreated_topic_resumes_on_the_new_log_instead_of_committing_old_offsets(
        fake_kafka) -> None:
    """A memory broker's restart recreates the topic: offsets start again from 0. Keeping
    the old progress would commit offset 1000 into the new log and skip its records."""
    d = unordered_dispatcher(failing=set())
    d.consumer.pending = records(range(995, 1000))
    d.step()
    assert d.consumer.calls[-1] == ("commit", [("t", 0, 1000)], True)
    d.consumer.pending = records(range(0, 3))  # the new log
    d.step()
    assert d.consumer.calls[-1] == ("commit", [("t", 0, 3)], True)
    assert d.stats.topic_resets == 1 and d.stats.succeeded == 8
    d.consumer.pending = records(range(3, 5))
    d.step()  # a normal step after it: no reset counted
    assert d.stats.topic_resets == 1
    assert d.consumer.calls[-1] == ("commit", [("t", 0, 5)], True)


# --------------------------------------------------------------------------- keyed state

# A stateful function for the dispatcher below (the host finds stores in its module).
COUNTS = KeyedState("checkpoint-counts", topic="counts.state")


def count(event) -> dict:
    """Counts events per record key: read-modify-write of keyed state, as `score` does."""
    key = event["key"] if "key" in event else "none"
    n = (COUNTS.get(key) or 0) + 1
    COUNTS.put(key, n)
    return {"key": key, "n": n}


class WatchedProducer(KafkaProducer):
    """Notes, for every changelog record produced, how many outputs were still in flight."""

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        self.outputs_in_flight_at_state: list[int] = []

    def produce(self, topic: str, value=None, key=None, headers=None, on_delivery=None) -> None:
        if topic == "counts.state":
            self.outputs_in_flight_at_state.append(sum(q[0] == "out" for q in self.queued))
        super().produce(topic, value, key, headers=headers, on_delivery=on_delivery)


def stateful_dispatcher(monkeypatch) -> dispatch.Dispatcher:
    monkeypatch.setattr(dispatch, "Producer", WatchedProducer)
    COUNTS._data.clear()
    COUNTS._dirty.clear()
    fn = Function(name="count", source=Path(__file__), target="count", topics=("t",),
                  consumer_group="g", outputs={"out": ("*",)},
                  delivery=Delivery(ordering="ordered"))
    host = FunctionHost(fn, None, user=count, defer_state=True)
    return dispatch.Dispatcher(fn, "fake:9092", lambda p: InProcessInvoker(host, p))


def keyed(offsets: range, keys: int = 2) -> list[FakeMessage]:
    return [FakeMessage(topic="t", partition=0, offset=o, value=b"{}",
                        key=f"k{o % keys}".encode()) for o in offsets]


def test_state_reaches_its_changelog_only_after_the_outputs_are_acknowledged(
        fake_kafka, monkeypatch) -> None:
    """A kill -9 between two produce requests must not leave a state change in the
    changelog whose event's output the broker never got: the next owner would replay the
    event against state that already holds it (checkpoint step 3)."""
    d = stateful_dispatcher(monkeypatch)
    d.consumer.pending = keyed(range(6))
    d.step()
    d.consumer.pending = keyed(range(6, 9))
    d.step()
    produced = [(topic, key, value) for topic, key, value, _ in d.producer.records]
    state = [(key, value) for topic, key, value in produced if topic == "counts.state"]
    assert len([p for p in produced if p[0] == "out"]) == 9
    # Latest value per key per commit: 2 keys after the first step, 2 after the second.
    assert state == [(b"k0", b"3"), (b"k1", b"3"), (b"k0", b"5"), (b"k1", b"4")]
    assert d.producer.outputs_in_flight_at_state == [0, 0, 0, 0]
    assert d.consumer.calls == [("commit", [("t", 0, 6)], True), ("commit", [("t", 0, 9)], True)]


def test_state_of_events_whose_outputs_failed_is_never_produced(fake_kafka, monkeypatch) -> None:
    d = stateful_dispatcher(monkeypatch)
    d.consumer.pending = keyed(range(2))
    d.step()
    d.consumer.pending = keyed(range(2, 4))
    d.producer.failed_topic = "out"
    with pytest.raises(DeliveryFailed):
        d.step()
    state = [value for topic, _, value, _ in d.producer.records if topic == "counts.state"]
    assert state == [b"1", b"1"]  # only the first step's; the replay recomputes the rest
    assert d.invoker.host.pending_state == {} and d.consumer.calls[-1] == ("seek", ("t", 0, 2))

# --------------------------------------------------------------------------- early subscription


class JoiningConsumer(KafkaConsumer):
    """A consumer whose group join completes on its `joins_after`-th consume call."""

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        self.log: list[str] = []
        self.joins_after = 3
        self._on_assign = None

    def subscribe(self, topics: list[str], **callbacks) -> None:
        self.log.append("subscribe")
        self._on_assign = callbacks["on_assign"]

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        self.log.append("consume")
        if self.log.count("consume") == self.joins_after and self._on_assign is not None:
            self._on_assign(self, [TopicPartition("t", 0)])
        return []

    def close(self) -> None:
        self.log.append("close")


def _function() -> Function:
    return Function(name="fn", source=Path("main.py"), target="fn", topics=("t",),
                    consumer_group="g", outputs={"out": ("*",)}, delivery=Delivery())


def test_a_dispatcher_that_subscribes_first_joins_before_its_invoker_is_built(
        monkeypatch) -> None:
    """Cold start: the group join (seconds on Tansu) overlaps building the function."""
    monkeypatch.setattr(dispatch, "Producer", KafkaProducer)
    monkeypatch.setattr(dispatch, "Consumer", JoiningConsumer)
    made: list[JoiningConsumer] = []

    def consumer(config: dict) -> JoiningConsumer:
        made.append(JoiningConsumer(config))
        return made[-1]

    monkeypatch.setattr(dispatch, "Consumer", consumer)
    seen: list[list[str]] = []

    def factory(producer):
        seen.append(list(made[0].log))
        return FailingOffsets(set())

    d = dispatch.Dispatcher(_function(), "fake:9092", factory, subscribe_first=True)
    assert seen == [["subscribe"]]  # subscribed when the factory ran
    d.run(threading.Event(), max_seconds=0.0)
    assert d.consumer.log.count("subscribe") == 1  # run() does not subscribe again


def test_a_dispatcher_subscribes_in_run_by_default(monkeypatch) -> None:
    monkeypatch.setattr(dispatch, "Producer", KafkaProducer)
    monkeypatch.setattr(dispatch, "Consumer", JoiningConsumer)
    d = dispatch.Dispatcher(_function(), "fake:9092", lambda p: FailingOffsets(set()))
    assert "subscribe" not in d.consumer.log
    d.run(threading.Event(), max_seconds=0.0)
    assert d.consumer.log[0] == "subscribe"


def test_a_failed_invoker_closes_the_consumer_only_after_its_join(monkeypatch) -> None:
    """On Tansu a member leaving before its first join completes can stick the group."""
    monkeypatch.setattr(dispatch, "Producer", KafkaProducer)
    made: list[JoiningConsumer] = []

    def consumer(config: dict) -> JoiningConsumer:
        made.append(JoiningConsumer(config))
        return made[-1]

    monkeypatch.setattr(dispatch, "Consumer", consumer)

    def broken(producer):
        raise ImportError("the user's code does not import")

    with pytest.raises(ImportError):
        dispatch.Dispatcher(_function(), "fake:9092", broken, subscribe_first=True)
    log = made[0].log
    assert log[0] == "subscribe" and log[-1] == "close"
    assert log.count("consume") == 3  # polled until the assignment, then closed
