"""Sensor traffic for the IoT example: devices at sites reporting temperature, humidity
and pressure in their firmware's units, with injected spikes and broken sensors.

`sluice generate --topology examples/iot/topology.yaml` (and `sluice up` with that
topology) runs `run`. Readings drift slowly around a per-device baseline, in event time
"now"; US sites report Fahrenheit and psi, some humidity sensors a 0..1 ratio, so
normalisation has work to do. `inject_share` of readings are anomalies (a spike far from
the device's recent values, or an impossible value); their reading ids go to the truth
file, never into the events. Reading ids carry a random run token, so a restarted
generator never reuses one.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from eventing.ingest.publish import Publisher, publish_paced

EVENT_TYPE = "com.example.iot.reading.recorded"
SOURCE = "/example/iot/generator"
SITES = {"berlin": "EU", "lyon": "EU", "oslo": "EU", "austin": "US", "denver": "US"}
# metric: (baseline low, high, noise) in the canonical unit
METRICS = {"temperature": (18.0, 26.0, 0.2), "humidity": (30.0, 60.0, 0.8),
           "pressure": (990.0, 1030.0, 0.3)}


def in_unit(metric: str, region: str, ratio_humidity: bool, value: float) -> tuple[float, str]:
    """The canonical value as the device's firmware reports it."""
    if metric == "temperature":
        return (round(value * 9 / 5 + 32, 2), "F") if region == "US" else (round(value, 2), "C")
    if metric == "pressure":
        return (round(value / 68.9475729, 4), "psi") if region == "US" else (round(value, 2),
                                                                              "hPa")
    return (round(value / 100, 4), "ratio") if ratio_humidity else (round(value, 2), "%")


@dataclass
class Device:
    device_id: str
    site: str
    region: str
    ratio_humidity: bool
    level: dict[str, float] = field(default_factory=dict)


class Generator:
    """Readings from `devices` devices, one metric each call, round robin."""

    def __init__(self, devices: int = 40, seed: int = 5, inject_share: float = 0.01) -> None:
        self.rng = random.Random(seed)
        self.inject_share = inject_share
        self.token = secrets.token_hex(3)
        self.count = 0
        sites = sorted(SITES)
        self.devices = []
        for i in range(devices):
            site = sites[i % len(sites)]
            d = Device(f"dev-{i:04d}", site, SITES[site], ratio_humidity=i % 3 == 0)
            d.level = {m: self.rng.uniform(lo, hi) for m, (lo, hi, _) in METRICS.items()}
            self.devices.append(d)

    def next(self, now_ms: int) -> tuple[dict, bool]:
        """(reading, injected anomaly?)"""
        d = self.devices[self.count % len(self.devices)]
        metric = list(METRICS)[(self.count // len(self.devices)) % len(METRICS)]
        self.count += 1
        lo, hi, noise = METRICS[metric]
        d.level[metric] = min(hi, max(lo, d.level[metric] + self.rng.gauss(0, noise / 4)))
        value = d.level[metric] + self.rng.gauss(0, noise)
        injected = self.rng.random() < self.inject_share
        if injected:
            value = (value + (hi - lo) * self.rng.choice((-3, 3)) if self.rng.random() < 0.7
                     else {"temperature": 150.0, "humidity": 140.0, "pressure": 20.0}[metric])
        raw, unit = in_unit(metric, d.region, d.ratio_humidity, value)
        return {"reading_id": f"r-{self.token}-{self.count}", "device_id": d.device_id,
                "site": d.site, "metric": metric, "value": raw, "unit": unit,
                "event_time": now_ms}, injected


def event_for(reading: dict) -> dict:
    """The structured-mode CloudEvent the generator publishes for a reading."""
    return {"specversion": "1.0", "id": reading["reading_id"], "source": SOURCE,
            "type": EVENT_TYPE, "partitionkey": reading["device_id"],
            "datacontenttype": "application/json", "data": reading}


def run(publisher: Publisher, *, rate: float, duration: float, seed: int = 5,
        inject_share: float = 0.01, truth: Path | None = None,
        progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Publish readings through `publisher` at `rate` per second for `duration` seconds
    (0: until interrupted), by the platform's paced loop (`publish_paced`); injected
    anomalies' reading ids go to `truth`. Returns (readings sent, of which injected)."""
    gen = Generator(seed=seed, inject_share=inject_share)

    def make(now_ms: int) -> tuple[dict, bool]:
        reading, bad = gen.next(now_ms)
        return event_for(reading), bad

    return publish_paced(publisher, make, rate=rate, duration=duration, truth=truth,
                         progress=progress)
