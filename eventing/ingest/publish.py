"""Publish CloudEvents to a Sluice gateway: `Publisher` for Python, `sluice publish` for shells.

Single events go in structured mode (one JSON object, nothing lost in header encoding);
many go in batch mode (`application/cloudevents-batch+json`), `batch_size` per request,
with up to `concurrency` requests in flight over kept-alive connections. The gateway
answers a batch only after the broker acknowledged it, so one request at a time leaves
the client idle for the whole ack (measured: ~1.4K ev/s of the example's payments in
batches of 500 with one request in flight, the gateway at 8% of a core); several in
flight keep the gateway busy instead (at the price of order across batches: see
`Publisher`). A batch is all-or-nothing at the gateway for
validation, so a rejected batch wrote nothing and `GatewayError.events` names every bad
event by its index *in the whole stream* (the batch offset is added back). Batches in
flight beside a rejected one may be written; none is started after it.

A 503 (broker or registry unavailable) is retried after the gateway's `Retry-After`, a
few times. The gateway may have written part of a batch it answered 503 for, so a retry
can duplicate events; they keep their `id`, which is what consumers dedupe on.
A 503 `paused` (the gateway holds intake while the broker rolls over, README "Broker
rollover") wrote nothing and ends by itself, so it is retried every `Retry-After` for up
to `pause_wait_s` without using up `retries`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import httpx
import orjson
from cloudevents.http import CloudEvent

from eventing.cloudevent import event as ce_event
from eventing.cloudevent import http as ce_http
from eventing.cloudevent import json as ce_json

DEFAULT_SOURCE = "/sluice/publish"
# Batch requests in flight for `sluice publish --file` and `sluice generate`: enough to
# keep the gateway busy while earlier batches wait for the broker's ack.
CLI_CONCURRENCY = 4
CONNECT_TIMEOUT_S = 3.0


class GatewayError(Exception):
    """The gateway refused a request (or could not be reached: `status` is None)."""

    def __init__(self, status: int | None, error: str, reason: str,
                 body: dict[str, Any] | None = None, offset: int = 0) -> None:
        self.status = status
        self.error = error
        self.reason = reason
        self.body = body or {}
        self.offset = offset  # index of the request's first event in the stream
        super().__init__(f"{status or 'no answer'} {error}: {reason}")

    @property
    def events(self) -> list[dict[str, Any]]:
        """Bad events of a rejected batch, `index` relative to the whole stream."""
        return [{**e, "index": e.get("index", 0) + self.offset}
                for e in self.body.get("events", [])]


def normalize(event: CloudEvent | dict[str, Any], source: str = DEFAULT_SOURCE) -> dict[str, Any]:
    """The event as a JSON-format dict, with `specversion`, `id` and `source` filled in."""
    obj = ce_json.to_object(event) if isinstance(event, CloudEvent) else dict(event)
    obj.setdefault("specversion", ce_event.SPECVERSION)
    if not obj.get("id"):
        obj["id"] = str(uuid.uuid4())
    if not obj.get("source"):
        obj["source"] = source
    return obj


class Publisher:
    """Send CloudEvents to the gateway at `url` (bearer `token` if it requires one)."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 30.0,
                 retries: int = 3, source: str = DEFAULT_SOURCE,
                 client: httpx.Client | None = None, concurrency: int = 1,
                 pause_wait_s: float = 300.0) -> None:
        """`concurrency`: batch requests `send_many` keeps in flight. 1 (the default)
        sends one at a time, so events reach the topics in the order given; with more,
        batches in flight are written in whatever order the gateway answers them, so
        two events of one key in different batches may swap (`sluice publish` and
        `sluice generate` use `CLI_CONCURRENCY`)."""
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.url = url.rstrip("/") + "/"
        self.retries = retries
        self.pause_wait_s = pause_wait_s
        self.source = source
        self.concurrency = concurrency
        headers = {"authorization": f"Bearer {token}"} if token else {}
        # A short connect timeout: a gateway that does not accept a connection within
        # CONNECT_TIMEOUT_S is reported, not waited on for the whole request timeout.
        # Loading the CA bundle costs ~0.3 s idle (2.8 s measured under load) and a
        # plain-HTTP gateway never uses it.
        self._client = client or httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S)),
            headers=headers, verify=self.url.startswith("https:"))
        self._answered = False
        self._own_client = client is None

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._own_client:
            self._client.close()

    def send(self, event: CloudEvent | dict[str, Any]) -> str:
        """Publish one event; return its id once the gateway has it durably."""
        obj = normalize(event, self.source)
        self._post(orjson.dumps(obj), ce_json.STRUCTURED_CONTENT_TYPE, 0)
        return obj["id"]

    def send_many(self, events: Iterable[CloudEvent | dict[str, Any]], batch_size: int = 500,
                  progress: Callable[[int], None] | None = None) -> int:
        """Publish `events` in batches of `batch_size`; return how many were accepted.

        Up to `concurrency` batches are in flight at once (each on its own kept-alive
        connection). `progress(accepted_so_far)` is called after each accepted request,
        one call at a time and counting up whatever order the answers come in. A batch
        over the gateway's body limit (413) is split in halves. Stops at the first
        rejected batch with `GatewayError` once the batches already in flight have been
        answered (earlier batches, and those in flight, stay written).
        """
        tally = _Tally(progress)
        batches = ([normalize(e, self.source) for e in batch]
                   for batch in _chunks(events, batch_size))
        if self.concurrency == 1:
            offset = 0
            for objs in batches:
                self._send_batch(objs, offset, tally)
                offset += len(objs)
            return tally.total
        self._send_concurrently(batches, tally)
        return tally.total

    def _send_concurrently(self, batches: Iterator[list[dict[str, Any]]],
                           tally: _Tally) -> None:
        """`send_many` with `concurrency` requests in flight (threads: the client is sync,
        and a request's time is mostly waiting for the gateway's answer)."""
        offset = 0  # stream index of the next batch's first event
        failure: GatewayError | None = None
        in_flight: set[Future[None]] = set()

        def settle(done: Iterable[Future[None]]) -> None:
            nonlocal failure
            for future in done:
                exc = future.exception()
                if exc is None:
                    continue
                if not isinstance(exc, GatewayError):
                    raise exc
                if failure is None or exc.offset < failure.offset:
                    failure = exc  # the earliest rejected batch of the stream

        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="publish") as pool:
            for objs in batches:
                in_flight.add(pool.submit(self._send_batch, objs, offset, tally))
                offset += len(objs)
                if len(in_flight) >= self.concurrency:
                    done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    settle(done)
                if failure is not None:
                    break
            settle(wait(in_flight).done)
        if failure is not None:
            raise failure

    def _send_batch(self, objs: list[dict[str, Any]], offset: int, tally: _Tally) -> None:
        """POST one batch (stream index `offset` of its first event), counting what was
        accepted in `tally`; halve it while the gateway says it is too large (413)."""
        headers, body = ce_http.batch_message(objs)
        try:
            self._post(body, headers["content-type"], offset)
        except GatewayError as exc:
            if exc.status != 413 or len(objs) < 2:
                raise
            half = len(objs) // 2
            self._send_batch(objs[:half], offset, tally)
            self._send_batch(objs[half:], offset + half, tally)
            return
        tally.add(len(objs))

    def _post(self, body: bytes, content_type: str, offset: int) -> dict[str, Any]:
        attempt = 0
        paused_since: float | None = None
        while True:
            try:
                r = self._client.post(self.url, content=body,
                                      headers={"content-type": content_type})
            except httpx.HTTPError as exc:
                if isinstance(exc, httpx.ConnectError) and not self._answered:
                    # Nothing listens there: waiting will not change that, so say so now
                    # (a gateway that answered before and went away is retried below).
                    raise GatewayError(None, "unreachable",
                                       f"cannot connect to the gateway at {self.url} ({exc}); "
                                       "is the stack up (`sluice status`), or is --gateway "
                                       "wrong?", offset=offset) from None
                if attempt >= self.retries:
                    raise GatewayError(None, "unreachable",
                                       f"gateway {self.url} did not answer: {exc}",
                                       offset=offset) from None
                attempt += 1
                time.sleep(min(0.5 * 2 ** attempt, 5.0))
                continue
            self._answered = True
            if r.status_code == 202:
                return r.json()
            if r.status_code == 503 and _is_pause(r):
                now = time.monotonic()
                paused_since = now if paused_since is None else paused_since
                if now - paused_since < self.pause_wait_s:
                    time.sleep(_retry_after(r.headers.get("retry-after")))
                    continue
            if r.status_code == 503 and attempt < self.retries:
                attempt += 1
                time.sleep(_retry_after(r.headers.get("retry-after")))
                continue
            try:
                answer = r.json()
            except ValueError:
                answer = {"error": "http_error", "reason": r.text[:500]}
            raise GatewayError(r.status_code, str(answer.get("error", "http_error")),
                               str(answer.get("reason", r.text[:500])), answer, offset)


class _Tally:
    """Events accepted so far, added to from the sending threads; `progress` sees each
    new total in order (the lock is held while it runs)."""

    def __init__(self, progress: Callable[[int], None] | None) -> None:
        self.total = 0
        self._progress = progress
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.total += n
            if self._progress is not None:
                self._progress(self.total)

EventMaker = Callable[[int], tuple[dict[str, Any], bool]]


def publish_paced(publisher: Publisher, make: EventMaker, *, rate: float, duration: float,
                  truth: Path | None = None, progress: Callable[[int], None] | None = None
                  ) -> tuple[int, int]:
    """Publish the events `make(now_ms)` returns at `rate` per second for `duration`
    seconds (0: until interrupted); return (events sent, of which flagged).

    The one traffic loop of every example's `generate.py` (`sluice generate`, and the
    generator `sluice up` starts): an example supplies only its event maker, which
    returns a CloudEvent (a JSON-format dict) and whether it is an injected case (fraud,
    an anomaly). Flagged events' ids are appended to `truth`, one per line, so tests and
    people can measure detection without the events carrying the label. Pacing is by
    the wall clock with catch-up (a slow batch is followed by a burst, not a lower
    rate); batches of rate/20 keep the publish delay near 50 ms at any rate.
    """
    flagged = 0
    total = int(rate * duration) if duration else 10**15
    truth_fh = open(truth, "a", buffering=1) if truth else None  # noqa: SIM115 - closed below

    def events() -> Iterator[dict[str, Any]]:
        nonlocal flagged
        start = time.monotonic()
        sent = 0
        while sent < total:
            target = min(total, int((time.monotonic() - start) * rate) + 1)
            while sent < target:
                event, is_flagged = make(int(time.time() * 1000))
                if is_flagged:
                    flagged += 1
                    if truth_fh:
                        truth_fh.write(f"{event['id']}\n")
                yield event
                sent += 1
            sleep = sent / rate - (time.monotonic() - start)
            if sleep > 0:
                time.sleep(min(sleep, 0.05))

    try:
        sent = publisher.send_many(events(), batch_size=max(1, int(rate // 20)),
                                   progress=progress)
    finally:
        if truth_fh:
            truth_fh.close()
    return sent, flagged


def _is_pause(r: httpx.Response) -> bool:
    """Whether a 503 is the gateway's deliberate, bounded intake pause (nothing written)."""
    try:
        return bool(r.json().get("error") == "paused")
    except (ValueError, AttributeError):
        return False


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or 1), 0.1), 30.0)
    except ValueError:
        return 1.0


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    if size < 1:
        raise ValueError("batch_size must be >= 1")
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class Progress:
    """`\\r12000/50000 events  8421 ev/s` on a text stream, at most every `interval` s."""

    def __init__(self, total: int, stream: Any, interval: float = 0.2) -> None:
        self.total = total
        self.stream = stream
        self.interval = interval
        self.started = time.monotonic()
        self._last = 0.0
        self._shown = -1

    def __call__(self, done: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and done < self.total and now - self._last < self.interval:
            return
        if not (final and done == self._shown):
            rate = done / max(now - self.started, 1e-9)
            self.stream.write(f"\r{done}/{self.total} events  {rate:.0f} ev/s")
        self._last = now
        self._shown = done
        if final:
            self.stream.write("\n")
        self.stream.flush()


def read_jsonl(path: str) -> tuple[int, Iterator[dict[str, Any]], list[int]]:
    """(count, events, line numbers) for a file of one JSON CloudEvent per line.

    Blank lines are skipped; `line numbers[i]` is the file line of event `i`, so an error
    the gateway reports by event index names the line a person opens the file at. The
    whole file is checked first, so a bad line is reported (`ValueError` naming the line)
    before anything is sent; events are then read again lazily.
    """
    lines: list[int] = []
    try:
        with open(path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON: {exc}") from None
                if type(obj) is not dict:
                    raise ValueError(f"{path}:{number}: a line must be one JSON object "
                                     "(an event)")
                lines.append(number)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None

    def events() -> Iterator[dict[str, Any]]:
        with open(path, "rb") as fh:
            for line in fh:
                if line.strip():
                    yield orjson.loads(line)

    return len(lines), events(), lines


def one_event(event_type: str, source: str | None, data: str, event_id: str | None = None,
              key: str | None = None) -> dict[str, Any]:
    """A structured-mode event from CLI flags (`data` is JSON text)."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"--data is not valid JSON: {exc}") from None
    obj: dict[str, Any] = {"specversion": ce_event.SPECVERSION, "type": event_type,
                           "source": source or DEFAULT_SOURCE,
                           "id": event_id or str(uuid.uuid4()),
                           "datacontenttype": "application/json", "data": value}
    if key is not None:
        obj["partitionkey"] = key
    return obj
