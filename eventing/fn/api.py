"""The whole of Sluice a function's code imports: `Reject` and keyed state.

Everything else a function needs is the CloudEvents SDK and `functions-framework`, so a
function stays a plain CloudEvent target that runs and tests without Sluice around it:

    from eventing.fn.api import Reject, store

    WINDOWS = store("card-windows", topic="score.state")   # a `KeyedState`

    @functions_framework.cloud_event
    def score(event: CloudEvent) -> dict:
        if event.data["amount"] <= 0:
            raise Reject("amount must be positive")        # dead letter now, code 422
        ...

The host finds a module's `KeyedState`s by looking at its globals, restores them before
the first event and produces their changes with the event's outputs
(`eventing.fn.state` has the design).
"""

from __future__ import annotations

from eventing.fn.state import KeyedState, store

__all__ = ["KeyedState", "Reject", "store"]


class Reject(Exception):
    """Raised by a function for an event that no retry can fix: dead-letter it now.

    Dead-lettered with code 422 and the message, without the retries and backoff that
    a transient failure gets (`eventing.fn.output.failure` maps it, in both invocation
    modes).
    """
