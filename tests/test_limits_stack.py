"""Security and input limits against the real stack (issue 12, point 5 and the query
surface): the gateway part as `sluice up` specs it, the real-time server, the registry,
the object store's filer and Prometheus, all on the session stack's shifted ports."""

from __future__ import annotations

import dataclasses
import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from eventing.stack import pipeline as pipeline_parts
from eventing.stack.process import ProcessDir, wait_healthy
from eventing.stack.settings import StackSettings
from tests.helpers import free_port
from tests.test_limits import SQL_ESCAPES, one_mib_of_empty_objects

pytestmark = pytest.mark.stack

BATCH = {"content-type": "application/cloudevents-batch+json"}


def _gateway_settings(stack: StackSettings, tmp: Path, token: str | None) -> StackSettings:
    """The session stack's settings with a state folder and gateway port of our own."""
    ports = dataclasses.replace(stack.ports, gateway=free_port())
    return dataclasses.replace(stack, state_dir=tmp, ports=ports, gateway_token=token)


@pytest.fixture
def token_gateway(stack: StackSettings, tmp_path: Path) -> Iterator[tuple[StackSettings, str]]:
    """A gateway started from `pipeline.gateway_spec` (what `sluice up` runs) with the
    token that `SLUICE_GATEWAY_TOKEN=... sluice up` puts in the stack settings."""
    token = "env-token-" + uuid.uuid4().hex
    settings = _gateway_settings(stack, tmp_path, token)
    spec = pipeline_parts.gateway_spec(settings)
    procs = ProcessDir(tmp_path)
    record = procs.start(spec)
    try:
        problem = wait_healthy(spec, record, timeout=60)
        assert problem is None, (problem, Path(record.log).read_text()[-2000:])
        yield settings, token
    finally:
        procs.stop(record, timeout=10)


def test_env_token_reaches_the_gateway_and_it_answers_401_without_it(token_gateway):
    settings, token = token_gateway
    spec = pipeline_parts.gateway_spec(settings)
    assert token not in " ".join(spec.argv)  # env, never a flag (`ps` shows flags)
    event = {"specversion": "1.0", "id": uuid.uuid4().hex, "source": "/limits-test",
             "type": "com.sluice.payment.created", "data": {
                 "payment_id": "p1", "card_id": "c1", "merchant_id": "m1", "amount": 1.5,
                 "currency": "EUR", "country": "DE", "event_time": int(time.time() * 1000)}}
    body = orjson.dumps(event)
    headers = {"content-type": "application/cloudevents+json"}
    r = httpx.post(settings.gateway_url, content=body, headers=headers, timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = httpx.post(settings.gateway_url, content=body, timeout=10,
                   headers=headers | {"authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = httpx.post(settings.gateway_url, content=body, timeout=10,
                   headers=headers | {"authorization": f"Bearer {token}"})
    assert r.status_code == 202, r.text
    assert pipeline_parts.gateway_healthy(settings)


def test_a_gateway_without_the_configured_token_is_not_healthy(stack, tmp_path: Path):
    """The fail-open case: a token is configured but the gateway runs without one
    (started before the token was set). `up` refuses it instead of reporting it up."""
    open_settings = _gateway_settings(stack, tmp_path, None)
    spec = pipeline_parts.gateway_spec(open_settings)
    procs = ProcessDir(tmp_path)
    record = procs.start(spec)
    try:
        assert wait_healthy(spec, record, timeout=60) is None
        guarded = dataclasses.replace(open_settings, gateway_token="a-token")
        assert not pipeline_parts.gateway_refuses_anonymous(guarded)
        assert not pipeline_parts.gateway_healthy(guarded)
    finally:
        procs.stop(record, timeout=10)


def test_one_mib_batch_of_empty_objects_is_a_short_4xx(pipeline: StackSettings):
    body = one_mib_of_empty_objects()
    r = httpx.post(pipeline.gateway_url, content=body, headers=BATCH, timeout=30)
    assert 400 <= r.status_code < 500
    assert r.json()["error"] == "too_many_events"
    assert len(r.content) < 1000


def test_gateway_closes_a_slowloris_connection(pipeline: StackSettings):
    from eventing.serving import ServerLimits

    limit = ServerLimits().read_timeout_s
    with socket.create_connection((pipeline.host, pipeline.ports.gateway)) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")  # and then nothing more
        sock.settimeout(limit * 3)
        started = time.monotonic()
        assert sock.recv(100) == b""
        assert time.monotonic() - started >= limit * 0.5


def test_oversized_headers_are_431_at_the_gateway(pipeline: StackSettings):
    r = httpx.post(pipeline.gateway_url, content=b"{}", timeout=10,
                   headers={"content-type": "application/json", "ce-big": "x" * 100_000})
    assert r.status_code == 431
    r = httpx.post(pipeline.gateway_url, content=b"{}", timeout=10,
                   headers={"content-type": "application/json",
                            **{f"ce-x{i}": "1" for i in range(500)}})
    assert r.status_code == 431


@pytest.mark.parametrize("engine", ["trino", "duckdb"])
def test_sql_escapes_are_refused_by_the_real_server(stack: StackSettings, engine: str):
    url = stack.realtime_url + "/query"
    for sql in SQL_ESCAPES:
        r = httpx.post(url, json={"sql": sql, "engine": engine}, timeout=30)
        assert r.status_code in (400, 422), (sql, r.text)
        assert "rows" not in r.json()  # nothing was listed or read
    r = httpx.post(url, json={"sql": "SELECT count(*) FROM payments_scored_rt",
                              "engine": engine}, timeout=30)
    assert r.status_code == 200, r.text


def test_query_needs_a_json_content_type(stack: StackSettings):
    r = httpx.post(stack.realtime_url + "/query", timeout=10,
                   content=json.dumps({"sql": "SELECT 1"}), headers={"content-type":
                                                                     "text/plain"})
    assert r.status_code == 415


def test_filer_needs_a_signature_and_prometheus_has_no_admin_api(stack: StackSettings):
    filer = f"http://{stack.host}:{stack.ports.weed_filer}"
    assert httpx.get(filer + "/buckets/", headers={"Accept": "application/json"},
                     timeout=10).status_code == 401
    assert httpx.put(filer + f"/buckets/{stack.broker_bucket}/x.txt", content=b"x",
                     timeout=10).status_code == 401
    assert httpx.delete(filer + f"/buckets/{stack.broker_bucket}/",
                        timeout=10).status_code == 401
    prom = stack.prometheus_url
    assert httpx.post(prom + "/-/quit", timeout=10).status_code in (403, 404)
    assert httpx.post(prom + "/-/reload", timeout=10).status_code in (403, 404)
    assert httpx.post(prom + "/api/v1/write", content=b"x", timeout=10).status_code in (
        403, 404)
    assert httpx.get(prom + "/-/ready", timeout=10).status_code == 200


def test_registry_limits(stack: StackSettings):
    url = stack.registry_url
    headers = {"content-type": "application/vnd.schemaregistry.v1+json"}
    r = httpx.post(url + "/subjects/limits-big-value/versions", timeout=30, headers=headers,
                   content=b'{"schema": "' + b"x" * 2_000_000 + b'"}')
    assert r.status_code == 413
    head = "".join(f'{{"type":"record","name":"R{i}","fields":[{{"name":"f","type":'
                   for i in range(1000))
    deep = head + '"string"' + "}]}" * 1000
    r = httpx.post(url + "/subjects/limits-deep-value/versions", timeout=30,
                   headers=headers, content=json.dumps({"schema": deep}))
    assert r.status_code == 422 and r.json()["error_code"] == 42201
    for version in ("%201", "%D9%A1"):  # " 1" and an Arabic-Indic one
        r = httpx.get(url + f"/subjects/payments.raw-value/versions/{version}", timeout=10)
        assert r.status_code == 422 and r.json()["error_code"] == 42202, version
    assert httpx.get(url + "/subjects/payments.raw-value/versions/1",
                     timeout=10).status_code == 200
