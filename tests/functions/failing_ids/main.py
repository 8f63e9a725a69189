"""Fails on purpose by payment id: ids ending in 7 raise (retried, then dead-lettered
with 500), ids ending in 13 are rejected (dead-lettered at once with 422)."""

import functions_framework
from cloudevents.http import CloudEvent

from eventing.fn.api import Reject


@functions_framework.cloud_event
def failing_ids(event: CloudEvent) -> dict:
    p = event.data
    if p["payment_id"].endswith("-13") or p["payment_id"].endswith("13"):
        raise Reject(f"payment {p['payment_id']} is unprocessable")
    if p["payment_id"].endswith("7"):
        raise RuntimeError(f"downstream unavailable for {p['payment_id']}")
    return p
