"""Reject payments that cannot be real before anything downstream trusts them."""

import time

import functions_framework
from cloudevents.http import CloudEvent

from eventing.fn.api import Reject

KNOWN_CURRENCIES = {"EUR", "USD", "GBP", "CHF", "JPY", "SEK", "PLN"}
MAX_AMOUNT = 1_000_000.0
# A payment cannot predate the epoch, nor come from more than a day ahead of our clock
# (clock skew); 1e16 or year 10000 would also break every table downstream.
MAX_CLOCK_SKEW_MS = 86_400_000


@functions_framework.cloud_event
def validate(event: CloudEvent) -> dict:
    p = event.data
    if not p["payment_id"] or not p["card_id"]:
        raise Reject("payment_id and card_id must be non-empty")
    if not 0 < p["amount"] <= MAX_AMOUNT:
        raise Reject(f"amount {p['amount']} outside (0, {MAX_AMOUNT}]")
    if p["currency"] not in KNOWN_CURRENCIES:
        raise Reject(f"unknown currency {p['currency']!r}")
    if len(p["country"]) != 2:
        raise Reject(f"country {p['country']!r} is not an ISO 3166 alpha-2 code")
    latest = int(time.time() * 1000) + MAX_CLOCK_SKEW_MS
    if not 0 <= p["event_time"] <= latest:
        raise Reject(f"event_time {p['event_time']} (epoch ms) outside [0, now + 1 day]")
    return p
