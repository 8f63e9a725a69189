"""The registry HTTP API (eventing.registry.app) over an in-memory store.

The first part drives the routes through Starlette's TestClient; the second runs the app
under uvicorn on a free local port and uses confluent-kafka's own `SchemaRegistryClient`,
so the exact requests the real client sends (query spellings, bodies) are exercised.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from eventing.registry import MemoryLog, RegistryError, SchemaStore, create_app
from tests.helpers import free_port

CT = {"Content-Type": "application/vnd.schemaregistry.v1+json"}


def rec(*fields: dict[str, Any], name: str = "Payment") -> str:
    return json.dumps({"type": "record", "name": name, "namespace": "t", "fields": list(fields)})


A = {"name": "a", "type": "int"}
B_DEFAULT = {"name": "b", "type": "string", "default": ""}
B_REQUIRED = {"name": "b", "type": "string"}
V1 = rec(A)
V2 = rec(A, B_DEFAULT)
V3 = rec(A, B_REQUIRED)


@pytest.fixture()
def log() -> MemoryLog:
    return MemoryLog()


@pytest.fixture()
def client(log: MemoryLog) -> TestClient:
    return TestClient(create_app(SchemaStore(log)))


def register(client: TestClient, subject: str, schema: str, **body: Any) -> Any:
    return client.post(f"/subjects/{subject}/versions", json={"schema": schema, **body},
                       headers=CT)


def error_code(response: Any) -> int:
    return response.json()["error_code"]


def test_root_and_types(client: TestClient) -> None:
    r = client.get("/")
    assert r.json() == {}
    assert r.headers["content-type"] == "application/vnd.schemaregistry.v1+json"
    assert client.get("/schemas/types").json() == ["AVRO"]


def test_register_and_read_back(client: TestClient) -> None:
    r = register(client, "pay-value", V1)
    assert r.status_code == 200
    assert r.json()["id"] == 1 and r.json()["version"] == 1
    spaced = json.dumps(json.loads(V1), indent=4)
    assert register(client, "pay-value", spaced).json()["id"] == 1  # same schema, same id
    assert client.get("/subjects/pay-value/versions").json() == [1]
    assert register(client, "other-value", V1).json() == {**r.json(), "version": 1}

    by_id = client.get("/schemas/ids/1").json()
    assert json.loads(by_id["schema"]) == json.loads(V1)
    assert json.loads(client.get("/schemas/ids/1/schema").text) == json.loads(V1)
    assert client.get("/schemas/ids/1/subjects").json() == ["other-value", "pay-value"]
    assert client.get("/schemas/ids/1/versions").json() == [
        {"subject": "other-value", "version": 1}, {"subject": "pay-value", "version": 1}]
    assert client.get(f"/schemas/guids/{by_id['guid']}").json()["id"] == 1
    assert client.get("/subjects").json() == ["other-value", "pay-value"]
    assert client.get("/subjects?subjectPrefix=pay").json() == ["pay-value"]

    v2 = register(client, "pay-value", V2).json()
    assert (v2["id"], v2["version"]) == (2, 2)
    latest = client.get("/subjects/pay-value/versions/latest").json()
    assert (latest["id"], latest["version"], latest["subject"]) == (2, 2, "pay-value")
    assert client.get("/subjects/pay-value/versions/-1").json() == latest
    assert client.get("/subjects/pay-value/versions/1").json()["id"] == 1
    assert json.loads(client.get("/subjects/pay-value/versions/2/schema").text) == json.loads(V2)
    assert [s["version"] for s in client.get("/schemas").json()] == [1, 1, 2]
    assert len(client.get("/schemas?latestOnly=true").json()) == 2


def test_not_found_and_invalid_version_codes(client: TestClient) -> None:
    assert error_code(client.get("/subjects/nope/versions")) == 40401
    assert client.get("/subjects/nope/versions").status_code == 404
    register(client, "s", V1)
    assert error_code(client.get("/subjects/s/versions/7")) == 40402
    for bad in ("0", "-2", "abc", str(2**31)):
        r = client.get(f"/subjects/s/versions/{bad}")
        assert (r.status_code, error_code(r)) == (422, 42202), bad
    assert error_code(client.get("/schemas/ids/99")) == 40403
    assert error_code(client.get("/schemas/ids/99/subjects")) == 40403
    assert client.get("/no/such/route").status_code == 404


def test_lookup(client: TestClient) -> None:
    register(client, "s", V1)
    found = client.post("/subjects/s", json={"schema": V1}, headers=CT).json()
    assert (found["id"], found["version"], found["subject"]) == (1, 1, "s")
    assert error_code(client.post("/subjects/s", json={"schema": V2}, headers=CT)) == 40403
    assert error_code(client.post("/subjects/x", json={"schema": V1}, headers=CT)) == 40401


def test_normalize_matches_equivalent_names(client: TestClient) -> None:
    qualified = json.dumps({"type": "record", "name": "t.Payment", "fields": [A]})
    register(client, "s", V1)
    assert error_code(client.post("/subjects/s", json={"schema": qualified}, headers=CT)) \
        == 40403
    r = client.post("/subjects/s?normalize=true", json={"schema": qualified}, headers=CT)
    assert r.json()["version"] == 1
    assert register(client, "s", qualified, ).json()["version"] == 2  # textually different
    r = client.post("/subjects/s/versions?normalize=true", json={"schema": V1}, headers=CT)
    assert r.json()["version"] == 2  # equal after normalisation: no new version


def test_incompatible_registration_is_refused_with_reasons(client: TestClient) -> None:
    register(client, "s", V1)
    r = register(client, "s", V3)
    assert r.status_code == 409 and error_code(r) == 409
    assert "READER_FIELD_MISSING_DEFAULT_VALUE" in r.json()["message"]
    assert "'b'" in r.json()["message"]
    assert client.get("/subjects/s/versions").json() == [1]


def test_compatibility_endpoints(client: TestClient) -> None:
    url = "/compatibility/subjects/s/versions/latest"
    assert client.post(url, json={"schema": V3}, headers=CT).json()["is_compatible"] is True
    register(client, "s", V1)
    register(client, "s", V2)
    r = client.post(url + "?verbose=true", json={"schema": V3}, headers=CT).json()
    assert r == {"is_compatible": True, "messages": []}
    r = client.post("/compatibility/subjects/s/versions/1?verbose=true", json={"schema": V3},
                    headers=CT).json()
    assert r["is_compatible"] is False
    assert any("READER_FIELD_MISSING_DEFAULT_VALUE" in m for m in r["messages"])
    assert "messages" not in client.post(url, json={"schema": V3}, headers=CT).json()
    # all versions: non-transitive only looks at the latest, transitive at all
    all_url = "/compatibility/subjects/s/versions?verbose=true"
    assert client.post(all_url, json={"schema": V3}, headers=CT).json()["is_compatible"]
    client.put("/config/s", json={"compatibility": "BACKWARD_TRANSITIVE"}, headers=CT)
    assert not client.post(all_url, json={"schema": V3}, headers=CT).json()["is_compatible"]
    assert error_code(register(client, "s", V3)) == 409
    assert error_code(client.post("/compatibility/subjects/s/versions/9", json={"schema": V3},
                                  headers=CT)) == 40402


def test_config(client: TestClient) -> None:
    assert client.get("/config").json() == {"compatibilityLevel": "BACKWARD"}
    r = client.put("/config", json={"compatibility": "FULL"}, headers=CT)
    assert r.json() == {"compatibility": "FULL"}
    assert client.get("/config").json() == {"compatibilityLevel": "FULL"}
    assert error_code(client.get("/config/s")) == 40408
    assert client.get("/config/s?defaultToGlobal=true").json() == {"compatibilityLevel": "FULL"}
    client.put("/config/s", json={"compatibility": "NONE"}, headers=CT)
    assert client.get("/config/s").json() == {"compatibilityLevel": "NONE"}
    register(client, "s", V1)
    assert register(client, "s", rec({"name": "z", "type": "bytes"})).status_code == 200
    r = client.put("/config/s", json={"compatibility": "SOMETIMES"}, headers=CT)
    assert (r.status_code, error_code(r)) == (422, 42203)
    assert client.delete("/config/s").json() == {"compatibilityLevel": "NONE"}
    assert client.get("/config/s?defaultToGlobal=true").json() == {"compatibilityLevel": "FULL"}
    assert client.delete("/config").json() == {"compatibilityLevel": "FULL"}
    assert client.get("/config").json() == {"compatibilityLevel": "BACKWARD"}


def test_soft_and_hard_delete_of_versions(client: TestClient) -> None:
    register(client, "s", V1)
    register(client, "s", V2)
    assert error_code(client.delete("/subjects/s/versions/1?permanent=true")) == 40407
    assert client.delete("/subjects/s/versions/1").json() == 1
    assert error_code(client.delete("/subjects/s/versions/1")) == 40406
    assert client.get("/subjects/s/versions").json() == [2]
    assert client.get("/subjects/s/versions?deleted=true").json() == [1, 2]
    assert client.get("/subjects/s/versions?deleted_only=true").json() == [1]
    assert error_code(client.get("/subjects/s/versions/1")) == 40402
    assert client.get("/subjects/s/versions/1?deleted=true").json()["id"] == 1
    assert client.get("/schemas/ids/1").status_code == 200  # old data stays readable
    assert client.get("/schemas/ids/1/subjects").json() == []
    assert client.get("/schemas/ids/1/subjects?deleted=true").json() == ["s"]
    assert client.delete("/subjects/s/versions/1?permanent=true").json() == 1
    assert error_code(client.get("/schemas/ids/1")) == 40403
    assert error_code(client.delete("/subjects/s/versions/1")) == 40402
    # a soft-deleted schema registered again gets a new version and keeps its id
    client.delete("/subjects/s/versions/2")
    again = register(client, "s", V2).json()
    assert (again["id"], again["version"]) == (2, 3)


def test_soft_and_hard_delete_of_subjects(client: TestClient) -> None:
    register(client, "s", V1)
    register(client, "s", V2)
    client.put("/config/s", json={"compatibility": "NONE"}, headers=CT)
    assert error_code(client.delete("/subjects/s?permanent=true")) == 40405
    assert client.delete("/subjects/s").json() == [1, 2]
    assert error_code(client.delete("/subjects/s")) == 40404
    assert client.get("/subjects").json() == []
    assert client.get("/subjects?deleted=true").json() == ["s"]
    assert client.get("/subjects?deleted_only=true").json() == ["s"]
    assert error_code(client.get("/subjects/s/versions")) == 40401
    assert client.get("/subjects/s/versions?deleted=true").json() == [1, 2]
    assert error_code(client.post("/subjects/s", json={"schema": V1}, headers=CT)) == 40401
    found = client.post("/subjects/s?deleted=true", json={"schema": V1}, headers=CT).json()
    assert found["version"] == 1
    assert client.delete("/subjects/s?permanent=true").json() == [1, 2]
    assert client.get("/subjects?deleted=true").json() == []
    assert error_code(client.get("/config/s")) == 40408  # config went with the subject
    assert error_code(client.delete("/subjects/s")) == 40401
    assert register(client, "s", V3).json()["version"] == 1  # a fresh subject


def test_only_avro_is_accepted(client: TestClient) -> None:
    for kind in ("PROTOBUF", "JSON"):
        r = register(client, "s", 'syntax = "proto3";', schemaType=kind)
        assert (r.status_code, error_code(r)) == (422, 42201)
        assert "AVRO" in r.json()["message"]
    assert register(client, "s", V1, schemaType="AVRO").status_code == 200


def test_invalid_schema_reports_parser_reason(client: TestClient) -> None:
    bad = json.dumps({"type": "record", "name": "R",
                      "fields": [{"name": "a", "type": "int", "default": "x"}]})
    r = register(client, "s", bad)
    assert (r.status_code, error_code(r)) == (422, 42201)
    assert "Default value" in r.json()["message"]
    assert error_code(client.post("/subjects/s/versions", json={}, headers=CT)) == 42201
    assert error_code(register(client, "s", V1, ruleSet={"domainRules": [{"name": "x"}]})) \
        == 42201


def test_references(client: TestClient) -> None:
    money = json.dumps({"type": "record", "name": "Money", "namespace": "m",
                        "fields": [{"name": "cents", "type": "long"}]})
    register(client, "money", money)
    payment = json.dumps({"type": "record", "name": "Payment",
                          "fields": [{"name": "amount", "type": "m.Money"}]})
    refs = [{"name": "m.Money", "subject": "money", "version": 1}]
    assert error_code(register(client, "pay", payment)) == 42201  # unknown type without ref
    r = register(client, "pay", payment, references=refs)
    assert r.status_code == 200
    assert client.get(f"/schemas/ids/{r.json()['id']}").json()["references"] == refs
    assert client.get("/subjects/pay/versions/1").json()["references"] == refs
    assert client.get("/subjects/money/versions/1/referencedby").json() == [r.json()["id"]]
    assert error_code(client.delete("/subjects/money/versions/1")) == 42206
    bad_ref = [{"name": "m.Money", "subject": "money", "version": 5}]
    assert error_code(register(client, "pay2", payment, references=bad_ref)) == 42201


def test_content_types(client: TestClient) -> None:
    body = json.dumps({"schema": V1})
    for ctype in ("application/json", "application/octet-stream",
                  "application/vnd.schemaregistry+json"):
        r = client.post("/subjects/s/versions", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, ctype
    r = client.post("/subjects/s/versions", content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    r = client.post("/subjects/s/versions", content="{nope", headers=CT)
    assert r.status_code == 400


def test_mode_and_contexts(client: TestClient) -> None:
    assert client.get("/mode").json() == {"mode": "READWRITE"}
    assert client.put("/mode", json={"mode": "READWRITE"}, headers=CT).status_code == 200
    assert error_code(client.put("/mode", json={"mode": "IMPORT"}, headers=CT)) == 42204
    assert client.get("/mode/s").json() == {"mode": "READWRITE"}
    assert client.get("/contexts").json() == ["."]


def test_subject_with_encoded_slash(client: TestClient) -> None:
    assert register(client, "a%2Fb", V1).status_code == 200
    assert client.get("/subjects").json() == ["a/b"]
    assert client.get("/subjects/a%2Fb/versions/1").json()["subject"] == "a/b"


def test_store_failure_leaves_state_unchanged(log: MemoryLog, client: TestClient) -> None:
    register(client, "s", V1)
    log.fail_with = RegistryError(500, 50001, "Error in the backend data store: boom")
    r = register(client, "s", V2)
    assert (r.status_code, error_code(r)) == (500, 50001)
    assert client.get("/subjects/s/versions").json() == [1]
    assert register(client, "s", V2).json()["id"] == 2  # the id was not burnt either


def test_replaying_the_log_restores_everything(log: MemoryLog, client: TestClient) -> None:
    register(client, "s", V1)
    register(client, "s", V2)
    register(client, "t", V1)
    client.put("/config/t", json={"compatibility": "NONE"}, headers=CT)
    client.put("/config", json={"compatibility": "FULL"}, headers=CT)
    client.delete("/subjects/s/versions/1")
    client.delete("/subjects/s/versions/1?permanent=true")
    client.delete("/subjects/t")
    fresh = TestClient(create_app(SchemaStore(MemoryLog(log.records))))
    for url in ("/subjects?deleted=true", "/subjects/s/versions?deleted=true",
                "/subjects/t/versions?deleted=true", "/config",
                "/config/t", "/schemas/ids/2", "/schemas/ids/1"):
        assert fresh.get(url).json() == client.get(url).json(), url
    assert register(fresh, "u", V3).json()["id"] == 3  # ids continue after replay


def test_concurrent_registrations_get_unique_ids() -> None:
    from concurrent.futures import ThreadPoolExecutor

    store = SchemaStore(MemoryLog())
    schemas = [rec({"name": f"f{i}", "type": "int"}, name=f"R{i}") for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: store.register(f"subj-{i}", schemas[i]).id, range(40)))
    assert sorted(ids) == list(range(1, 41))


# ---- confluent-kafka's SchemaRegistryClient against the app under uvicorn ---------------


@pytest.fixture()
def registry_url() -> Iterator[str]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        create_app(SchemaStore(MemoryLog())), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "registry did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_confluent_client_end_to_end(registry_url: str) -> None:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    sr = SchemaRegistryClient({"url": registry_url})
    assert sr.get_schema_types() == ["AVRO"]
    sid = sr.register_schema("pay-value", Schema(V1, "AVRO"))
    assert sr.get_schema(sid).schema_str is not None
    assert sr.lookup_schema("pay-value", Schema(V1, "AVRO")).version == 1
    assert sr.test_compatibility("pay-value", Schema(V2, "AVRO")) is True
    assert sr.test_compatibility("pay-value", Schema(V3, "AVRO"), verbose=True) is False
    assert sr.test_compatibility_all_versions("pay-value", Schema(V2, "AVRO")) is True
    sid2 = sr.register_schema("pay-value", Schema(V2, "AVRO"))
    assert sr.get_latest_version("pay-value").schema_id == sid2
    assert sr.get_version("pay-value", 1).schema_id == sid
    assert sr.get_versions("pay-value") == [1, 2]
    assert sr.get_subjects() == ["pay-value"]
    assert sr.get_subjects_by_schema_id(sid) == ["pay-value"]
    assert [(v.subject, v.version) for v in sr.get_schema_versions(sid2)] == [("pay-value", 2)]
    assert sr.get_referenced_by("pay-value", 1) == []
    with pytest.raises(SchemaRegistryError) as exc:
        sr.register_schema("pay-value", Schema(rec({"name": "a", "type": "string"}), "AVRO"))
    assert exc.value.http_status_code == 409
    with pytest.raises(SchemaRegistryError) as exc:
        sr.register_schema("p", Schema("syntax = 'proto3';", "PROTOBUF"))
    assert exc.value.error_code == 42201

    assert sr.set_compatibility("pay-value", "FULL") == {"compatibility": "FULL"}
    assert sr.get_compatibility("pay-value") == "FULL"
    assert str(sr.get_config("pay-value").compatibility_level) == "FULL"
    assert str(sr.delete_config("pay-value").compatibility_level) == "FULL"
    assert sr.get_compatibility() == "BACKWARD"
    assert sr.get_global_mode() == "READWRITE"
    assert sr.get_mode("pay-value") == "READWRITE"

    assert sr.delete_version("pay-value", 1) == 1
    assert sr.get_versions("pay-value", deleted=True) == [1, 2]
    fresh = SchemaRegistryClient({"url": registry_url})  # no client-side cache
    with pytest.raises(SchemaRegistryError) as exc:
        fresh.lookup_schema("pay-value", Schema(V1, "AVRO"))
    assert exc.value.error_code == 40403
    assert fresh.lookup_schema("pay-value", Schema(V1, "AVRO"), deleted=True).version == 1
    assert sr.delete_version("pay-value", 1, permanent=True) == 1
    assert sr.delete_subject("pay-value") == [2]
    assert sr.get_subjects(deleted=True) == ["pay-value"]
    assert sr.delete_subject("pay-value", permanent=True) == [2]
    with pytest.raises(SchemaRegistryError) as exc:
        sr.get_versions("pay-value")
    assert exc.value.error_code == 40401
