"""Human durations and sizes in flags and settings (`1h`, `500ms`, `1GiB`), parsed one way."""

from __future__ import annotations

import re

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2,
               "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
               "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_duration(text: str) -> float:
    """`1h`, `30m`, `90s`, `2d`, `500ms` or plain seconds -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (e.g. 1h, 30m, 90s, 250ms)")
    value, unit = float(match.group(1)), match.group(2) or "s"
    return value * _DURATION_UNITS[unit]


def parse_size(text: str) -> int:
    """`1GiB`, `512MiB`, `200MB`, `64k` or plain bytes -> bytes (KiB/MiB/GiB are 1024-based,
    kB/MB/GB 1000-based, as the IEC and SI prefixes say)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 1GiB, 512MiB, 200MB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def format_size(n: float) -> str:
    """Bytes for people: `1.0 GiB`, `12.3 MiB`."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
