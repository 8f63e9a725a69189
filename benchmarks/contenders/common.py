"""What every contender shares: arguments, the clock, CPU accounting, the result line.

Kept to the standard library and confluent-kafka so it imports in the Quix venv too
(which has its own confluent-kafka). Each contender is one process that runs one job and
prints one `RESULT {json}` line; `benchmarks/run.py` starts it, reads that line and checks
the output topic itself, so no contender grades its own work.

The clock starts when the first consume call returns records and stops when the last
output is acknowledged by the broker; CPU is `time.process_time()` over the same window
(every thread of the process, librdkafka's included) plus, for HTTP contenders, the CPU
the function server's processes used in that window (read from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:  # `eventing.kafka` needs only confluent-kafka: any venv works
    sys.path.insert(0, str(ROOT))

SCHEMAS = ROOT / "schemas"
# The job's function and its output schema are benchmark code, not the example's: every
# run registers CONVERTED_SCHEMA for its output topic (`sluice up` does not).
CONVERT = ROOT / "benchmarks" / "convert"
CONVERTED_SCHEMA = ROOT / "benchmarks" / "schemas" / "payments.converted.avsc"
RESULT_PREFIX = "RESULT "

# A copy of benchmarks/convert's table so the floor and Quix need no functions-framework;
# run.py checks the two are equal before anything is timed.
EUR_PER_UNIT = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17, "CHF": 1.05, "JPY": 0.0061,
                "SEK": 0.088, "PLN": 0.23}


def job_args(description: str) -> argparse.ArgumentParser:
    """The arguments every throughput contender takes (run.py passes all of them)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--input", required=True, help="topic holding the produced payments")
    p.add_argument("--output", required=True, help="fresh topic for converted payments")
    p.add_argument("--dlq", required=True, help="fresh dead-letter topic (Sluice only)")
    p.add_argument("--group", required=True, help="fresh consumer group id")
    p.add_argument("--events", type=int, required=True, help="records in --input")
    p.add_argument("--timeout", type=float, default=300.0, help="give up after this long")
    return p


def schema(path: Path) -> dict:
    return json.loads(path.read_text())


def latest_schema_id(registry: str, subject: str) -> int:
    with urllib.request.urlopen(f"{registry}/subjects/{subject}/versions/latest",
                                timeout=10) as resp:
        return json.loads(resp.read())["id"]


def tree_cpu_seconds(pid: int) -> float:
    """user+system CPU of `pid` and all its live descendants (gunicorn master + worker)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "
        ppid = int(fields[1])
        children.setdefault(ppid, []).append(int(entry))
        stats[int(entry)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats.get(p, 0.0)
        todo.extend(children.get(p, []))
    return total


class Clock:
    """First records consumed → last output acknowledged, wall and CPU.

    `extra_pids` are other processes doing the work (an HTTP function server): their
    CPU over the same window is added to this process's.
    """

    def __init__(self, extra_pids: tuple[int, ...] = ()) -> None:
        self.extra_pids = extra_pids
        self.t0: float | None = None
        self.t1: float | None = None
        self._cpu0 = self._cpu1 = 0.0
        self._extra0 = self._extra1 = 0.0

    @property
    def started(self) -> bool:
        return self.t0 is not None

    def start(self) -> None:
        if self.t0 is None:
            self._cpu0 = time.process_time()
            self._extra0 = sum(tree_cpu_seconds(p) for p in self.extra_pids)
            self.t0 = time.perf_counter()

    def stop(self) -> None:
        self.t1 = time.perf_counter()
        self._cpu1 = time.process_time()
        self._extra1 = sum(tree_cpu_seconds(p) for p in self.extra_pids)

    def result(self, events: int, **extra: Any) -> dict[str, Any]:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError("the clock never started: no records were consumed")
        own = self._cpu1 - self._cpu0
        other = self._extra1 - self._extra0
        return {"events": events, "seconds": self.t1 - self.t0, "cpu_s": own + other,
                "cpu_own_s": own, "cpu_server_s": other, **extra}


def emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


class TimedConsumer:
    """Wraps a confluent-kafka Consumer so the clock starts when records first arrive.

    Used to time Sluice's Dispatcher without changing it: the dispatcher calls
    `self.consumer.consume(...)`, everything else passes through.
    """

    def __init__(self, inner: Any, clock: Clock) -> None:
        self._inner = inner
        self._clock = clock

    def consume(self, *args: Any, **kwargs: Any) -> list:
        msgs = self._inner.consume(*args, **kwargs)
        if msgs and not self._clock.started:
            self._clock.start()
        return msgs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
