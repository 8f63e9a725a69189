"""The second example end to end, as a user runs it: `sluice up --topology
examples/iot/topology.yaml` on its own stack, readings published through the gateway,
rows in both declared tables (lake and real-time), `SHOW TABLES`, and `sluice trace` by
the example's own business id. Nothing here is payments-specific: the platform learns
tables, schemas and ids from the topology.

Lean on purpose (one stack, ~40 events): the event times are two minutes in the past,
so every device's first window closes as soon as its next-window reading arrives.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from eventing.ingest.publish import Publisher
from eventing.stack.settings import StackSettings, load_settings
from tests.helpers import ROOT, free_port_offset, sluice, unique, wait_until

pytestmark = pytest.mark.stack

TOPOLOGY = ROOT / "examples" / "iot" / "topology.yaml"
EVENT_TYPE = "com.example.iot.reading.recorded"
MINUTE = 60_000
DEVICES = 4
PER_WINDOW = 8


@pytest.fixture(scope="module")
def iot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackSettings]:
    state = tmp_path_factory.mktemp("iot") / "state"
    offset = free_port_offset()
    try:
        sluice("up", "--storage", "memory", "--no-generator", "--topology", str(TOPOLOGY),
               state_dir=state, offset=offset, timeout=240)
        yield load_settings(state_dir=state, port_offset=offset, topology=TOPOLOGY)
    finally:
        sluice("down", "--purge", state_dir=state, offset=offset, check=False)


def _event(rid: str, device: str, value: float, unit: str, t: int) -> dict:
    return {"specversion": "1.0", "id": rid, "source": "/tests/iot", "type": EVENT_TYPE,
            "partitionkey": device, "datacontenttype": "application/json",
            "data": {"reading_id": rid, "device_id": device, "site": "austin",
                     "metric": "temperature", "value": value, "unit": unit,
                     "event_time": t}}


def query(settings: StackSettings, sql: str) -> list[dict]:
    r = httpx.post(settings.realtime_url + "/query", json={"sql": sql}, timeout=30)
    if r.status_code != 200:
        return []
    body = r.json()
    return [dict(zip(body["columns"], row, strict=True)) for row in body["rows"]]


def test_readings_become_rows_in_both_tables_and_can_be_traced(iot: StackSettings) -> None:
    run = unique("")
    now = int(time.time() * 1000)
    first = now - now % MINUTE - 2 * MINUTE
    events = []
    for d in range(DEVICES):
        device = f"dev-{run}-{d}"
        # Fahrenheit on purpose: the stats must come out in Celsius.
        events += [_event(f"{device}-{i}", device, 68.0 + i * 0.18, "F", first + i * 1000)
                   for i in range(PER_WINDOW)]
        # The next window's first reading closes the first; device 0's is broken.
        events.append(_event(f"{device}-next", device, 400.0 if d == 0 else 68.5, "F",
                             first + MINUTE + 500))
    with Publisher(iot.gateway_url) as pub:
        assert pub.send_many(events, batch_size=10) == len(events)
    devices = f"'dev-{run}-%'"

    stats = wait_until(lambda: len(rows := query(
        iot, f"SELECT * FROM device_stats_rt WHERE device_id LIKE {devices} "
             "ORDER BY device_id")) == DEVICES and rows, 60, "window stats in device_stats_rt")
    for row in stats:
        assert row["readings"] == PER_WINDOW and row["unit"] == "C"
        assert row["min_value"] == pytest.approx(20.0) and row["anomalies"] == 0
        assert row["mean_value"] == pytest.approx(20.0 + 0.1 * (PER_WINDOW - 1) / 2, abs=1e-3)
    anomalies = wait_until(lambda: query(
        iot, f"SELECT reading_id, reason FROM sensor_anomalies_rt WHERE device_id LIKE "
             f"{devices}"), 60, "the anomaly in sensor_anomalies_rt")
    assert anomalies == [{"reading_id": f"dev-{run}-0-next", "reason": "out_of_range"}]

    # The lake sink commits the same rows to Iceberg (one process serves both tables).
    wait_until(lambda: query(iot, f"SELECT count(*) AS n FROM device_stats WHERE device_id "
                                  f"LIKE {devices}") == [{"n": DEVICES}], 90,
               "device_stats rows in the lake")
    wait_until(lambda: query(iot, f"SELECT count(*) AS n FROM sensor_anomalies WHERE "
                                  f"device_id LIKE {devices}") == [{"n": 1}], 90,
               "sensor_anomalies rows in the lake")

    shown = sluice("query", "--format", "json", "SHOW TABLES", state_dir=iot.state_dir,
                   offset=iot.ports.broker - 9092)
    assert {r["Table"] for r in json.loads(shown.stdout)} >= {
        "device_stats", "device_stats_rt", "sensor_anomalies", "sensor_anomalies_rt"}
    described = json.loads(sluice("query", "--format", "json", "DESCRIBE device_stats_rt",
                                  state_dir=iot.state_dir,
                                  offset=iot.ports.broker - 9092).stdout)
    types = {r["Column"]: r["Type"] for r in described}
    assert types["window_start"] == "timestamp(6) with time zone"
    assert types["readings"] == "integer" and types["kafka_offset"] == "bigint"

    # `sluice trace <reading id>`: the topology's traceIds make the example's own id a
    # lookup key; the path runs from the gateway through both functions into both sinks.
    traced = sluice("trace", f"dev-{run}-0-next", "--json", "--wait", "20",
                    state_dir=iot.state_dir, offset=iot.ports.broker - 9092)
    spans = [s for trace in json.loads(traced.stdout) for s in trace["spans"]]
    names = {s["name"] for s in spans}
    assert {"send iot.readings.raw", "process iot.readings.raw",
            "process iot.readings.normalized", "send iot.anomalies",
            "write sensor_anomalies_rt", "write sensor_anomalies"} <= names, names
    assert any(s["attributes"].get("reading.id") == f"dev-{run}-0-next" for s in spans)
    text = sluice("trace", f"dev-{run}-0-next", state_dir=iot.state_dir,
                  offset=iot.ports.broker - 9092).stdout
    assert f"reading.id=dev-{run}-0-next" in text


def test_readme_queries_run_and_partitioning_follows_the_topology(iot: StackSettings) -> None:
    """The README's IoT queries run on the local engine (not just parse), and the lake
    tables are partitioned as declared (device_stats by day, sensor_anomalies by month)."""
    from pyiceberg.transforms import DayTransform, MonthTransform

    from eventing.tables.lakehouse import LakeConfig, catalog
    from tests.test_deploy_platform import readme_queries

    iot_queries = [q for q in readme_queries() if "device_stats" in q or "sensor_anomalies" in q]
    assert len(iot_queries) >= 4
    for sql in iot_queries:
        r = httpx.post(iot.realtime_url + "/query", json={"sql": sql}, timeout=60)
        assert r.status_code == 200, f"{sql}\n{r.text}"
    cat = catalog(LakeConfig.from_settings(iot))
    specs = {name: cat.load_table(f"sluice.{name}").spec().fields[0].transform
             for name in ("device_stats", "sensor_anomalies")}
    assert isinstance(specs["device_stats"], DayTransform)
    assert isinstance(specs["sensor_anomalies"], MonthTransform)


def test_status_and_down_remember_the_topology(iot: StackSettings) -> None:
    """`status` without --topology reports the IoT parts: the state folder remembers."""
    out = sluice("status", "--json", state_dir=iot.state_dir,
                 offset=iot.ports.broker - 9092, check=False)
    parts = {p["name"]: p for p in json.loads(out.stdout)}
    assert {"fn-normalize", "fn-window", "lakesink", "realtime"} <= set(parts)
    assert "fn-score" not in parts
    assert "sluice.device_stats" in parts["lakesink"]["endpoint"]
    assert json.loads(Path(iot.state_dir, "stack.json").read_text())["topology"] == str(
        TOPOLOGY)
