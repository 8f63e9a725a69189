"""A test function that fails on purpose, to exercise retries and dead letters.

Payments whose merchant_id is "fail" raise (a transient-looking error: retried, then
dead-lettered with 500); "reject" raises `Reject` (dead-lettered at once with 422).
Every other payment is converted like benchmarks/convert does.
"""

import functions_framework
from cloudevents.http import CloudEvent

from eventing.fn.api import Reject


@functions_framework.cloud_event
def flaky(event: CloudEvent) -> dict:
    p = event.data
    if p["merchant_id"] == "fail":
        raise RuntimeError(f"flaky failure for {p['payment_id']}")
    if p["merchant_id"] == "reject":
        raise Reject(f"rejected {p['payment_id']}")
    p["amount_eur"] = round(p["amount"] * 0.92, 2)
    return p
