"""When may an offset be committed? The one place that decides.

The order, for every consumed record, is:

1. the function has run on it (or it has been dead-lettered after its last retry);
2. every record it produced (its outputs, or the dead-letter copy) has been
   acknowledged by the broker with acks=all (`Producer.flush` returned with no errors);
3. then the keyed-state changes the function made while handling it are produced to
   their changelog and acknowledged in turn (`after_outputs`): a function's state never
   reaches the changelog ahead of the outputs computed from it;
4. only then is the partition's offset committed, and only up to the first record
   that is not done: a record still waiting for a retry holds back the commit of every
   record after it, even those already processed (unordered mode).

Why step 3 comes after step 2 and not with it. A crash (kill -9) between two produce
requests could otherwise leave an event's state change in the changelog without its
output: the next owner of the partition (a restart, or another replica after a
rebalance) restores that state, replays the event, and the function sees its own event
already applied, so it can only answer from a window that may also hold later events
(the fraud scorer then reports an earlier payment as too late, or impossible travel
with a country paid in afterwards). With state behind outputs, a replayed event finds
either its output already written (the table keeps the first copy) or the state as it
was before the event, and computes the same output again.

So a crash at any point replays from the last commit: nothing acknowledged is lost, and
the records processed after that commit are processed again. Those replays are the only
source of duplicates in output topics (at-least-once). `Checkpoint.commit` is the one
method that carries this order out; the dispatcher only decides how often to call it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from confluent_kafka import KafkaError, KafkaException, TopicPartition

FLUSH_TIMEOUT_S = 30.0  # longest a commit waits for the broker to acknowledge outputs


class DeliveryFailed(RuntimeError):
    """The broker did not acknowledge outputs: nothing was committed; records replay."""


class Flushes(Protocol):
    """The producer side a checkpoint needs (a `confluent_kafka.Producer`)."""

    def flush(self, timeout: float) -> int: ...


class Commits(Protocol):
    """The consumer side a checkpoint needs (a `confluent_kafka.Consumer`)."""

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> object: ...

    def seek(self, partition: TopicPartition) -> None: ...


class PartitionProgress:
    """Offsets of one partition that were handed out but are not yet done."""

    __slots__ = ("topic", "partition", "_open", "_done", "_next", "_committed", "_first")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self._open: deque[int] = deque()
        self._done: set[int] = set()
        self._next: int | None = None  # offset after the highest seen
        self._committed: int | None = None
        self._first: int | None = None  # first offset seen since assignment

    def seen(self, offset: int) -> None:
        if self._first is None:
            self._first = offset
        self._open.append(offset)
        self._next = offset + 1

    def replay_from(self) -> int | None:
        """Where to resume so nothing after the last commit is skipped."""
        return self._committed if self._committed is not None else self._first

    def done(self, offset: int) -> None:
        if self._open and self._open[0] == offset:
            self._open.popleft()
            while self._open and self._open[0] in self._done:
                self._done.discard(self._open.popleft())
        else:
            self._done.add(offset)

    def commit_point(self) -> int | None:
        """The offset to commit (next to read), or None if nothing new is safe."""
        point = self._open[0] if self._open else self._next
        if point is None or point == self._committed:
            return None
        return point

    def committed(self, offset: int) -> None:
        self._committed = offset

    def log_was_reset(self, offset: int) -> bool:
        """Whether a record at `offset` means the topic's log was recreated under us.

        A rewind replays from the last commit, never before it; a record below the
        committed offset can only come from a new log (a memory broker's restart), whose
        offsets start again from 0.
        """
        return self._committed is not None and offset < self._committed

    @property
    def next_offset(self) -> int | None:
        return self._next

    @property
    def outstanding(self) -> int:
        return len(self._open)


class Checkpoint:
    """Progress of every partition this consumer owns, and the order that commits it.

    `producer` is the one that wrote every output and dead-letter copy of the records
    tracked here; `consumer` owns their partitions. `on_rewind` drops whatever the
    caller fetched but has not finished, since a rewind fetches it again.
    """

    def __init__(self, producer: Flushes, consumer: Commits, *, name: str = "",
                 on_rewind: Callable[[], None] | None = None,
                 after_outputs: Callable[[], int] | None = None,
                 flush_timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        self.partitions: dict[tuple[str, int], PartitionProgress] = {}
        self._producer = producer
        self._consumer = consumer
        self._name = name
        self._on_rewind = on_rewind
        # Produces records that may only follow durable outputs (keyed-state changes);
        # returns how many it queued (step 3 of `commit`).
        self._after_outputs = after_outputs
        self._flush_timeout_s = flush_timeout_s
        self._delivery_errors: list[str] = []

    def progress(self, topic: str, partition: int) -> PartitionProgress:
        key = (topic, partition)
        p = self.partitions.get(key)
        if p is None:
            p = self.partitions[key] = PartitionProgress(topic, partition)
        return p

    def delivery_failed(self, error: str) -> None:
        """The producer reported an output it could not deliver: the next commit fails."""
        self._delivery_errors.append(error)

    def commit(self, *, sync: bool) -> bool:
        """Commit every offset whose records are done and whose outputs are durable.

        This method will:
         1. Flush the producer: wait (up to `flush_timeout_s`) until the broker has
            acknowledged, with acks=all, every output and dead-letter copy produced so far.
         2. Check delivery: an output still unacknowledged after the flush, or a delivery
            error reported since the last commit, fails the checkpoint.
         3. Produce what must follow durable outputs (`after_outputs`: keyed-state
            changes), then flush and check again as in 1 and 2.
         4. On a failure in 1-3, rewind and stop: seek every partition back to its last
            commit (or its first record, if never committed), forget its progress, drop
            what was fetched and held (`on_rewind`) and raise `DeliveryFailed`. Nothing
            is committed; the records replay (at-least-once).
         5. Commit each partition up to its first record not done: a record waiting for
            a retry holds back every record after it. Asynchronous unless `sync` (on
            revoke and close); the broker's "no offset to commit" is not an error.
         6. Remember those offsets as committed, the point a later rewind returns to.

        Returns True when offsets were committed (False: nothing new was safe).
        """
        # Steps 1 and 2: flush, then check what the broker acknowledged.
        self._flushed()
        # Step 3: state after the outputs it was computed with.
        if self._after_outputs is not None and self._after_outputs():
            self._flushed()
        # Step 5: commit what is done, up to each partition's first open record.
        offsets = self._to_commit()
        if not offsets:
            return False
        try:
            self._consumer.commit(offsets=offsets, asynchronous=not sync)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                raise
        # Step 6: the new replay point.
        self._mark_committed(offsets)
        return True

    def _flushed(self) -> None:
        """Steps 1-2 (and 4 on failure): everything produced so far is acknowledged."""
        remaining = self._producer.flush(self._flush_timeout_s)
        if remaining or self._delivery_errors:
            errors, self._delivery_errors = self._delivery_errors, []
            # Step 4: rewind; nothing after the last commit is known durable.
            self._rewind()
            raise DeliveryFailed(
                f"{self._name}: {remaining} output(s) unacknowledged, "
                f"errors: {errors[:3]}; nothing committed, records will be replayed"
            )

    def _rewind(self) -> None:
        """Replay every partition from its last commit (at-least-once after a failure):
        records done since then may have outputs the broker never acknowledged."""
        for (topic, partition), progress in list(self.partitions.items()):
            offset = progress.replay_from()
            if offset is not None:
                self._consumer.seek(TopicPartition(topic, partition, offset))
            self.forget(topic, partition)
        if self._on_rewind is not None:
            self._on_rewind()

    def _to_commit(self) -> list[TopicPartition]:
        """Offsets safe to commit once the producer flushed without errors (step 4)."""
        out = []
        for p in self.partitions.values():
            point = p.commit_point()
            if point is not None:
                out.append(TopicPartition(p.topic, p.partition, point))
        return out

    def _mark_committed(self, offsets: list[TopicPartition]) -> None:
        for tp in offsets:
            self.progress(tp.topic, tp.partition).committed(tp.offset)

    def forget(self, topic: str, partition: int) -> None:
        """A partition was revoked: its open records belong to the next owner now."""
        self.partitions.pop((topic, partition), None)
