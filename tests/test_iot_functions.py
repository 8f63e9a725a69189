"""The IoT example's functions and generator, called as plain functions with plain
CloudEvents (no stack): unit conversion, tumbling windows in keyed state, anomalies."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from cloudevents.http import CloudEvent

from eventing import topology as topo
from eventing.fn.api import Reject

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "iot"
MINUTE = 60_000
T0 = 1_796_000_000_000 - 1_796_000_000_000 % MINUTE  # a window boundary


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def window():
    module = _load(EXAMPLE / "window" / "main.py", "iot_window")
    module.WINDOWS._data.clear()  # the store is process-wide; start each test empty
    return module


@pytest.fixture(scope="module")
def normalize():
    return _load(EXAMPLE / "normalize" / "main.py", "iot_normalize")


def reading(i: int, value: float, *, t: int, device: str = "dev-1", unit: str = "C",
            metric: str = "temperature") -> dict:
    return {"reading_id": f"r-{i}", "device_id": device, "site": "lyon", "metric": metric,
            "value": value, "unit": unit, "event_time": t}


def _event(data: dict) -> CloudEvent:
    return CloudEvent({"type": "com.example.iot.reading.recorded", "source": "/t"}, dict(data))


def test_normalize_converts_to_the_canonical_unit_and_rejects_unknown_ones(normalize) -> None:
    f = normalize.normalize(_event(reading(1, 212.0, t=T0, unit="F")))
    assert (f["value"], f["unit"], f["raw_value"], f["raw_unit"]) == (100.0, "C", 212.0, "F")
    k = normalize.normalize(_event(reading(2, 273.15, t=T0, unit="K")))
    assert k["value"] == 0.0
    psi = normalize.normalize(_event(reading(3, 14.7, t=T0, unit="psi", metric="pressure")))
    assert psi["unit"] == "hPa" and psi["value"] == pytest.approx(1013.53, abs=0.01)
    ratio = normalize.normalize(_event(reading(4, 0.45, t=T0, unit="ratio", metric="humidity")))
    assert (ratio["value"], ratio["unit"]) == (45.0, "%")
    with pytest.raises(Reject, match="unknown unit 'R'"):
        normalize.normalize(_event(reading(5, 1.0, t=T0, unit="R")))
    with pytest.raises(Reject, match="unknown metric 'noise'"):
        normalize.normalize(_event(reading(6, 1.0, t=T0, metric="noise")))


def test_window_closes_on_the_next_window_and_reports_its_stats(window) -> None:
    for i, v in enumerate([20.0, 21.0, 22.0]):
        assert window.window(_event(reading(i, v, t=T0 + i * 1000))) == []
    out = window.window(_event(reading(9, 21.5, t=T0 + MINUTE + 5)))
    [stats] = out
    assert stats["type"] == "com.example.iot.window.closed"
    assert stats["id"] == f"dev-1/temperature/{T0}"
    s = stats.data
    assert (s["window_start"], s["window_end"], s["readings"]) == (T0, T0 + MINUTE, 3)
    assert (s["min_value"], s["max_value"], s["mean_value"]) == (20.0, 22.0, 21.0)
    assert s["stddev_value"] == pytest.approx(0.8165, abs=1e-4)
    # Another device's windows are its own.
    assert window.window(_event(reading(10, 5.0, t=T0 + 2 * MINUTE, device="dev-2"))) == []


def test_window_flags_out_of_range_and_spikes_and_ignores_replays(window) -> None:
    for i in range(5):
        window.window(_event(reading(i, 20.0 + i * 0.1, t=T0 + i)))
    # Next window: the previous one's mean is ~20.2, sd floored at 0.5 -> a spike at 30.
    [stats, spike] = window.window(_event(reading(10, 30.0, t=T0 + MINUTE)))
    assert spike["type"] == "com.example.iot.anomaly.detected"
    assert spike.data["reason"] == "spike" and spike.data["deviation"] > 4
    assert spike.data["expected"] == pytest.approx(20.2)
    [broken] = window.window(_event(reading(11, 150.0, t=T0 + MINUTE + 1)))
    assert broken.data["reason"] == "out_of_range"
    assert window.window(_event(reading(11, 150.0, t=T0 + MINUTE + 1))) == []  # a replay
    normal = window.window(_event(reading(12, 20.3, t=T0 + MINUTE + 2)))
    assert normal == []
    [closed] = window.window(_event(reading(13, 20.3, t=T0 + 2 * MINUTE)))
    # Anomalies are counted, but kept out of the stats.
    assert closed.data["readings"] == 1 and closed.data["anomalies"] == 2
    assert closed.data["max_value"] == 20.3


def test_generator_mixes_units_and_labels_what_it_injects() -> None:
    gen = _load(EXAMPLE / "generate.py", "iot_generate")
    g = gen.Generator(devices=10, seed=1, inject_share=0.05)
    readings = [g.next(T0) for _ in range(3000)]
    units = {r["unit"] for r, _ in readings}
    assert {"C", "F", "%", "ratio", "hPa", "psi"} <= units
    injected = sum(bad for _, bad in readings)
    assert 0.03 * 3000 < injected < 0.07 * 3000
    assert len({r["reading_id"] for r, _ in readings}) == 3000


def test_iot_topology_declares_its_tables_ids_and_schemas() -> None:
    t = topo.load(EXAMPLE / "topology.yaml")
    assert sorted(t.tables) == ["device_stats", "sensor_anomalies"]
    assert t.table("device_stats").time_field == "window_start"
    assert t.table("sensor_anomalies").partition_by == "month"
    assert t.trace_ids == {"reading_id": "reading.id", "device_id": "device.id"}
    assert {p.name for p in t.schemas.glob("*.avsc")} == {
        f"{topic}.avsc" for topic in t.all_topics() if topic != "iot.deadletter"}
