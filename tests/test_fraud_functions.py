"""The fraud pipeline's functions, called as plain functions with plain CloudEvents."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from cloudevents.http import CloudEvent

from eventing.fn.api import Reject
from functions.generate import Generator, reference

FUNCTIONS = Path(__file__).resolve().parent.parent / "functions"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"fraud_{name}", FUNCTIONS / name / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _event(data: dict) -> CloudEvent:
    return CloudEvent({"type": "com.sluice.payment.created", "source": "/t"}, dict(data))


@pytest.fixture()
def score():
    module = _load("score")
    module.WINDOWS._data.clear()  # the store is process-wide; start each test empty
    return module


def _pipeline(payment: dict, enrich, score) -> dict:
    enriched = enrich.enrich(_event(payment))
    [scored, *alerts] = score.score(_event(enriched))
    return scored.data | {"alerted": bool(alerts)}


def test_validate_rejects_impossible_values() -> None:
    validate = _load("validate")
    good = {"payment_id": "p1", "card_id": "c1", "merchant_id": "m", "amount": 10.0,
            "currency": "EUR", "country": "DE", "event_time": 0}
    assert validate.validate(_event(good)) == good
    for bad, reason in [({"amount": -1.0}, "amount"), ({"currency": "XXX"}, "currency"),
                        ({"country": "DEU"}, "country"), ({"card_id": ""}, "card_id"),
                        ({"event_time": 10**16}, "event_time"),
                        ({"event_time": 253_402_300_800_000}, "event_time"),  # year 10000
                        ({"event_time": -1}, "event_time")]:
        with pytest.raises(Reject, match=reason):
            validate.validate(_event(good | bad))


def test_card_testing_burst_is_declined_and_normal_use_approved(score) -> None:
    enrich = _load("enrich")
    base = {"card_id": "card-00001", "currency": "EUR", "country": "DE",
            "event_time": 1_000_000}
    # A normal day: a few payments far apart.
    normal = [_pipeline(base | {"payment_id": f"n{i}", "merchant_id": "m-0001", "amount": 40.0,
                                "event_time": 1_000_000 + i * 900_000}, enrich, score)
              for i in range(3)]
    assert all(s["decision"] == "approve" for s in normal)
    t0 = 1_000_000 + 3 * 900_000
    burst = [_pipeline(base | {"payment_id": f"b{i}", "merchant_id": f"m-{i:04d}",
                               "amount": 1.5, "event_time": t0 + i * 3000}, enrich, score)
             for i in range(8)]
    assert burst[-1]["decision"] == "decline" and burst[-1]["alerted"]
    assert "card_testing" in burst[-1]["reasons"]
    assert burst[-1]["count_1m"] == 8 and burst[-1]["distinct_merchants_10m"] == 8


def test_impossible_travel_is_flagged(score) -> None:
    enrich = _load("enrich")
    card = next(c for c, home in reference().cards.items() if home == "DE")
    home = _pipeline({"payment_id": "h", "card_id": card, "merchant_id": "m-0001",
                      "amount": 30.0, "currency": "EUR", "country": "DE",
                      "event_time": 5_000_000}, enrich, score)
    away = _pipeline({"payment_id": "a", "card_id": card, "merchant_id": "m-0002",
                      "amount": 800.0, "currency": "USD", "country": "BR",
                      "event_time": 5_000_000 + 120_000}, enrich, score)
    assert home["decision"] == "approve"
    assert "impossible_travel" in away["reasons"] and away["decision"] == "decline"


def test_replayed_event_is_not_counted_twice_and_too_late_is_reported(score) -> None:
    enrich = _load("enrich")
    p = {"payment_id": "x1", "card_id": "card-00002", "merchant_id": "m-0001", "amount": 10.0,
         "currency": "EUR", "country": "DE", "event_time": 10_000_000}
    first = _pipeline(p, enrich, score)
    again = _pipeline(p, enrich, score)
    assert first["count_10m"] == again["count_10m"] == 1
    late = _pipeline(p | {"payment_id": "old", "event_time": 10_000_000 - 3_600_000},
                     enrich, score)
    assert late["late"] and "too_late" in late["reasons"]
    assert len(score.WINDOWS.get("card-00002")) == 1  # the late one is not in the window


def test_generator_injects_labelled_fraud_at_the_configured_share() -> None:
    gen = Generator(reference(), seed=3, fraud_share=0.02)
    now = 1_764_000_000_000
    out = [gen.next(now + i * 10) for i in range(20_000)]
    fraud = [p for p, is_fraud in out if is_fraud]
    assert 0.005 < len(fraud) / len(out) < 0.1
    assert len({p["payment_id"] for p, _ in out}) == len(out)
    cards = {p["card_id"] for p in fraud}
    assert cards <= set(reference().cards)
