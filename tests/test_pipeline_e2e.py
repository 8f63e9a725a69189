"""The example pipeline as `sluice up` runs it: gateway → validate → enrich → score."""

from __future__ import annotations

import base64
import uuid
from collections import defaultdict

import pytest

from eventing.ingest.publish import Publisher
from eventing.serde import AvroSerde
from functions.generate import EVENT_TYPE, reference
from tests.pipeline import consume_all, headers_of

pytestmark = pytest.mark.stack


def _payments(prefix: str, n: int, cards: list[str]) -> list[dict]:
    return [{"payment_id": f"{prefix}-{i}", "card_id": cards[i % len(cards)],
             "merchant_id": f"m-{i % 600:04d}", "amount": 5.0 + i % 50, "currency": "EUR",
             "country": "DE", "event_time": 1_764_000_000_000 + i * 1000} for i in range(n)]


def _event(p: dict) -> dict:
    return {"specversion": "1.0", "id": p["payment_id"], "source": "/tests/e2e",
            "type": EVENT_TYPE, "partitionkey": p["card_id"],
            "datacontenttype": "application/json", "data": p}


def test_10k_published_events_pass_the_chain_once_or_more_in_key_order(pipeline) -> None:
    prefix = f"e2e{uuid.uuid4().hex[:6]}"
    cards = sorted(reference().cards)[:200]
    n = 10_000
    with Publisher(pipeline.gateway_url) as pub:
        assert pub.send_many((_event(p) for p in _payments(prefix, n, cards)),
                             batch_size=500) == n

    serde = AvroSerde(pipeline.registry_url)
    order = defaultdict(list)
    msgs = consume_all(pipeline.bootstrap, "payments.scored", n, timeout=120,
                       match=lambda m: headers_of(m).get("ce_id", "").startswith(prefix))
    for msg in msgs:
        record = serde.decode(msg.value())
        assert msg.key() == record["card_id"].encode()
        order[record["card_id"]].append(int(record["payment_id"].rsplit("-", 1)[1]))
    arrived = {i for seq in order.values() for i in seq}
    assert arrived == set(range(n)), f"{n - len(arrived)} events missing"
    for card, seq in order.items():
        firsts = list(dict.fromkeys(seq))
        assert firsts == sorted(firsts), f"{card}: out of order"


def test_impossible_payment_is_dead_lettered_with_the_reason(pipeline) -> None:
    pid = f"bad{uuid.uuid4().hex[:6]}"
    bad = {"payment_id": pid, "card_id": "card-00001", "merchant_id": "m-0001",
           "amount": -5.0, "currency": "EUR", "country": "DE",
           "event_time": 1_764_000_000_000}
    with Publisher(pipeline.gateway_url) as pub:
        pub.send(_event(bad))
    dead = consume_all(pipeline.bootstrap, "sluice.deadletter", 1, timeout=60, settle=2.0,
                       match=lambda m: headers_of(m).get("ce_id") == pid)
    assert len(dead) == 1
    h = headers_of(dead[0])
    assert h["ce_knativeerrorcode"] == "422"
    assert h["ce_knativeerrordest"] == "inprocess://validate"
    assert "amount -5.0 outside" in base64.b64decode(h["ce_knativeerrordata"]).decode()
