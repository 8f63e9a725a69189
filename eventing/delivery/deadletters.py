"""Dead letters: read them back, and redrive each to the topic it came from at most once.

A dead letter is the original record plus Knative's `knativeerror*` extensions and
Sluice's `sluiceerror*` ones (source topic, partition, offset, attempts, function:
`eventing.cloudevent.kafka.to_dead_letter`). Its reference is where it sits in the
dead-letter topic, `<topic>/<partition>/<offset>`, which never changes.

Redrive writes the original event (the same bytes of data, the dead-letter extensions
removed) back to its source topic, so the function's dispatcher delivers it again under
the normal rules. "At most once" is kept by a ledger: the compacted topic
`<dead-letter topic>.redriven`, keyed by reference. A redrive first writes its ledger
record and waits for the broker's ack, then produces the event; a reference already in
the ledger is skipped. If producing fails after the ledger write, that dead letter is
reported as failed and will not be redriven again by Sluice (at most once, not at least
once). Two redrives running at the same moment are not serialised against each other.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka import Producer

from eventing.cloudevent import kafka as ce_kafka
from eventing.kafka import Acks, ensure_topics, produce, producer_config
from eventing.scan import Seen, read

LEDGER_SUFFIX = ".redriven"


@dataclass
class DeadLetter:
    """One dead letter, decoded: why it failed and the event as it was first delivered."""

    ref: str
    event_id: str
    event_type: str
    function: str
    code: str
    error: str
    attempts: str
    source_topic: str
    source_ref: str
    time_ms: int | None
    event: Any          # the original CloudEvent (data as the bytes that were written)
    data: Any           # its data decoded
    key: bytes | None
    redriven: bool = False
    extensions: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The row `sluice deadletters list` prints."""
        return {"ref": self.ref, "time": _iso(self.time_ms), "function": self.function,
                "code": self.code, "attempts": self.attempts, "source": self.source_ref,
                "id": self.event_id, "type": self.event_type, "error": self.error,
                "redriven": self.redriven}

    def detail(self) -> dict[str, Any]:
        """Everything `sluice deadletters show` prints: the summary and the event."""
        attrs = {k: v for k, v in self.event._get_attributes().items()}
        return {**self.summary(), "attributes": attrs, "data": _plain(self.data)}


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return value


def ledger_topic(dead_letter_topic: str) -> str:
    return dead_letter_topic + LEDGER_SUFFIX


def from_seen(seen: Seen, serde: Any) -> DeadLetter:
    """A dead letter from a record read off a dead-letter topic."""
    from eventing.serde import SerdeError, decode_data

    original, info = ce_kafka.from_dead_letter(seen.event)
    attrs = original._get_attributes()
    topic = info.get("sluiceerrortopic", "")
    data: Any = original.data
    try:
        data = decode_data(attrs.get("datacontenttype"), original.data, serde)
    except (SerdeError, LookupError):
        pass
    return DeadLetter(
        ref=f"{seen.topic}/{seen.partition}/{seen.offset}",
        event_id=str(attrs.get("id", "")), event_type=str(attrs.get("type", "")),
        function=info.get("sluiceerrorfunction") or info.get("knativeerrordest", ""),
        code=info.get("knativeerrorcode", ""), error=info.get("knativeerrordata", ""),
        attempts=info.get("sluiceerrorattempts", ""), source_topic=topic,
        source_ref=(f"{topic}/{info.get('sluiceerrorpartition', '?')}/"
                    f"{info.get('sluiceerroroffset', '?')}" if topic else ""),
        time_ms=seen.timestamp_ms, event=original, data=data, key=seen.key,
        extensions=info)


def redriven_refs(bootstrap: str, dead_letter_topic: str) -> set[str]:
    """References already redriven (the ledger's keys); empty if there is no ledger yet."""
    try:
        return {s.key.decode() for s in read(bootstrap, [ledger_topic(dead_letter_topic)],
                                             idle_s=0.5) if s.key}
    except LookupError:
        return set()


def list_dead_letters(bootstrap: str, topics: Sequence[str], serde: Any, *,
                      function: str | None = None, since_ms: int | None = None,
                      refs: Iterable[str] = ()) -> list[DeadLetter]:
    """The dead letters of `topics`, oldest first, filtered by function, time and
    reference or event id (`refs`)."""
    wanted = set(refs)
    out: list[DeadLetter] = []
    for topic in topics:
        done = redriven_refs(bootstrap, topic)
        for seen in read(bootstrap, [topic], since_ms=since_ms, serde=None, idle_s=0.5):
            letter = from_seen(seen, serde)
            if function and letter.function != function:
                continue
            if wanted and letter.ref not in wanted and letter.event_id not in wanted:
                continue
            letter.redriven = letter.ref in done
            out.append(letter)
    return out


@dataclass
class Redriven:
    ref: str
    outcome: str  # "redriven", "skipped", "failed"
    detail: str


def redrive(bootstrap: str, letters: Sequence[DeadLetter], *, timeout_s: float = 30.0
            ) -> list[Redriven]:
    """Put each dead letter back on its source topic, at most once (module docstring)."""
    results: list[Redriven] = []
    producer = Producer(producer_config(bootstrap))
    ledgers: dict[str, set[str]] = {}
    for letter in letters:
        dlq = letter.ref.rsplit("/", 2)[0]
        if dlq not in ledgers:
            ensure_topics(bootstrap, {ledger_topic(dlq): 1},
                          config={ledger_topic(dlq): {"cleanup.policy": "compact"}})
            ledgers[dlq] = redriven_refs(bootstrap, dlq)
        if letter.ref in ledgers[dlq]:
            results.append(Redriven(letter.ref, "skipped", "already redriven"))
            continue
        if not letter.source_topic:
            results.append(Redriven(letter.ref, "failed", "the dead letter does not say "
                                    "which topic it came from (written before Sluice "
                                    "recorded it, or by another tool)"))
            continue
        claim = orjson.dumps({"to": letter.source_topic, "at_ms": int(time.time() * 1000),
                              "id": letter.event_id})
        problem = _produce_acked(producer, ledger_topic(dlq), claim,
                                 letter.ref.encode(), [], timeout_s)
        if problem:
            results.append(Redriven(letter.ref, "failed", f"ledger not written: {problem}"))
            continue
        ledgers[dlq].add(letter.ref)
        key, value, headers = ce_kafka.to_binary(letter.event, validate=False)
        problem = _produce_acked(producer, letter.source_topic, value, letter.key or key,
                                 headers, timeout_s)
        if problem:
            results.append(Redriven(letter.ref, "failed", f"{problem} (recorded as redriven: "
                                    "it will not be retried)"))
        else:
            results.append(Redriven(letter.ref, "redriven", f"to {letter.source_topic}"))
    return results


def _produce_acked(producer: Producer, topic: str, value: bytes | None, key: bytes | None,
                   headers: list, timeout_s: float) -> str | None:
    """Produce one record and wait for the broker's answer: None, or the error."""
    acks = Acks()
    produce(producer, topic, value, key, headers=headers, on_delivery=acks)
    acks.sent()
    acks.seal()
    producer.flush(timeout_s)
    return acks.wait(time.monotonic() + timeout_s)
