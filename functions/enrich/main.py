"""Add merchant category, card home country and the EUR amount from reference data.

Reference data is loaded once at import (files shipped beside this module, written from
the same seed as the traffic generator): no per-event I/O.
"""

import csv
from pathlib import Path

import functions_framework
from cloudevents.http import CloudEvent

REFERENCE = Path(__file__).parent / "reference"
EUR_PER_UNIT = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17, "CHF": 1.05, "JPY": 0.0061,
                "SEK": 0.088, "PLN": 0.23}


def _load(name: str) -> list[dict]:
    with open(REFERENCE / name, newline="") as fh:
        return list(csv.DictReader(fh))


CARD_HOME = {r["card_id"]: r["home_country"] for r in _load("cards.csv")}
MERCHANT_CATEGORY = {r["merchant_id"]: r["category"] for r in _load("merchants.csv")}


@functions_framework.cloud_event
def enrich(event: CloudEvent) -> dict:
    p = event.data
    p["amount_eur"] = round(p["amount"] * EUR_PER_UNIT.get(p["currency"], 1.0), 2)
    p["merchant_category"] = MERCHANT_CATEGORY.get(p["merchant_id"], "unknown")
    p["card_home_country"] = CARD_HOME.get(p["card_id"], "ZZ")
    return p
