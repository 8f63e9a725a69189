"""Small probes shared by the parts' health checks and the supervisor's liveness probes."""

from __future__ import annotations

import http.client
import socket
import struct
import time
from collections.abc import Callable
from urllib.parse import SplitResult, urlsplit


def http_status(url: str, *, method: str = "GET", timeout: float = 1.0,
                content: bytes | None = None,
                headers: dict[str, str] | None = None) -> int | None:
    """HTTP status of `url`, or None when nothing answers within `timeout`.

    Over `http.client` like the probes below (why: `http_probe`); `up` and `status` ask
    every part this in turn, so a slow client made them slow under load.
    """
    try:
        return _status(urlsplit(url), method, timeout, content, headers)
    except (OSError, http.client.HTTPException):
        return None


def _status(parts: SplitResult, method: str, timeout: float, content: bytes | None,
            headers: dict[str, str] | None) -> int:
    """One request on a fresh connection; its status (one home for both helpers)."""
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                      timeout=timeout)
    try:
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request(method, path, body=content, headers=headers or {})
        return conn.getresponse().status
    finally:
        conn.close()


class ProbeFailed(Exception):
    """A liveness probe got an answer that says the part is not alive (the message why)."""


def http_probe(url: str, *, method: str = "GET", ok: range = range(200, 400),
               content: bytes | None = None,
               headers: dict[str, str] | None = None) -> Callable[[float], None]:
    """A liveness probe like Kubernetes' httpGet: a status in `ok` within the timeout
    passes; no answer, or another status, raises.

    Plain `http.client`, not httpx: `httpx.request` builds a client that loads the CA
    bundle each time, which made a probe of a cheap `/healthz` take 1.2 s (p50) to 4.3 s
    (max) at load average 38 here, most of it before the request was sent.
    """
    parts = urlsplit(url)

    def probe(timeout: float) -> None:
        status = _status(parts, method, timeout, content, headers)
        if status not in ok:
            raise ProbeFailed(f"{method} {url}: HTTP {status}")
    probe.url = url  # type: ignore[attr-defined] - what it probes, for tools
    return probe


def kafka_probe(host: str, port: int) -> Callable[[float], None]:
    """A liveness probe for a Kafka-protocol broker, which has no HTTP endpoint: one
    ApiVersions v0 request on a fresh connection, answered with its correlation id.

    Why not a TCP connect (Kubernetes' tcpSocket): the kernel completes the handshake
    for a stopped or deadlocked process too. Why not a metadata request through
    librdkafka (the start health check): an AdminClient per probe starts threads and
    retries on its own clock; this is one round trip whose timeout is the probe's.
    """
    def probe(timeout: float) -> None:
        correlation = 0x51C3
        client = b"sluice-probe"
        body = struct.pack(">hhih", 18, 0, correlation, len(client)) + client
        deadline = time.monotonic() + timeout
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(body)) + body)
            head = b""
            while len(head) < 8:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(8 - len(head))
                if not chunk:
                    raise ProbeFailed(f"kafka {host}:{port}: connection closed")
                head += chunk
        size, got = struct.unpack(">ii", head)
        if got != correlation or size < 4:
            raise ProbeFailed(f"kafka {host}:{port}: unexpected ApiVersions answer")
    return probe
