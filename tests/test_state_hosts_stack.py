"""Keyed state behind several HTTP hosts: one card's events alternately to two `score` pods.

A Knative Service spreads a partition's events over its pods; each host therefore reads
the card's changelog partition to its end before scoring (`eventing.fn.state`, following
mode). The oracle is one host given the same sequence (same payments, another card id):
every scored output (features, score, decision, reasons, lateness) and the card's final
window in the changelog must be equal. The sequence makes state matter: bursts for the
velocity rules, tiny payments at several merchants, a country hop, a late payment and a
replayed one. Then a third, freshly started host (restore at start) continues the card.

Real processes throughout: functions-framework hosts, the session's Tansu broker and
schema registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from eventing import topology as topo
from eventing.fn.state import partition_for
from eventing.kafka import consumer_config, ensure_topics
from eventing.serde import AVRO_CONTENT_TYPE, AvroSerde
from tests.helpers import ROOT, unique
from tests.test_invoke_http import FunctionServer, read

pytestmark = pytest.mark.stack

SCORED = "payments.scored"
CHANGELOG = "score.state"  # functions/score/main.py's store
BASE = 1_764_000_000_000
SECOND = 1000


def sequence() -> list[dict]:
    """One card's payments, by index (ids and card filled in per run)."""
    rows: list[dict] = []
    t = BASE
    for i in range(30):
        t += 4 * SECOND if 8 <= i < 16 else 25 * SECOND  # a burst: velocity_1m
        row = {"n": i, "merchant_id": f"m-{i % 6}", "amount": 40.0 + (i * 53) % 900,
               "country": "DE", "event_time": t}
        if i % 5 == 3:
            row["amount"] = 1.5 + i % 3  # tiny, at changing merchants: card testing
        if i == 12:
            row["country"] = "US"  # abroad right after European payments: travel rule
        if i == 21:
            row["amount"] = 2500.0
        if i == 24:
            row["event_time"] = BASE  # far behind the newest: too late
        rows.append(row)
    rows.append({**rows[26]})  # the same payment again (a redelivery): recognised replay
    return rows


def payment(row: dict, prefix: str, card: str) -> dict:
    return {"payment_id": f"{prefix}-{row['n']}", "card_id": card,
            "merchant_id": row["merchant_id"], "amount": row["amount"], "currency": "EUR",
            "country": row["country"], "event_time": row["event_time"],
            "amount_eur": row["amount"], "merchant_category": "retail",
            "card_home_country": "DE"}


def post(server: FunctionServer, serde: AvroSerde, p: dict) -> None:
    headers = {"ce-specversion": "1.0", "ce-id": p["payment_id"], "ce-source": "/tests",
               "ce-type": "com.sluice.payment.enriched", "ce-partitionkey": p["card_id"],
               "content-type": AVRO_CONTENT_TYPE}
    resp = httpx.post(server.url, headers=headers, content=serde.encode("payments.enriched", p),
                      timeout=30)
    assert resp.status_code == 204, resp.text


def scored(bootstrap: str, serde: AvroSerde, card: str, expected: int) -> list[dict]:
    """The card's scored outputs in the order written (one card: one partition), ids
    and card stripped so two cards' outputs compare."""
    msgs = read(bootstrap, SCORED, lambda m: m.key() == card.encode(), expected)
    msgs.sort(key=lambda m: m.offset())
    out = []
    for m in msgs:
        v = serde.decode(m.value())
        v["payment_id"] = v["payment_id"].rsplit("-", 1)[1]
        v.pop("card_id")
        out.append(v)
    return out


def window(bootstrap: str, card: str) -> list:
    """The card's last window in the changelog, payment ids reduced to their index."""
    consumer = Consumer(consumer_config(bootstrap, unique("window-")))
    parts = consumer.list_topics(CHANGELOG, timeout=10).topics[CHANGELOG].partitions
    p = partition_for(card.encode(), len(parts))
    consumer.assign([TopicPartition(CHANGELOG, p, OFFSET_BEGINNING)])
    last, idle = None, 0
    while idle < 5:
        batch = consumer.consume(1000, 0.2)
        idle = 0 if batch else idle + 1
        for m in batch:
            if not m.error() and m.key() == card.encode():
                last = orjson.loads(m.value())
    consumer.close()
    assert last is not None, f"no state for {card} in {CHANGELOG}[{p}]"
    return [[*e[:4], e[4].rsplit("-", 1)[1]] for e in last]


@pytest.fixture(scope="module")
def serde(stack) -> AvroSerde:
    ensure_topics(stack.bootstrap, {SCORED: 4, "alerts.fraud": 1})
    return AvroSerde(stack.registry_url)


@pytest.fixture(scope="module")
def score() -> topo.Function:
    return topo.load(ROOT / "functions" / "topology.yaml").function("score")


@pytest.fixture(scope="module")
def hosts(stack, serde, score, tmp_path_factory) -> Iterator[list[FunctionServer]]:
    started: list[FunctionServer] = []
    try:
        for name in ("a", "b"):
            fn = dataclasses.replace(score, name=f"score-{name}")
            started.append(FunctionServer(fn, stack.bootstrap, stack.registry_url,
                                          Path(tmp_path_factory.mktemp(f"score-{name}"))))
        yield started
    finally:
        for server in started:
            server.stop()


def test_two_hosts_alternating_score_like_one_host(stack, serde, score, hosts,
                                                    tmp_path) -> None:
    a, b = hosts
    run = unique("st")
    two, one = f"{run}-two", f"{run}-one"  # cards: alternating hosts / host A alone
    rows = sequence()
    for i, row in enumerate(rows):
        post((a, b)[i % 2], serde, payment(row, f"{two}-p", two))
    for row in rows:
        post(a, serde, payment(row, f"{one}-p", one))

    got, want = (scored(stack.bootstrap, serde, c, len(rows)) for c in (two, one))
    assert len(want) == len(rows)
    assert got == want
    # The sequence exercises state: these decisions need the earlier payments.
    reasons = ",".join(v["reasons"] for v in want)
    for rule in ("velocity_1m", "velocity_10m", "card_testing", "impossible_travel",
                 "too_late"):
        assert rule in reasons, f"{rule} never fired: the sequence does not test state"
    assert max(v["count_10m"] for v in want) >= 10
    assert window(stack.bootstrap, two) == window(stack.bootstrap, one)

    # Restore: a host started now, after all of it, continues the card where A and B left it.
    fresh = FunctionServer(dataclasses.replace(score, name="score-c"), stack.bootstrap,
                           stack.registry_url, tmp_path)
    try:
        nxt = {**rows[-2], "n": len(rows), "event_time": rows[-2]["event_time"] + SECOND,
               "amount": 1.0, "merchant_id": "m-new"}
        post(fresh, serde, payment(nxt, f"{two}-p", two))
        post(a, serde, payment(nxt, f"{one}-p", one))
    finally:
        fresh.stop()
    got, want = (scored(stack.bootstrap, serde, c, len(rows) + 1) for c in (two, one))
    assert got == want
    assert got[-1]["count_10m"] == want[-1]["count_10m"] >= 10
    assert window(stack.bootstrap, two) == window(stack.bootstrap, one)
