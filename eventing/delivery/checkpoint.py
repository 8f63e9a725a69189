"""When may an offset be committed? The one place that decides.

The order, for every consumed record, is:

1. the function has run on it (or it has been dead-lettered after its last retry);
2. every record it produced (its outputs, or the dead-letter copy) has been
   acknowledged by the broker with acks=all (`Producer.flush` returned with no errors);
3. only then is the partition's offset committed, and only up to the first record
   that is not done: a record still waiting for a retry holds back the commit of every
   record after it, even those already processed (unordered mode).

So a crash at any point replays from the last commit: nothing acknowledged is lost, and
the records processed after that commit are processed again. Those replays are the only
source of duplicates in output topics (at-least-once).
"""

from __future__ import annotations

from collections import deque

from confluent_kafka import TopicPartition


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

    @property
    def next_offset(self) -> int | None:
        return self._next

    @property
    def outstanding(self) -> int:
        return len(self._open)


class Checkpoint:
    """Progress of every partition this consumer owns."""

    def __init__(self) -> None:
        self.partitions: dict[tuple[str, int], PartitionProgress] = {}

    def progress(self, topic: str, partition: int) -> PartitionProgress:
        key = (topic, partition)
        p = self.partitions.get(key)
        if p is None:
            p = self.partitions[key] = PartitionProgress(topic, partition)
        return p

    def to_commit(self) -> list[TopicPartition]:
        """Offsets safe to commit. Call only after the producer flushed without errors."""
        out = []
        for p in self.partitions.values():
            point = p.commit_point()
            if point is not None:
                out.append(TopicPartition(p.topic, p.partition, point))
        return out

    def mark_committed(self, offsets: list[TopicPartition]) -> None:
        for tp in offsets:
            self.progress(tp.topic, tp.partition).committed(tp.offset)

    def forget(self, topic: str, partition: int) -> None:
        """A partition was revoked: its open records belong to the next owner now."""
        self.partitions.pop((topic, partition), None)
