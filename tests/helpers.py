"""Helpers every test module may use: free ports, names, waits, process stop, fake clients.

One home, so a fix (a port race, a process that outlives its test) lands everywhere at
once. Fixtures stay in `conftest.py`; helpers that drive real records through real
topics (produce, consume, register) in `pipeline.py`. Importing this module starts and
connects nothing: unit tests import it freely.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from eventing.stack.process import port_open
from eventing.stack.settings import Ports
from eventing.stack.supervisor import can_bind

ROOT = Path(__file__).resolve().parent.parent


def sluice(*args: str, state_dir: Path, offset: int, timeout: float = 120,
           check: bool = True, env_extra: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess[str]:
    """Run the `sluice` CLI exactly as a user would, against one state folder."""
    cmd = [sys.executable, "-m", "eventing.cli", "--state-dir", str(state_dir),
           "--port-offset", str(offset), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env |= env_extra or {}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def free_port_offset(start: int = 20000, step: int = 700, exclude: set[int] = frozenset()) -> int:
    """First offset whose whole port layout is free on loopback (for a test stack)."""
    for offset in range(start, 31000, step):
        if offset in exclude:
            continue
        # Bind, not connect: a stack that is starting has its ports bound before it listens.
        if all(can_bind("127.0.0.1", p) for p in Ports().shifted(offset).all().values()):
            return offset
    raise RuntimeError("no free port layout found for a test stack")


def free_port() -> int:
    """A port nothing listens on now (the OS's pick), for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(prefix: str) -> str:
    """`prefix` plus 8 random hex digits: topics, tables and groups no other test uses."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.2) -> Any:
    """Poll `predicate` until it returns something truthy (returned); fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def wait_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    """Wait until something accepts connections on `host:port`."""
    wait_until(lambda: port_open(host, port, 0.2), timeout, f"a listener on {host}:{port}",
               interval=0.05)


def stop_process(proc: subprocess.Popen, timeout: float = 10, *, group: bool = False) -> None:
    """SIGTERM, then SIGKILL after `timeout`: a test's own server never outlives it.

    `group=True` signals the process group (the process was started with
    `start_new_session=True`), so a shell's or gunicorn's children stop with it.
    """
    if proc.poll() is not None:
        return

    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass  # exited meanwhile

    send(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(5)


@contextmanager
def http_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve `handler` on a free loopback port from a thread; yield its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- fake Kafka


class FakeMessage:
    """The read side of `confluent_kafka.Message`, with values a test chooses."""

    def __init__(self, *, topic: str = "t", partition: int = 0, offset: int = 0,
                 key: bytes | None = None, value: bytes | None = None,
                 headers: list[tuple[str, bytes]] | None = None,
                 timestamp_ms: int | None = None, error: Any = None) -> None:
        self._topic, self._partition, self._offset = topic, partition, offset
        self._key, self._value, self._headers = key, value, headers
        self._timestamp_ms, self._error = timestamp_ms, error

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        """(TIMESTAMP_CREATE_TIME, ms), or (TIMESTAMP_NOT_AVAILABLE, -1) without one."""
        return (0, -1) if self._timestamp_ms is None else (1, self._timestamp_ms)

    def error(self) -> Any:
        return self._error


class FakeProducer:
    """`confluent_kafka.Producer`'s surface: records every produce, reports delivery later.

    As with librdkafka, `produce` only queues; each record's `on_delivery(err, msg)` runs
    from a later `poll`/`flush`, with `error` (None: acknowledged). `release.clear()`
    holds the reports back (records stay in flight); `raise_on_produce` makes `produce`
    raise (a full queue is `BufferError()`); `unacknowledged` is what `flush` reports
    left besides the held records.
    """

    def __init__(self, *, error: Any = None, raise_on_produce: BaseException | None = None,
                 error_cb: Callable[[Any], None] | None = None,
                 topics: tuple[str, ...] = ()) -> None:
        self.error = error
        self.raise_on_produce = raise_on_produce
        self.error_cb = error_cb  # what the code under test configured; tests may call it
        self.records: list[tuple[str, bytes | None, bytes | None, Any]] = []  # every produce
        self.written: list[tuple[str, bytes | None, bytes | None, Any]] = []  # acknowledged
        self.acked: list[str] = []  # topic of each delivery report, in order
        self.queued: list[tuple[str, bytes | None, bytes | None, Any, Any]] = []
        self.topics: dict[str, None] = dict.fromkeys(topics)
        self.reachable = True
        self.unacknowledged = 0
        self.flushes = 0
        self.release = threading.Event()
        self.release.set()
        self.lock = threading.Lock()

    def produce(self, topic: str, value: bytes | None = None, key: bytes | None = None,
                headers: Any = None, on_delivery: Callable[[Any, Any], None] | None = None,
                ) -> None:
        if self.raise_on_produce is not None:
            raise self.raise_on_produce
        with self.lock:
            self.records.append((topic, key, value, headers))
            self.queued.append((topic, key, value, headers, on_delivery))

    def poll(self, timeout: float = 0) -> int:
        """Run the queued delivery reports (none while `release` is clear); how many ran."""
        if not self.release.is_set():
            time.sleep(min(timeout, 0.01))
            return 0
        with self.lock:
            batch, self.queued = self.queued, []
        if not batch:
            time.sleep(min(timeout, 0.002))
        for topic, key, value, headers, on_delivery in batch:
            if self.error is None:
                self.written.append((topic, key, value, headers))
            self.acked.append(topic)
            if on_delivery is not None:
                on_delivery(self.error, FakeMessage(topic=topic, key=key, value=value,
                                                    headers=headers))
        return len(batch)

    def flush(self, timeout: float | None = None) -> int:
        """Deliver what can be delivered; return how many records are still in flight."""
        self.flushes += 1
        self.poll(0)
        return self.unacknowledged + len(self.queued)

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        if not self.reachable:
            raise RuntimeError("broker unreachable")
        return SimpleNamespace(topics=self.topics)

    def __len__(self) -> int:
        return len(self.queued)


class FakeRegistryClient:
    """The two `SchemaRegistryClient` calls `AvroSerde` makes, from memory, counted.

    `down = True` makes both raise ConnectionError, as an unreachable registry does.
    """

    def __init__(self) -> None:
        self.by_id: dict[int, str] = {}
        self.subjects: dict[str, list[int]] = {}
        self.calls = {"latest": 0, "by_id": 0}
        self.down = False

    def register(self, subject: str, schema: dict | str, schema_id: int | None = None) -> int:
        """Add a version of `subject`; ids count from 100 unless given."""
        schema_id = schema_id if schema_id is not None else len(self.by_id) + 100
        self.by_id[schema_id] = schema if isinstance(schema, str) else json.dumps(schema)
        self.subjects.setdefault(subject, []).append(schema_id)
        return schema_id

    def get_latest_version(self, subject: str) -> Any:
        self.calls["latest"] += 1
        if self.down:
            raise ConnectionError("registry unreachable")
        if subject not in self.subjects:
            raise LookupError(subject)
        schema_id = self.subjects[subject][-1]
        return SimpleNamespace(schema_id=schema_id,
                               schema=SimpleNamespace(schema_str=self.by_id[schema_id]))

    def get_schema(self, schema_id: int) -> Any:
        self.calls["by_id"] += 1
        if self.down:
            raise ConnectionError("registry unreachable")
        if schema_id not in self.by_id:
            raise LookupError(schema_id)
        return SimpleNamespace(schema_str=self.by_id[schema_id])
