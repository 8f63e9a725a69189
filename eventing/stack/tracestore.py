"""The trace store part: consumes the collector's `sluice.traces` topic into SQLite.

Started after the collector (which writes that topic) so `sluice trace` can find any
event's spans by CloudEvent id, trace id or a business id the topology declares
(`traceIds`). The index file lives in the state folder
(`eventing.telemetry.traces.db_path`); the part has no port, so its health check is "the
store has assigned the topic's partitions" (a row the process writes when ready).
"""

from __future__ import annotations

import sqlite3

from eventing.stack.pipeline import _python_part
from eventing.stack.process import PartSpec
from eventing.stack.settings import StackSettings
from eventing.telemetry.traces import TraceStore, db_path

NAME = "tracestore"


def _ready(settings: StackSettings) -> bool:
    path = db_path(settings.state_dir)
    if not path.exists():
        return False
    try:
        store = TraceStore(path, readonly=True)
    except sqlite3.Error:
        return False
    try:
        return store.meta("ready") is not None
    except sqlite3.Error:
        return False
    finally:
        store.close()


def spec(settings: StackSettings) -> PartSpec:
    path = db_path(settings.state_dir)
    args = ["tracestore", "--bootstrap", settings.bootstrap, "--topic", settings.traces_topic,
            "--db", str(path), "--topology", str(settings.topology_path)]
    return _python_part(settings, NAME, args,
                        f"trace store {settings.traces_topic} -> {path.name} (sluice trace)",
                        lambda: _ready(settings), [])
