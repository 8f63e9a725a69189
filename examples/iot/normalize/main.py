"""Convert every reading to its metric's canonical unit: temperature C, humidity %,
pressure hPa.

Devices report in whatever their firmware uses (US sites in Fahrenheit and psi, some
humidity sensors as a 0..1 ratio). Downstream windows average values, so a unit mix
would be silently wrong; an unknown metric or unit is rejected (dead letter, no
retries) rather than guessed.
"""

import functions_framework
from cloudevents.http import CloudEvent

from eventing.fn.api import Reject

CANONICAL = {"temperature": "C", "humidity": "%", "pressure": "hPa"}
# metric -> unit -> function to the canonical unit
CONVERT = {
    "temperature": {"C": lambda v: v, "F": lambda v: (v - 32) * 5 / 9,
                    "K": lambda v: v - 273.15},
    "humidity": {"%": lambda v: v, "ratio": lambda v: v * 100},
    "pressure": {"hPa": lambda v: v, "mbar": lambda v: v, "kPa": lambda v: v * 10,
                 "psi": lambda v: v * 68.9475729},
}


def to_canonical(metric: str, unit: str, value: float) -> tuple[float, str]:
    """(value, unit) in the metric's canonical unit; Reject for what cannot convert."""
    units = CONVERT.get(metric)
    if units is None:
        raise Reject(f"unknown metric {metric!r}; known: {', '.join(sorted(CONVERT))}")
    convert = units.get(unit)
    if convert is None:
        raise Reject(f"unknown unit {unit!r} for {metric}; known: {', '.join(units)}")
    return round(convert(value), 4), CANONICAL[metric]


@functions_framework.cloud_event
def normalize(event: CloudEvent) -> dict:
    r = event.data
    if not r["reading_id"] or not r["device_id"]:
        raise Reject("reading_id and device_id must be non-empty")
    value, unit = to_canonical(r["metric"], r["unit"], r["value"])
    return {**r, "value": value, "unit": unit, "raw_value": r["value"], "raw_unit": r["unit"]}
