"""The trace store: indexing and rendering, retention by age and size, search, the OTLP/HTTP
receiver (protobuf from the OpenTelemetry SDK's own encoder, JSON, gzip, bad input), and
the real parts: spans exported to rotel reach the store and nothing goes to a broker."""

from __future__ import annotations

import gzip
import json
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from eventing.stack import binaries, collector
from eventing.stack.settings import load_settings
from eventing.telemetry import traces
from eventing.units import parse_duration, parse_size
from tests.helpers import ROOT, free_port, free_port_offset, stop_process, wait_port, wait_until

HOUR_NS = 3600 * 10**9

# Business ids come from a topology's traceIds; these tests declare payment.id.
REFS = traces.ref_attributes(["payment.id"])


def _stored(trace_id, span_id, parent, name, start, **attrs) -> traces.StoredSpan:
    return traces.StoredSpan(trace_id, span_id, parent, "svc", name, "internal", start,
                             start + 1_000_000, "error" if "err" in attrs else "unset",
                             attrs.pop("err", ""), attrs)


def _trace(start_ns: int, *, ref: str | None = None, pad: int = 0, err: bool = False,
           function: str | None = None, dur_ns: int = 1_000_000) -> list[traces.StoredSpan]:
    """A two-span trace starting at `start_ns`; `pad` bytes of attribute make it bigger."""
    tid = uuid.uuid4().hex
    root = uuid.uuid4().hex[:16]
    attrs: dict = {"payment.id": ref} if ref else {}
    if pad:
        attrs["pad"] = "x" * pad
    child_attrs = {"sluice.function": function} if function else {}
    return [traces.StoredSpan(tid, root, None, "sluice-gateway", "POST /", "server", start_ns,
                              start_ns + dur_ns, "unset", "", attrs),
            traces.StoredSpan(tid, uuid.uuid4().hex[:16], root, "sluice-fn", "process t",
                              "consumer", start_ns + 10, start_ns + 20,
                              "error" if err else "unset", "boom" if err else "",
                              child_attrs)]


# --------------------------------------------------------------------------- store


def test_store_indexes_by_trace_event_and_payment_id_and_renders_a_tree(tmp_path) -> None:
    store = traces.TraceStore(tmp_path / "t.db", ref_attributes=REFS)
    tid = "a" * 32
    store.add([
        _stored(tid, "1" * 16, None, "POST /", 0, **{"cloudevents.event_id": "e1"}),
        _stored(tid, "2" * 16, "1" * 16, "send payments.raw", 100,
                **{"payment.id": "p1", "messaging.destination.name": "payments.raw",
                   "messaging.kafka.destination.partition": 3,
                   "messaging.kafka.message.offset": 7}),
        _stored(tid, "3" * 16, "2" * 16, "process payments.raw", 200, err="boom"),
    ])
    # another connection reads what the first wrote
    reader = traces.TraceStore(tmp_path / "t.db", readonly=True, ref_attributes=REFS)
    for ref in (tid, "e1", "p1"):
        assert list(reader.lookup(ref)) == [tid]
    assert reader.lookup("nope") == {}
    text = traces.render(reader.lookup("p1"))
    lines = text.splitlines()
    assert "  send payments.raw" in lines[3] and "payments.raw[3]@7" in lines[3]
    assert "    process payments.raw" in lines[4] and "! boom" in lines[5]
    data = traces.as_json(reader.lookup("e1"))
    assert [s["depth"] for s in data[0]["spans"]] == [0, 1, 2]
    with pytest.raises(sqlite3.OperationalError):
        reader.add([_stored(tid, "4" * 16, None, "x", 0)])  # read-only
    reader.close()
    store.close()


def test_retention_deletes_traces_older_than_the_age_with_their_spans_and_refs(tmp_path) -> None:
    store = traces.TraceStore(tmp_path / "t.db", ref_attributes=REFS)
    now = time.time_ns()
    old = _trace(now - 2 * HOUR_NS, ref="old-payment")
    edge = _trace(now - HOUR_NS + 60 * 10**9, ref="recent-payment")  # 59 min old: kept
    store.add(old + edge)
    assert store.trace_count() == 2 and store.count() == 4

    result = store.prune(traces.RetentionPolicy(max_age_s=3600), now_ns=now)
    assert (result.by_age, result.by_size) == (1, 0)
    assert store.lookup("old-payment") == {}
    assert store.lookup(old[0].trace_id) == {}
    assert store.db.execute("SELECT COUNT(*) FROM refs WHERE ref='old-payment'").fetchone() == (0,)
    assert list(store.lookup("recent-payment")) == [edge[0].trace_id]
    assert store.count() == 2
    # A later pass deletes it once it is older than the age too.
    store.prune(traces.RetentionPolicy(max_age_s=3600), now_ns=now + 2 * 60 * 10**9)
    assert store.trace_count() == 0 and store.count() == 0
    store.close()


def test_the_store_stays_within_its_size_while_traces_keep_arriving(tmp_path) -> None:
    """Five times the bound goes in, batch by batch: each write first makes room, so the
    files on disk never pass the bound, and the newest traces are the ones kept."""
    policy = traces.RetentionPolicy(max_bytes=4 << 20)
    store = traces.TraceStore(tmp_path / "t.db", policy=policy, ref_attributes=REFS)
    t0 = time.time_ns()
    written = 0
    largest = 0
    newest: list[str] = []
    for batch in range(100):
        spans = [s for i in range(20) for s in _trace(t0 + (batch * 20 + i) * 1000, pad=12_000)]
        written += sum(len(s.attributes.get("pad", "")) for s in spans)
        store.add(spans)
        newest = [s.trace_id for s in spans[::2]]
        largest = max(largest, store.disk_bytes())
    assert written >= 5 * policy.max_bytes
    assert largest <= policy.max_bytes, (largest, policy.max_bytes)
    assert store.size_bytes() <= policy.max_bytes
    kept = {t for (t,) in store.db.execute("SELECT trace_id FROM traces")}
    assert set(newest) <= kept  # the last batch survives
    assert 0 < len(kept) < 2000
    oldest = store.db.execute("SELECT MIN(start_ns) FROM traces").fetchone()[0]
    assert oldest > t0  # the first traces went first
    store.close()


def test_an_oversized_or_old_layout_store_is_cut_down_at_start(tmp_path) -> None:
    path = tmp_path / "t.db"
    store = traces.TraceStore(path, ref_attributes=REFS)
    t0 = time.time_ns()
    for batch in range(30):
        store.add([s for i in range(20) for s in _trace(t0 + batch * 20 + i, pad=20_000)])
    store.close()
    assert path.stat().st_size > 8 << 20
    store = traces.TraceStore(path, ref_attributes=REFS)
    policy = traces.RetentionPolicy(max_bytes=4 << 20)
    assert store.compact_if_oversized(policy)
    assert path.stat().st_size <= policy.max_bytes
    assert store.trace_count() > 0
    store.close()

    # The layout that read spans from a broker topic: emptied, then usable.
    old = tmp_path / "old.db"
    db = sqlite3.connect(old)
    db.executescript("CREATE TABLE spans (trace_id TEXT, span_id TEXT);"
                     "CREATE TABLE offsets (topic TEXT, partition INTEGER, next_offset INTEGER);"
                     "INSERT INTO spans VALUES ('a', 'b');")
    db.commit()
    db.close()
    store = traces.TraceStore(old)
    assert store.count() == 0
    assert store.add(_trace(t0)) == 2 and store.trace_count() == 1
    store.close()


def test_search_by_age_errors_function_and_duration(tmp_path) -> None:
    store = traces.TraceStore(tmp_path / "t.db", ref_attributes=REFS)
    now = time.time_ns()
    old_ok = _trace(now - 30 * 60 * 10**9, function="enrich")
    new_err = _trace(now - 60 * 10**9, err=True, function="score")
    new_slow = _trace(now - 30 * 10**9, function="score", dur_ns=900_000_000)
    store.add(old_ok + new_err + new_slow)

    def ids(**kw) -> list[str]:
        return [t.trace_id for t in store.search(**kw)]

    t_old, t_err, t_slow = (t[0].trace_id for t in (old_ok, new_err, new_slow))
    assert ids() == [t_slow, t_err, t_old]  # newest first
    assert ids(since_ns=now - 10 * 60 * 10**9) == [t_slow, t_err]
    assert ids(errors=True) == [t_err]
    assert ids(function="score") == [t_slow, t_err]
    assert ids(function="enrich") == [t_old]
    assert ids(function="nope") == []
    assert ids(min_duration_ms=500) == [t_slow]
    assert ids(function="score", errors=True, since_ns=now - 120 * 10**9) == [t_err]
    assert ids(limit=1) == [t_slow]
    assert ids(trace_ids=[t_old, t_err], errors=True) == [t_err]
    (summary,) = store.search(errors=True)
    assert summary.spans == 2 and summary.error and summary.root == "POST /"
    assert summary.services == ["sluice-fn", "sluice-gateway"]
    assert summary.functions == ["score"]
    listing = traces.render_list(store.search())
    assert t_err in listing and "error" in listing and "fn: score" in listing
    assert len(listing.splitlines()) == 4
    store.close()


def test_retention_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="at least 4 MiB"):
        traces.RetentionPolicy(max_bytes=1000)
    with pytest.raises(ValueError, match="positive"):
        traces.RetentionPolicy(max_age_s=0)
    assert parse_size("1GiB") == 1 << 30 and parse_size("200MB") == 200_000_000
    assert parse_size("4096") == 4096 and parse_duration("250ms") == 0.25
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


# --------------------------------------------------------------------------- receiver


def _sdk_spans(n: int, service: str = "sluice-test", payment: str = "pay-1"):
    """`n` finished spans recorded by the OpenTelemetry SDK (parent, then children)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tests")
    with tracer.start_as_current_span("parent", attributes={"payment.id": payment}):
        for i in range(n - 1):
            with tracer.start_as_current_span(f"child-{i}",
                                              attributes={"sluice.function": "enrich",
                                                          "n": i, "ok": True, "f": 1.5,
                                                          "tags": ["a", "b"]}) as span:
                span.add_event("exception", {"exception.message": f"bad {i}"})
    provider.shutdown()
    return exporter.get_finished_spans()


@pytest.fixture()
def receiver(tmp_path):
    store = traces.TraceStore(tmp_path / "t.db", ref_attributes=REFS)
    rx = traces.TraceReceiver(store, traces.RetentionPolicy(),
                              traces.ReceiverSettings(port=free_port(), max_body_bytes=1 << 20))
    stop = threading.Event()
    thread = threading.Thread(target=rx.run, args=(stop,), daemon=True)
    thread.start()
    wait_until(lambda: httpx.get(rx.url + "/healthz").status_code == 200, 10, "receiver")
    yield rx
    stop.set()
    thread.join(10)
    store.close()


def test_receiver_takes_sdk_protobuf_plain_and_gzip(receiver) -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    spans = _sdk_spans(3)
    body = encode_spans(spans).SerializeToString()
    r = httpx.post(receiver.url + "/v1/traces", content=body,
                   headers={"Content-Type": "application/x-protobuf"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-protobuf"
    more = _sdk_spans(2, payment="pay-2")
    r = httpx.post(receiver.url + "/v1/traces",
                   content=gzip.compress(encode_spans(more).SerializeToString()),
                   headers={"Content-Type": "application/x-protobuf",
                            "Content-Encoding": "gzip"})
    assert r.status_code == 200
    assert receiver.spans == 5 and receiver.requests == 2

    tid = format(spans[0].context.trace_id, "032x")
    stored = {s.name: s for s in receiver.store.spans(tid)}
    assert set(stored) == {"parent", "child-0", "child-1"}
    parent = stored["parent"]
    assert parent.parent_id is None and parent.service == "sluice-test"
    assert parent.span_id == format(next(s for s in spans if s.name == "parent")
                                    .context.span_id, "016x")
    child = stored["child-1"]
    assert child.parent_id == parent.span_id
    assert child.attributes == {"sluice.function": "enrich", "n": 1, "ok": True, "f": 1.5,
                                "tags": ["a", "b"]}
    assert child.errors() == ["bad 1"]
    assert child.kind == "internal" and child.end_ns > child.start_ns > 0
    assert list(receiver.store.lookup("pay-1")) == [tid]
    assert [t.trace_id for t in receiver.store.search(function="enrich")][-1] == tid


def test_receiver_takes_otlp_json(receiver) -> None:
    tid, sid = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    body = {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "js"}}]},
        "scopeSpans": [{"spans": [{"traceId": tid, "spanId": sid, "name": "op", "kind": 2,
                                   "startTimeUnixNano": "1000", "endTimeUnixNano": "5000",
                                   "status": {"code": 2, "message": "no"}}]}]}]}
    r = httpx.post(receiver.url + "/v1/traces", json=body)
    assert r.status_code == 200 and r.json() == {}
    (span,) = receiver.store.spans(tid)
    assert (span.service, span.kind, span.status, span.status_message) == (
        "js", "server", "error", "no")


@pytest.mark.parametrize("headers,body,status,says", [
    ({"Content-Type": "text/plain"}, b"hi", 415, "content type must be"),
    ({"Content-Type": "application/json"}, b"[1,2]", 400, "JSON object"),
    ({"Content-Type": "application/json"}, b"{not json", 400, ""),
    ({"Content-Type": "application/x-protobuf"}, b"\xff\xff\xff", 400, "not an OTLP"),
    ({"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}, b"nope", 400,
     "not valid gzip"),
    ({"Content-Type": "application/x-protobuf", "Content-Encoding": "br"}, b"x", 400,
     "content encoding"),
    ({"Content-Type": "application/json"}, b"{" + b" " * (2 << 20) + b"}", 413, "body over"),
    ({"Content-Type": "application/json", "Content-Encoding": "gzip"},
     gzip.compress(b"{" + b" " * (2 << 20) + b"}"), 400, "once decompressed"),
])
def test_receiver_refuses_bad_requests_with_the_reason(receiver, headers, body, status,
                                                       says) -> None:
    r = httpx.post(receiver.url + "/v1/traces", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert says in r.text
    assert receiver.store.count() == 0
    assert httpx.post(receiver.url + "/v1/logs", json={}).status_code == 404


# --------------------------------------------------------------------------- real parts


def test_spans_exported_to_rotel_reach_the_store_and_never_a_broker(tmp_path) -> None:
    """rotel exactly as `sluice up` starts it, and `sluice tracestore` as a process: spans
    the OpenTelemetry SDK exports to rotel land in the store; rotel has no broker to write
    to, and the store keeps its size while far more than it arrives."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    state = tmp_path / "state"
    settings = load_settings(state_dir=state, port_offset=free_port_offset(start=21050))
    spec = collector.spec(settings)
    assert not any("kafka" in a or a == settings.bootstrap for a in spec.argv), spec.argv
    assert settings.tracestore_url in spec.argv

    db = traces.db_path(settings.state_dir)
    store_proc = subprocess.Popen(
        [str(ROOT / ".venv/bin/python"), "-m", "eventing.cli", "--state-dir", str(state),
         "--port-offset", str(settings.ports.broker - 9092), "tracestore",
         "--max-size", "4MiB", "--every", "0.5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rotel = subprocess.Popen(spec.argv, env=spec.env, cwd=spec.cwd,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    provider = None
    try:
        wait_port(settings.ports.tracestore, 20)
        wait_port(settings.ports.otlp_http, 20)
        provider = TracerProvider(resource=Resource.create({"service.name": "sluice-e2e"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=settings.otlp_http_url + "/v1/traces")))
        tracer = provider.get_tracer("tests")
        with tracer.start_as_current_span("publish", attributes={"payment.id": "e2e-1"}):
            with tracer.start_as_current_span("score", attributes={"sluice.function": "score"}):
                pass
        provider.force_flush()
        found = traces.wait_for(db, "e2e-1", 20, settle_s=0.5, min_spans=2)
        (spans,) = found.values()
        by_name = {s.name: s for s in spans}
        assert by_name["score"].parent_id == by_name["publish"].span_id
        assert {s.service for s in spans} == {"sluice-e2e"}

        # ~12 MiB of spans through rotel into a store bounded at 4 MiB.
        pad = "p" * 1000
        for i in range(10000):
            with tracer.start_as_current_span(f"bulk-{i}", attributes={"pad": pad}):
                pass
            if i % 200 == 199:  # the SDK's queue drops spans beyond 2048
                provider.force_flush()
        provider.force_flush()
        reader = traces.TraceStore(db, readonly=True, ref_attributes=REFS)
        try:
            wait_until(lambda: reader.search(limit=1)[0].root == "bulk-9999", 120,
                       "the last bulk span in the store")
            assert reader.lookup("e2e-1") == {}  # the oldest went to make room
        finally:
            reader.close()
        size = sum(p.stat().st_size for p in db.parent.glob("traces.db*"))
        assert size <= 4 << 20, size
    finally:
        if provider is not None:
            provider.shutdown()
        stop_process(rotel)
        stop_process(store_proc)
    out = store_proc.stdout.read() if store_proc.stdout else ""
    assert "traces deleted by retention" in out, out
    assert int(out.rsplit(";", 1)[1].split()[0]) > 0, out  # some were deleted


def test_rotel_binary_is_there() -> None:
    assert Path(binaries.rotel()).exists()


def test_sluice_trace_lists_what_a_search_matches(tmp_path) -> None:
    from tests.helpers import sluice

    db = tmp_path / "t.db"
    store = traces.TraceStore(db, ref_attributes=REFS)
    now = time.time_ns()
    ok = _trace(now - 5 * 10**9, function="enrich", ref="pay-ok")
    bad = _trace(now - 2 * 10**9, err=True, function="score", ref="pay-bad")
    old = _trace(now - 3 * HOUR_NS, err=True, function="score")
    store.add(ok + bad + old)
    store.close()

    def run(*args: str, check: bool = True):
        return sluice("trace", *args, "--db", str(db), state_dir=tmp_path / "s", offset=0,
                      check=check)

    listed = json.loads(run("--errors", "--json").stdout)
    assert [t["trace_id"] for t in listed] == [bad[0].trace_id, old[0].trace_id]
    listed = json.loads(run("--errors", "--since", "1h", "--json").stdout)
    assert [t["trace_id"] for t in listed] == [bad[0].trace_id]
    text = run("--function", "enrich").stdout
    assert ok[0].trace_id in text and bad[0].trace_id not in text
    assert len(text.splitlines()) == 2  # header and the one trace
    # An id with a search: only that id's traces that match.
    assert run("pay-ok", "--errors", check=False).returncode == 1
    assert bad[0].trace_id in run("pay-bad", "--errors").stdout
    miss = run("--min-duration", "1s", check=False)
    assert miss.returncode == 1 and "no trace matches" in miss.stderr
    bare = run(check=False)
    assert bare.returncode == 2 and "--since, --errors, --function or --min-duration" in bare.stderr
    wrong = run("--since", "soon", check=False)
    assert wrong.returncode == 2 and "not a duration: 'soon'" in wrong.stderr


def test_up_refuses_a_trace_store_bound_below_the_minimum_before_starting_anything(
        tmp_path) -> None:
    from tests.helpers import sluice

    state = tmp_path / "state"
    proc = sluice("up", "--trace-max-size", "1MiB", state_dir=state, offset=0, check=False)
    assert proc.returncode == 2
    assert "trace store size must be at least 4 MiB" in proc.stderr
    assert not (state / "run").exists() and not (state / "logs").exists()
    proc = sluice("up", "--trace-retention", "forever", state_dir=state, offset=0, check=False)
    assert proc.returncode == 2 and "not a duration: 'forever'" in proc.stderr
