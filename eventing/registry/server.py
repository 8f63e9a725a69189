"""Run the registry: replay the `_schemas` topic, then serve the HTTP API with uvicorn.

The process supervisor calls `run` from `sluice registry --host --port --bootstrap`; it
blocks until uvicorn stops (SIGINT/SIGTERM). Startup replays the whole log before the
socket opens, so a client never sees a half-loaded registry.
"""

from __future__ import annotations

import logging

from .app import create_app
from .store import KafkaLog, SchemaStore

log = logging.getLogger(__name__)


def open_store(bootstrap: str, topic: str = "_schemas", timeout: float = 30.0) -> SchemaStore:
    """A `SchemaStore` backed by `topic` on `bootstrap`, fully replayed."""
    return SchemaStore(KafkaLog(bootstrap, topic, timeout=timeout))


def run(host: str, port: int, bootstrap: str, topic: str = "_schemas") -> None:
    """Serve the registry on host:port (blocking) with its log in `topic` on `bootstrap`."""
    from eventing import serving

    store = open_store(bootstrap, topic)
    log.info("schema registry replayed %s; serving on %s:%d", topic, host, port)
    try:
        serving.serve(create_app(store), host=host, port=port, log_level="warning",
                      lifespan="auto")
    finally:
        store.close()
