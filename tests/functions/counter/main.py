"""A test function with keyed state: counts events per partition key."""

import functions_framework
from cloudevents.http import CloudEvent

from eventing.fn.api import store

COUNTS = store("test-counts", topic="test.counter.state")


@functions_framework.cloud_event
def counter(event: CloudEvent) -> dict:
    key = event["partitionkey"]
    n = COUNTS.get(key, 0) + 1
    COUNTS.put(key, n)
    return {"key": key, "count": n}
