"""Input limits of the HTTP servers (issue 12, point 5): unit tests with fakes.

The gateway through Starlette's TestClient and a fake producer (`tests.test_gateway`
harness); the server-level limits (read timeout, header size and count) against a real
uvicorn on a free loopback port. The same checks against the real stack are in
test_limits_stack.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from eventing import serving
from tests.helpers import free_port, wait_port
from tests.test_gateway import Harness, binary_headers, payment, structured

BATCH = {"content-type": "application/cloudevents-batch+json"}
STRUCTURED = {"content-type": "application/cloudevents+json"}
MIB = 1_048_576


def one_mib_of_empty_objects() -> bytes:
    n = (MIB - 2) // 3
    return b"[" + b",".join([b"{}"] * n) + b"]"


def test_one_mib_batch_of_empty_objects_gets_a_short_413():
    h = Harness(max_body_bytes=MIB)
    body = one_mib_of_empty_objects()
    assert MIB - 3 <= len(body) <= MIB
    with TestClient(h.app) as client:
        r = client.post("/", content=body, headers=BATCH)
    assert r.status_code == 413
    assert r.json()["error"] == "too_many_events" and r.json()["limit"] == 10_000
    assert len(r.content) < 1000
    assert h.written == []


def test_bad_batch_lists_at_most_the_cap_and_says_how_many_it_left_out():
    h = Harness(max_body_bytes=MIB, max_errors_listed=7)
    with TestClient(h.app) as client:
        r = client.post("/", content=b"[" + b",".join([b"{}"] * 500) + b"]", headers=BATCH)
    body = r.json()
    assert r.status_code == 400
    assert [e["index"] for e in body["events"]] == list(range(7))
    assert body["events_not_listed"] == 493
    assert body["reason"].startswith("500 of 500 events are invalid")
    assert len(r.content) < 3000


def test_batch_at_the_event_cap_is_accepted_one_over_is_refused():
    h = Harness(max_body_bytes=MIB, max_batch_events=3)
    with TestClient(h.app) as client:
        r = client.post("/", content=orjson.dumps([structured(i) for i in range(3)]),
                        headers=BATCH)
        assert r.status_code == 202
        r = client.post("/", content=orjson.dumps([structured(i) for i in range(4)]),
                        headers=BATCH)
        assert r.status_code == 413 and r.json()["error"] == "too_many_events"
    assert len(h.written) == 3


def test_ce_headers_count_toward_the_body_limit():
    h = Harness(max_body_bytes=2048)
    body = orjson.dumps(payment())
    with TestClient(h.app) as client:
        r = client.post("/", content=body, headers=binary_headers(**{"ce-note": "n" * 1500}))
        assert r.status_code == 202  # 1.5 KB of headers + the body fit in 2 KB
        r = client.post("/", content=body, headers=binary_headers(**{"ce-note": "n" * 1900}))
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"
        assert "ce-* headers" in r.json()["reason"]
    assert len(h.written) == 1


def test_record_over_the_broker_message_size_is_a_permanent_413():
    h = Harness(max_body_bytes=MIB, max_record_bytes=2000)
    with TestClient(h.app) as client:
        r = client.post("/", content=orjson.dumps(payment()),
                        headers=binary_headers(**{"ce-note": "n" * 1600}))
        assert r.status_code == 413 and r.json()["error"] == "record_too_large"
        assert "retry-after" not in r.headers
        events = [structured(1), structured(2, data=payment(2, merchant_id="m" * 1800))]
        r = client.post("/", content=orjson.dumps(events), headers=BATCH)
        assert r.status_code == 413
        assert [e["index"] for e in r.json()["events"]] == [1]
    assert h.written == []


@pytest.mark.parametrize("depth", [300, 1000, 5000])
def test_deeply_nested_data_is_a_4xx_in_every_mode(depth: int):
    h = Harness(max_body_bytes=MIB)
    nested = "[" * depth + '"x"' + "]" * depth
    event = orjson.dumps(structured(1)).decode().replace(
        '"data":{', '"data":{"deep":' + nested + ",", 1)
    with TestClient(h.app) as client:
        answers = [
            client.post("/", content=event, headers=STRUCTURED),
            client.post("/", content="[" + event + "]", headers=BATCH),
            client.post("/", content=nested, headers=binary_headers()),
        ]
    for r in answers:
        assert 400 <= r.status_code < 500, r.text
        assert "retry-after" not in r.headers
    assert h.written == []


def test_client_disconnect_is_499_and_not_logged(caplog: pytest.LogCaptureFixture):
    h = Harness(max_body_bytes=MIB)
    with TestClient(h.app):  # starts the lifespan (the producer bridge)
        scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
                 "headers": [(k.encode(), v.encode()) for k, v in binary_headers().items()]}

        async def receive() -> dict[str, Any]:
            return {"type": "http.disconnect"}

        with caplog.at_level(logging.DEBUG, logger="sluice.gateway"):
            response = asyncio.run(h.gateway.ingest(Request(scope, receive)))
    assert response.status_code == 499
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    metrics = h.gateway.metrics.registry.get_sample_value(
        "sluice_gateway_request_duration_seconds_count", {"mode": "binary", "code": "499"})
    assert metrics == 1
    assert h.gateway.metrics.registry.get_sample_value(
        "sluice_gateway_request_duration_seconds_count",
        {"mode": "binary", "code": "500"}) is None


# ------------------------------------------------------------------ server limits


@pytest.fixture
def limited_server() -> Iterator[tuple[int, serving.ServerLimits]]:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"{len(await request.body())}")

    limits = serving.ServerLimits(read_timeout_s=0.5, max_headers=10, max_header_bytes=1000)
    app = Starlette(routes=[Route("/", hello, methods=["GET", "POST"])])
    port = free_port()
    server = uvicorn.Server(serving.config(app, host="127.0.0.1", port=port, limits=limits,
                                           lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_port(port)
    try:
        yield port, limits
    finally:
        server.should_exit = True
        thread.join(10)


def test_header_count_and_size_limits_answer_431(limited_server):
    port, _ = limited_server
    url = f"http://127.0.0.1:{port}/"
    assert httpx.get(url, headers={f"x-{i}": "1" for i in range(5)}).status_code == 200
    r = httpx.get(url, headers={f"x-{i}": "1" for i in range(20)})
    assert r.status_code == 431 and "more than 10 request headers" in r.json()["reason"]
    r = httpx.get(url, headers={"x-big": "a" * 2000})
    assert r.status_code == 431 and "over 1000 bytes" in r.json()["reason"]


def _closed_after(sock: socket.socket, limit_s: float) -> float:
    sock.settimeout(limit_s)
    started = time.monotonic()
    assert sock.recv(100) == b""  # the server closed it (a timeout here raises)
    return time.monotonic() - started


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: x\r\n",
                                  b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab"])
def test_slow_or_silent_clients_are_cut_off(limited_server, sent: bytes):
    port, limits = limited_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(sent)
        assert _closed_after(sock, 10 * limits.read_timeout_s) >= 0


def test_a_slow_request_that_completes_in_time_is_served(limited_server):
    port, limits = limited_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
        time.sleep(limits.read_timeout_s / 4)
        sock.sendall(b"cd")
        sock.settimeout(5)
        assert sock.recv(1000).startswith(b"HTTP/1.1 200")


# ------------------------------------------------------------------ registry


@pytest.fixture
def registry() -> Iterator[TestClient]:
    from eventing.registry import MemoryLog, SchemaStore, create_app

    with TestClient(create_app(SchemaStore(MemoryLog())), raise_server_exceptions=False) as c:
        yield c


REGISTRY_JSON = {"content-type": "application/vnd.schemaregistry.v1+json"}


def test_registry_refuses_an_oversized_body_with_413(registry: TestClient):
    from eventing.registry.app import MAX_BODY_BYTES

    big = json.dumps({"schema": json.dumps({"type": "enum", "name": "E", "symbols": [
        f"S{i}" for i in range(MAX_BODY_BYTES // 6)]})})
    assert len(big) > MAX_BODY_BYTES
    r = registry.post("/subjects/big-value/versions", content=big, headers=REGISTRY_JSON)
    assert r.status_code == 413 and r.json()["error_code"] == 413
    assert registry.get("/subjects").json() == []


def test_registry_answers_422_for_a_deeply_nested_body(registry: TestClient):
    deep_body = "[" * 5000 + "]" * 5000
    r = registry.post("/subjects/deep-value/versions", content=deep_body, headers=REGISTRY_JSON)
    assert r.status_code == 422 and r.json()["error_code"] == 42201


def _nested_schema_text(depth: int) -> str:
    """A record schema nested `depth` deep, written as text (json.dumps would recurse)."""
    head = "".join(f'{{"type":"record","name":"R{i}","fields":[{{"name":"f","type":'
                   for i in range(depth))
    return head + '"string"' + "}]}" * depth


def test_registry_1000_deep_schema_is_422_not_500(registry: TestClient):
    body = '{"schema": ' + json.dumps(_nested_schema_text(1000)) + "}"
    r = registry.post("/subjects/deep-value/versions", content=body, headers=REGISTRY_JSON)
    assert r.status_code == 422 and r.json()["error_code"] == 42201, r.text


@pytest.mark.parametrize("version", [" 1", "1 ", "+1", "١", "１", "0x1", "1_0", "2147483648"])
def test_registry_version_parsing_is_strict(version: str):
    from eventing.registry import RegistryError
    from eventing.registry.store import parse_version

    with pytest.raises(RegistryError) as exc:
        parse_version(version)
    assert exc.value.error_code == 42202


def test_registry_version_parsing_accepts_the_valid_forms():
    from eventing.registry.store import parse_version

    assert [parse_version(v) for v in ("1", "42", "latest", "-1", 7)] == [1, 42, None, None, 7]


# ------------------------------------------------------------------ real-time server

SQL_ESCAPES = [
    "SELECT * FROM glob('s3://warehouse/**')",
    "SELECT * FROM read_text('http://127.0.0.1:9/')",
    "SELECT * FROM read_parquet('s3://tansu/**/*.parquet')",
    "SELECT * FROM 's3://warehouse/x.parquet'",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM query_table('payments_scored_rt')",
    "SELECT * FROM duckdb_secrets()",
    "SELECT current_setting('s3_secret_access_key')",
    "SELECT * FROM information_schema.tables",
    "SELECT (SELECT count(*) FROM read_blob('http://127.0.0.1:9/x'))",
]


@pytest.fixture
def rt_table() -> Any:
    from tests.test_realtime import table as make_table

    return make_table.__wrapped__()  # type: ignore[attr-defined]


@pytest.mark.parametrize("engine", ["trino", "duckdb"])
def test_sql_escapes_are_refused_over_http(rt_table: Any, engine: str):
    from eventing.tables.realtime import create_app

    with TestClient(create_app(rt_table)) as client:
        for sql in SQL_ESCAPES:
            r = client.post("/query", json={"sql": sql, "engine": engine})
            assert r.status_code in (400, 422), (sql, r.text)
            assert r.json()["error"] in ("refused", "invalid query"), (sql, r.text)
        ok = client.post("/query", json={"sql": "SELECT count(*) AS n FROM payments_scored_rt "
                                         "CROSS JOIN UNNEST([1, 2]) AS u(x)", "engine": engine})
        assert ok.status_code == 200, ok.text
        assert ok.json()["rows"] == [[0]]


def test_query_needs_json_content_type_and_the_token(rt_table: Any):
    from eventing.tables.realtime import create_app

    body = orjson.dumps({"sql": "SELECT 1 AS one"})
    with TestClient(create_app(rt_table, token="q-t0ken")) as client:
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            r = client.post("/query", content=body, headers={"content-type": ctype,
                                                             "authorization": "Bearer q-t0ken"})
            assert r.status_code == 415, ctype
        r = client.post("/query", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        r = client.post("/query", content=body, headers={"content-type": "application/json",
                                                         "authorization": "Bearer nope"})
        assert r.status_code == 401 and "q-t0ken" not in r.text
        r = client.post("/query", content=body, headers={
            "content-type": "application/json; charset=utf-8", "authorization": "Bearer q-t0ken"})
        assert r.status_code == 200 and r.json()["rows"] == [[1]]


def test_max_rows_is_bounded_and_a_cut_is_reported(rt_table: Any):
    from eventing.tables.realtime import create_app

    sql = "SELECT x FROM UNNEST(range(50)) AS t(x)"
    with TestClient(create_app(rt_table)) as client:
        for bad in (0, -1, "5", 10**9, 1.5):
            r = client.post("/query", json={"sql": sql, "engine": "duckdb", "max_rows": bad})
            assert r.status_code == 400, bad
        r = client.post("/query", json={"sql": sql, "engine": "duckdb", "max_rows": 20})
        assert r.status_code == 200
        assert len(r.json()["rows"]) == 20 and r.json()["truncated"] is True


# ------------------------------------------------------------------ tokens from env


def test_env_tokens_reach_the_parts_through_their_environment_only(tmp_path, monkeypatch):
    from eventing.cli import build_parser
    from eventing.cli.edge import Edge
    from eventing.stack import pipeline, realtime

    monkeypatch.setenv("SLUICE_GATEWAY_TOKEN", "gw-secret-1")
    monkeypatch.setenv("SLUICE_QUERY_TOKEN", "q-secret-2")
    args = build_parser().parse_args(["--state-dir", str(tmp_path), "up", "--no-generator"])
    settings = Edge(args).settings
    assert settings.gateway_requires_token
    for spec, name, secret in [
        (pipeline.gateway_spec(settings), "SLUICE_GATEWAY_TOKEN", "gw-secret-1"),
        (pipeline.generator_spec(settings), "SLUICE_GATEWAY_TOKEN", "gw-secret-1"),
        (realtime.spec(settings), "SLUICE_QUERY_TOKEN", "q-secret-2"),
    ]:
        assert spec.env[name] == secret
        assert secret not in " ".join(spec.argv)
    assert "secret" not in repr(settings)
    settings.save()
    assert "secret" not in settings.settings_file.read_text()
    monkeypatch.delenv("SLUICE_GATEWAY_TOKEN")
    plain = Edge(build_parser().parse_args(["--state-dir", str(tmp_path), "up"])).settings
    assert not plain.gateway_requires_token
    assert "SLUICE_GATEWAY_TOKEN" not in pipeline.gateway_spec(plain).env


def test_gateway_refuses_to_start_with_an_empty_token_file(tmp_path, monkeypatch, capsys):
    from eventing.cli import main

    empty = tmp_path / "token"
    empty.write_text("\n")
    monkeypatch.setenv("SLUICE_GATEWAY_TOKEN_FILE", str(empty))
    code = main(["--state-dir", str(tmp_path / "state"), "gateway", "--port", "1"])
    assert code != 0
    assert "is empty" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["delivery", "produce"])
def test_broker_size_refusal_is_a_permanent_413_not_a_503(where: str):
    from confluent_kafka import KafkaError, KafkaException

    h = Harness(max_body_bytes=MIB)
    with TestClient(h.app) as client:
        assert h.producer is not None
        if where == "delivery":
            h.producer.error = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
        else:
            h.producer.raise_on_produce = KafkaException(
                KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        r = client.post("/", content=orjson.dumps(payment()), headers=binary_headers())
    assert r.status_code == 413 and r.json()["error"] == "record_too_large"
    assert "retry-after" not in r.headers
