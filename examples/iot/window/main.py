"""Per-device one-minute tumbling windows over event time, and anomalies.

State: for each (device, metric) the open window (its start, readings' count, sum, sum
of squares, min, max, recent reading ids) and the previous window's mean and standard
deviation, in a keyed store changelogged to the compacted topic `iot.window.state`, so
windows survive restarts and rescaling (`eventing.fn.state`).

Readings flagged as anomalies are counted in the window's `anomalies` but kept out of
its min/max/mean/stddev. A window closes when the device's first reading of a later
window arrives (event time, per device: the input is keyed by device, so one partition
sees all of a device's readings in order); its stats go to `iot.device.stats`. A device
that falls silent keeps its last window open until it reports again. Readings older
than the open window are counted nowhere (they are late; their window was already
emitted) but still checked for anomalies.

Anomalies (`iot.anomalies`): a value outside the metric's physical range, or more than
`SPIKE_SIGMAS` standard deviations from the previous window's mean (with a floor on the
deviation, so a flat line does not make every wobble a spike). Reading ids kept in the
window make a replayed reading harmless.
"""

import math
import os

import functions_framework
from cloudevents.http import CloudEvent

from eventing.fn.api import store

WINDOW_MS = int(os.environ.get("IOT_WINDOW_MS", "60000"))
SPIKE_SIGMAS = float(os.environ.get("IOT_SPIKE_SIGMAS", "4"))
MIN_STDDEV = {"temperature": 0.5, "humidity": 2.0, "pressure": 1.0}
RANGE = {"temperature": (-60.0, 90.0), "humidity": (0.0, 100.0), "pressure": (800.0, 1100.0)}
SOURCE = "/example/iot/window"
MAX_IDS = 500  # reading ids kept per open window for replay detection

WINDOWS = store("device-windows", topic="iot.window.state")


def _new_window(start: int) -> dict:
    return {"start": start, "n": 0, "sum": 0.0, "sq": 0.0, "min": None, "max": None,
            "ids": [], "anomalies": 0}


def _stats(w: dict) -> tuple[float, float]:
    mean = w["sum"] / w["n"]
    var = max(0.0, w["sq"] / w["n"] - mean * mean)
    return mean, math.sqrt(var)


def _anomaly(r: dict, prev: dict | None) -> dict | None:
    low, high = RANGE[r["metric"]]
    v = r["value"]
    base = {k: r[k] for k in ("reading_id", "device_id", "site", "metric", "value", "unit",
                              "event_time")}
    expected = prev["mean"] if prev else None
    sd = max(prev["sd"], MIN_STDDEV[r["metric"]]) if prev else None
    deviation = abs(v - expected) / sd if prev else None
    if not low <= v <= high:
        reason = "out_of_range"
    elif deviation is not None and deviation > SPIKE_SIGMAS:
        reason = "spike"
    else:
        return None
    return {**base, "expected": expected,
            "deviation": None if deviation is None else round(deviation, 2), "reason": reason}


@functions_framework.cloud_event
def window(event: CloudEvent) -> list:
    r = event.data
    key = f"{r['device_id']}/{r['metric']}"
    state = WINDOWS.get(key) or {"open": None, "prev": None}
    start = r["event_time"] - r["event_time"] % WINDOW_MS
    out = []
    w = state["open"]
    if w is not None and r["reading_id"] in w["ids"]:
        return []  # a replay of a reading this window already counted
    if w is not None and start > w["start"]:
        if w["n"]:  # a window of nothing but anomalies has no stats to give
            mean, sd = _stats(w)
            out.append(CloudEvent(
                {"type": "com.example.iot.window.closed", "source": SOURCE,
                 "id": f"{key}/{w['start']}", "partitionkey": r["device_id"]},
                {"device_id": r["device_id"], "site": r["site"], "metric": r["metric"],
                 "unit": r["unit"], "window_start": w["start"],
                 "window_end": w["start"] + WINDOW_MS, "readings": w["n"],
                 "min_value": w["min"], "max_value": w["max"], "mean_value": round(mean, 4),
                 "stddev_value": round(sd, 4), "anomalies": w["anomalies"]}))
            state["prev"] = {"mean": mean, "sd": sd}
        w = None
    anomaly = _anomaly(r, state["prev"])
    if anomaly is not None:
        out.append(CloudEvent(
            {"type": "com.example.iot.anomaly.detected", "source": SOURCE,
             "id": f"anomaly-{r['reading_id']}", "partitionkey": r["device_id"]}, anomaly))
    if w is None:
        w = _new_window(start)
    if start == w["start"]:  # late readings (an earlier window) are not counted
        w["ids"] = (w["ids"] + [r["reading_id"]])[-MAX_IDS:]
        if anomaly is not None:  # kept out of the stats, so one spike skews nothing
            w["anomalies"] += 1
        else:
            _add(w, r["value"])
    state["open"] = w
    WINDOWS.put(key, state)
    return out


def _add(w: dict, v: float) -> None:
    w["n"] += 1
    w["sum"] += v
    w["sq"] += v * v
    w["min"] = v if w["min"] is None else min(w["min"], v)
    w["max"] = v if w["max"] is None else max(w["max"], v)
