"""tail, deadletters, replay, schemas and query output against the real stack.

Each test uses topics and subjects of its own on the session stack, and drives the CLI as
a user does (`tests.helpers.sluice`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from eventing.cloudevent import event as ce_event
from eventing.cloudevent import kafka as ce_kafka
from eventing.kafka import ensure_topics, producer_config
from eventing.serde import AvroSerde
from tests.helpers import ROOT, sluice, unique
from tests.pipeline import consume_all, payment, payment_record, register

pytestmark = [pytest.mark.stack, pytest.mark.timeout(300)]


def cli(stack, *args: str, check: bool = False, **kw):
    offset = stack.ports.broker - 9092
    return sluice(*args, state_dir=stack.state_dir, offset=offset, check=check, **kw)


def _produce(bootstrap: str, topic: str, records: list[tuple], **kw) -> None:
    producer = Producer(producer_config(bootstrap))
    for key, value, headers, *ts in records:
        producer.produce(topic, value, key, headers=headers,
                         **({"timestamp": ts[0]} if ts else {}), **kw)
    assert producer.flush(30) == 0


def _json_event(event_id: str, data: dict, etype: str = "t.test") -> tuple:
    event = ce_event.make_event({"specversion": "1.0", "id": event_id, "source": "/tests",
                                 "type": etype, "datacontenttype": "application/json"},
                                json.dumps(data).encode())
    return ce_kafka.to_binary(event)


# --------------------------------------------------------------------------- tail


def test_tail_prints_decoded_events_and_filters(stack) -> None:
    topic = unique("tail.")
    ensure_topics(stack.bootstrap, {topic: 2})
    register(stack.registry_url, topic, "payments.raw.avsc")
    serde = AvroSerde(stack.registry_url)
    payments = [payment(i, card=i % 2) for i in range(4)]
    _produce(stack.bootstrap, topic, [payment_record(serde, topic, p) for p in payments])
    proc = cli(stack, "tail", topic, "--from-beginning", "-n", "4", "--timeout", "30",
               "-o", "json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["id"] for r in rows) == [p["payment_id"] for p in payments]
    by_id = {r["id"]: r for r in rows}
    assert by_id["p-1"]["data"] == payments[1]  # Avro decoded through the registry
    assert by_id["p-1"]["key"] == "card-1" and by_id["p-1"]["topic"] == topic
    proc = cli(stack, "tail", topic, "--from-beginning", "-n", "2", "--timeout", "30",
               "--filter", "data.card_id=card-1", "-o", "json")
    assert sorted(json.loads(x)["id"] for x in proc.stdout.splitlines()) == ["p-1", "p-3"]
    proc = cli(stack, "tail", topic, "--from-beginning", "-n", "1", "--timeout", "30")
    assert "type=com.sluice.payment.created" in proc.stdout and '"card_id"' in proc.stdout


def test_tail_follows_new_events_only_by_default(stack) -> None:
    import subprocess
    import sys

    topic = unique("tail.live.")
    ensure_topics(stack.bootstrap, {topic: 1})
    _produce(stack.bootstrap, topic, [_json_event("old", {"n": 0})])
    offset = stack.ports.broker - 9092
    proc = subprocess.Popen(
        [sys.executable, "-m", "eventing.cli", "--state-dir", str(stack.state_dir),
         "--port-offset", str(offset), "tail", topic, "-n", "1", "--timeout", "60",
         "-o", "json"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "new events only" in proc.stderr.readline()  # its start offsets are fixed
        _produce(stack.bootstrap, topic, [_json_event("new", {"n": 1})])
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    [row] = [json.loads(line) for line in out.splitlines()]
    assert row["id"] == "new" and row["data"] == {"n": 1}


def test_tail_of_a_missing_topic_names_it(stack) -> None:
    proc = cli(stack, "tail", "no.such.topic", "-n", "1", "--timeout", "5")
    assert proc.returncode == 2
    assert "topic 'no.such.topic' does not exist" in proc.stderr


# --------------------------------------------------------------------------- dead letters


def _dead_letter(event_id: str, source_topic: str, offset: int, function: str,
                 error: str) -> tuple:
    key, value, headers = _json_event(event_id, {"amount": -1})
    event = ce_kafka.from_record(key, value, headers, topic=source_topic, partition=0,
                                 offset=offset, timestamp_ms=None)
    return ce_kafka.to_dead_letter(event, headers, destination=function, code=422,
                                   message=error,
                                   origin=(source_topic, 0, offset, 1, function))


def test_deadletters_list_show_and_redrive_each_at_most_once(stack) -> None:
    dlq, source = unique("dlq."), unique("dlq.source.")
    ensure_topics(stack.bootstrap, {dlq: 1, source: 1})
    _produce(stack.bootstrap, dlq, [
        _dead_letter("e-1", source, 7, "validate", "Reject: amount must be positive"),
        _dead_letter("e-2", source, 8, "score", "ValueError: boom"),
    ])
    proc = cli(stack, "deadletters", "list", "--topic", dlq, "-o", "json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["id"], r["function"], r["code"], r["attempts"], r["source"]) for r in rows] == [
        ("e-1", "validate", "422", "1", f"{source}/0/7"),
        ("e-2", "score", "422", "1", f"{source}/0/8")]
    assert rows[0]["error"] == "Reject: amount must be positive"
    assert rows[0]["ref"] == f"{dlq}/0/0" and rows[0]["redriven"] is False
    only = json.loads(cli(stack, "deadletters", "list", "--topic", dlq, "--function", "score",
                          "-o", "json").stdout)
    assert [r["id"] for r in only] == ["e-2"]
    shown = json.loads(cli(stack, "deadletters", "show", "--topic", dlq, "--id", "e-1",
                           "-o", "json").stdout)
    assert shown[0]["data"] == {"amount": -1}
    assert "knativeerrorcode" not in shown[0]["attributes"]  # the original event
    proc = cli(stack, "deadletters", "show", "--topic", dlq)
    assert proc.returncode == 2 and "needs --id REF" in proc.stderr
    proc = cli(stack, "deadletters", "show", "--topic", dlq, "--id", "nope")
    assert proc.returncode == 2 and "no dead letter nope" in proc.stderr

    first = cli(stack, "deadletters", "redrive", "--topic", dlq, "--id", f"{dlq}/0/0",
                "-o", "json")
    assert first.returncode == 0, first.stderr
    assert [r["OUTCOME"] for r in json.loads(first.stdout)] == ["redriven"]
    again = cli(stack, "deadletters", "redrive", "--topic", dlq, "--all", "-o", "json")
    outcomes = {r["REF"]: r["OUTCOME"] for r in json.loads(again.stdout)}
    assert outcomes == {f"{dlq}/0/1": "redriven"}  # e-1 was already redriven: not listed
    third = cli(stack, "deadletters", "redrive", "--topic", dlq, "--id", "e-1", "-o", "json")
    assert [(r["OUTCOME"], r["DETAIL"]) for r in json.loads(third.stdout)] == [
        ("skipped", "already redriven")]
    back = consume_all(stack.bootstrap, source, expected=2, timeout=30, settle=2.0)
    ids = sorted(ce_kafka.from_record(m.key(), m.value(), m.headers(), topic=source,
                                      partition=0, offset=m.offset(),
                                      timestamp_ms=None)["id"] for m in back)
    assert ids == ["e-1", "e-2"]  # each exactly once, extensions gone
    for m in back:
        assert not any(k.startswith("ce_knativeerror") or k.startswith("ce_sluiceerror")
                       for k, _ in m.headers())
    listed = json.loads(cli(stack, "deadletters", "list", "--topic", dlq, "-o", "json").stdout)
    assert all(r["redriven"] for r in listed)


# --------------------------------------------------------------------------- replay


PASS_THROUGH = '''
import functions_framework


@functions_framework.cloud_event
def copy(event):
    return {"n": event.data["n"], "replayed": True}
'''


def test_replay_delivers_exactly_the_time_range(stack, tmp_path: Path) -> None:
    src, out, dlq = unique("replay.in."), unique("replay.out."), unique("replay.dlq.")
    ensure_topics(stack.bootstrap, {src: 2, out: 1, dlq: 1})
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "main.py").write_text(PASS_THROUGH)
    topology = tmp_path / "topology.yaml"
    topology.write_text(f"functions:\n  copy:\n    topics: [{src}]\n    outputs: [{out}]\n"
                        f"    delivery: {{deadLetterSink: {dlq}}}\n")
    now = int(time.time() * 1000)
    old = [(*_json_event(f"old-{i}", {"n": i}), now - 30 * 60_000 + i) for i in range(5)]
    mid = [(*_json_event(f"mid-{i}", {"n": 10 + i}), now - 10 * 60_000 + i) for i in range(4)]
    new = [(*_json_event(f"new-{i}", {"n": 20 + i}), now - 60_000 + i) for i in range(3)]
    _produce(stack.bootstrap, src, old + mid + new)
    proc = cli(stack, "replay", "--topic", src, "--since", "20m", "--until", "5m",
               "--topology", str(topology), "-o", "json", timeout=180)
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(proc.stdout)
    assert row["FUNCTION"] == "copy" and row["RECORDS"] == 4 and row["SUCCEEDED"] == 4
    assert row["REPLAY GROUP"].startswith("sluice-copy-replay-")
    got = consume_all(stack.bootstrap, out, expected=4, timeout=30, settle=2.0)
    assert sorted(json.loads(m.value())["n"] for m in got) == [10, 11, 12, 13]
    proc = cli(stack, "replay", "--topic", src, "--since", "10m", "--until", "20m",
               "--topology", str(topology))
    assert proc.returncode == 2 and "--until must be after --since" in proc.stderr
    proc = cli(stack, "replay", "--topic", "other", "--since", "10m",
               "--topology", str(topology))
    assert proc.returncode == 2 and "consumes 'other'" in proc.stderr


# --------------------------------------------------------------------------- schemas


def test_schemas_check_diff_show_list(stack, tmp_path: Path) -> None:
    topic = unique("schemas.")
    base = json.loads((ROOT / "schemas" / "payments.raw.avsc").read_text())
    path = tmp_path / f"{topic}.avsc"
    path.write_text(json.dumps(base))
    register(stack.registry_url, topic, path)
    proc = cli(stack, "schemas", "check", str(path), "-o", "json")
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads(proc.stdout)
    assert row["verdict"] == "compatible" and row["level"] == "BACKWARD"
    assert cli(stack, "schemas", "diff", str(path)).stdout == ""
    # A new field without a default: old records cannot be read with it (BACKWARD).
    changed = dict(base, fields=[*base["fields"], {"name": "channel", "type": "string"}])
    path.write_text(json.dumps(changed))
    proc = cli(stack, "schemas", "check", str(path), "-o", "json")
    assert proc.returncode == 1
    [row] = json.loads(proc.stdout)
    assert row["verdict"] == "INCOMPATIBLE" and "channel" in row["reasons"]
    diff = cli(stack, "schemas", "diff", str(path)).stdout
    assert '+      "name": "channel",' in diff and f"{topic}-value version 1 (registry)" in diff
    shown = cli(stack, "schemas", "show", topic)
    assert shown.returncode == 0 and f"# {topic}-value version 1 id" in shown.stdout
    assert json.loads(shown.stdout.split("\n", 1)[1]) == base
    missing = cli(stack, "schemas", "show", "no.such.topic")
    assert missing.returncode == 2 and "no.such.topic-value" in missing.stderr
    listed = json.loads(cli(stack, "schemas", "list", "-o", "json").stdout)
    assert any(r["subject"] == f"{topic}-value" and r["version"] == 1 for r in listed)
    new_path = tmp_path / f"{unique('fresh.')}.avsc"
    new_path.write_text(json.dumps(base))
    [row] = json.loads(cli(stack, "schemas", "check", str(new_path), "-o", "json").stdout)
    assert row["verdict"] == "compatible" and "new subject" in row["reasons"]


# --------------------------------------------------------------------------- query


def test_query_output_as_trino_renders_it(stack) -> None:
    proc = cli(stack, "query", "SELECT count(*), 1 = 1, 'x' AS name", "-o", "csv")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["_col0,_col1,name", "1,true,x"]
    assert "elapsed" in proc.stderr
    table = cli(stack, "query", "SELECT 1 = 1 AS ok, NULL AS nothing")
    assert "true" in table.stdout and "True" not in table.stdout and "NULL" in table.stdout
    typo = cli(stack, "query", "SELEC 1")
    assert typo.returncode == 2 and "did you mean SELECT?" in typo.stderr
    assert "\x1b[" not in typo.stderr


def test_top_once_as_data(stack) -> None:
    proc = cli(stack, "top", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    snap = json.loads(proc.stdout)
    assert set(snap) == {"functions", "gateway"}
    csv_out = cli(stack, "top", "-o", "csv").stdout.splitlines()
    assert csv_out[0] == "function,rate,p99,lag,dead,retries,total"
