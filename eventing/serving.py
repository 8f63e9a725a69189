"""Serve a Sluice ASGI app with uvicorn under limits every HTTP server of the stack needs.

The gateway, the real-time table server and the schema registry all face clients they do
not control, and uvicorn alone bounds none of the following (measured: a 16 MB header and
100k headers were accepted; a client sending one byte a minute held its connection
forever, "slowloris"). So every Sluice server runs through `serve`, which adds:

- **a request read timeout** (`read_timeout_s`): from the first byte of a request (or the
  connection's opening) until its last body byte. A request not fully read by then gets
  its connection closed. uvicorn's own `timeout_keep_alive` covers only the idle time
  *between* requests.
- **header limits** (`max_header_bytes`, `max_headers`): names plus values, counted while
  httptools parses; over either limit the server answers 431 with a JSON reason and
  closes the connection, before the app sees the request.
- **a connection limit** (`max_connections`, uvicorn's `limit_concurrency`): past it new
  requests get 503 at once instead of piling up.

The limits live in `ServerLimits` (a field of each server's settings) so the CLI edge can
set them; the defaults fit the local stack.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("sluice.serving")


@dataclass(frozen=True)
class ServerLimits:
    """What one HTTP server accepts from a client; see the module docstring for why."""

    read_timeout_s: float = 15.0
    max_header_bytes: int = 32_768
    max_headers: int = 100
    max_connections: int = 1000
    keep_alive_s: float = 5.0


class _HeadersTooLarge(Exception):
    """Raised from a parser callback; turned into a 431 by `data_received`."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request read timeout and header limits.

    `limits` is set on a subclass made by `protocol_for`, since uvicorn builds one
    protocol per connection from the class alone.
    """

    limits: ServerLimits = ServerLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0
        self._header_count = 0

    # ------------------------------------------------------------ read timeout

    def _arm(self) -> None:
        if self._read_deadline is None:
            self._read_deadline = self.loop.call_later(self.limits.read_timeout_s,
                                                       self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if not self.transport.is_closing():
            log.info("closing a connection whose request was not read within %g s",
                     self.limits.read_timeout_s)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that never sends a request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._header_count = 0
        self._arm()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    # ------------------------------------------------------------ header limits

    def on_header(self, name: bytes, value: bytes) -> None:
        # httptools may call back with a header in pieces; each piece counts its bytes.
        self._header_count += 1
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > self.limits.max_header_bytes:
            raise _HeadersTooLarge(f"request headers over {self.limits.max_header_bytes} "
                                   "bytes")
        if self._header_count > self.limits.max_headers:
            raise _HeadersTooLarge(f"more than {self.limits.max_headers} request headers")
        super().on_header(name, value)

    def data_received(self, data: bytes) -> None:
        try:
            super().data_received(data)
        except _HeadersTooLarge as exc:
            self._reject_headers(str(exc))

    def send_400_response(self, msg: str) -> None:
        # httptools wraps a callback's exception in HttpParserCallbackError, which
        # uvicorn answers with a plain 400; ours become a 431 with the reason.
        cause = _callback_cause()
        if cause is not None:
            self._reject_headers(str(cause))
            return
        super().send_400_response(msg)

    def _reject_headers(self, reason: str) -> None:
        self._disarm()
        body = orjson.dumps({"error": "headers_too_large",
                             "reason": f"{reason}; send fewer or smaller headers"})
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()


def _callback_cause() -> BaseException | None:
    """The `_HeadersTooLarge` behind the exception being handled, if that is what it is."""
    import sys

    exc = sys.exc_info()[1]
    while exc is not None:
        if isinstance(exc, _HeadersTooLarge):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def protocol_for(limits: ServerLimits) -> type[LimitedHttpToolsProtocol]:
    """A protocol class bound to `limits` (uvicorn instantiates it per connection)."""
    return type("SluiceHttpProtocol", (LimitedHttpToolsProtocol,), {"limits": limits})


def config(app: Any, *, host: str, port: int, limits: ServerLimits, log_level: str = "info",
           **kwargs: Any) -> Any:
    """The uvicorn.Config of a Sluice server: uvloop, httptools with `limits`, no access
    log, no server header."""
    import uvicorn

    return uvicorn.Config(
        app, host=host, port=port, loop="uvloop", http=protocol_for(limits),
        lifespan=kwargs.pop("lifespan", "on"), access_log=False, log_level=log_level,
        timeout_graceful_shutdown=kwargs.pop("timeout_graceful_shutdown", 10),
        server_header=False, limit_concurrency=limits.max_connections,
        timeout_keep_alive=limits.keep_alive_s, **kwargs)


def serve(app: Any, *, host: str, port: int, limits: ServerLimits | None = None,
          log_level: str = "info", **kwargs: Any) -> None:
    """Run `app` in the foreground until SIGINT/SIGTERM."""
    import uvicorn

    uvicorn.Server(config(app, host=host, port=port, limits=limits or ServerLimits(),
                          log_level=log_level, **kwargs)).run()
