"""A test function with keyed state: counts events per partition key, each id once.

The state value keeps the last ids it counted, so a replayed event (at-least-once) is
recognised and not counted twice, the way the fraud scorer keeps recent payment ids.
"""

import os

import functions_framework
from cloudevents.http import CloudEvent

from eventing.fn.api import store

COUNTS = store("test-counts", topic="test.counter.state")
KEEP_IDS = 200


@functions_framework.cloud_event
def counter(event: CloudEvent) -> dict | None:
    key = event["partitionkey"]
    state = COUNTS.get(key) or {"n": 0, "ids": []}
    if event["id"] in state["ids"]:
        return None  # a replay: already counted
    state = {"n": state["n"] + 1, "ids": [*state["ids"], event["id"]][-KEEP_IDS:]}
    COUNTS.put(key, state)
    return {"key": key, "n": state["n"], "id": event["id"], "pid": os.getpid()}
