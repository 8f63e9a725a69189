"""Instructions per event of Sluice's in-process path, counted by callgrind: no broker, no clock.

Why: on a shared 2-core machine the wall-clock benchmarks (`run.py`) swing by 2-10x
between runs, so a small change to the per-event framework cost drowns in noise.
Callgrind counts instructions, which repeat exactly for the same code and input. This
runs the benchmarks' job (decode an Avro payment, `benchmarks/convert`, encode the
output) through the real `FunctionHost` and `InProcessInvoker`, with an in-memory
registry and a producer that drops records, and reports
(instructions at N2 events - instructions at N1 events) / (N2 - N1): the per-event cost
with start-up, imports and building the input records subtracted.

    .venv/bin/python benchmarks/inprocess_instructions.py            # Sluice and the floor
    .venv/bin/python benchmarks/inprocess_instructions.py --tree DIR # another checkout

The floor (`contenders/floor.py`'s loop: raw fastavro decode, transform, encode, produce
with the input's key and headers) is counted in the same run on the same records, so
"Sluice / floor" is instructions against instructions, free of the machine's noise.

It needs `valgrind` (Debian package). `--tree` runs the same job against another
checkout of Sluice (e.g. a `git worktree` of an older commit) for a before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CURRENCIES = ["EUR", "USD", "GBP", "CHF", "JPY", "SEK", "PLN"]
# The job's conversion rates (benchmarks/convert/main.py); the floor inlines them.
EUR_PER_UNIT = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17, "CHF": 1.05, "JPY": 0.0061,
                "SEK": 0.088, "PLN": 0.23}


class Producer:
    """A producer that counts and drops records: no broker under callgrind."""

    sent = 0

    def produce(self, *args: object, **kwargs: object) -> None:
        Producer.sent += 1

    def poll(self, *_: object) -> int:
        return 0

    def flush(self, *_: object) -> int:
        return 0


class Message:
    """The parts of `confluent_kafka.Message` the dispatcher and the floor read."""

    __slots__ = ("_value", "_offset", "_headers", "_key")

    def __init__(self, value: bytes, offset: int, key: bytes,
                 headers: list[tuple[str, bytes]]) -> None:
        self._value, self._offset, self._key, self._headers = value, offset, key, headers

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (1, 1764150000000)

    def error(self) -> None:
        return None


def _messages(raw_schema: str, built: int) -> list[Message]:
    """`built` binary-mode payment records, as the gateway writes them (schema id 1)."""
    from io import BytesIO

    from fastavro import parse_schema, schemaless_writer

    parsed = parse_schema(json.loads(raw_schema))
    messages = []
    for i in range(built):
        buf = BytesIO()
        buf.write(b"\x00" + struct.pack(">I", 1))
        card = f"card-{i % 1000:05d}"
        schemaless_writer(buf, parsed, {
            "payment_id": f"p-{i}", "card_id": card, "merchant_id": f"m-{i % 97:04d}",
            "amount": float(i % 500) + 0.5, "currency": CURRENCIES[i % 7], "country": "DE",
            "event_time": 1764150000000 + i})
        headers = [("ce_specversion", b"1.0"), ("ce_id", f"p-{i}".encode()),
                   ("ce_source", b"/bench"), ("ce_type", b"com.sluice.payment.created"),
                   ("ce_time", b"2025-11-26T10:00:00.000Z"),
                   ("ce_partitionkey", card.encode()), ("content-type", b"application/avro")]
        messages.append(Message(buf.getvalue(), i, card.encode(), headers))
    return messages


def _floor_job(events: int, built: int, tree: Path) -> None:
    """The floor (`contenders/floor.py`) on the same records: raw fastavro in one loop.

    Decode behind the 5-byte prefix, drop non-positive amounts, add `amount_eur`, encode
    behind the output's prefix, produce with the input's key and headers; batches of 500
    as the dispatcher gets them. No framework: the instructions Sluice's path is held to.
    """
    from io import BytesIO

    from fastavro import parse_schema, schemaless_reader, schemaless_writer

    raw = (tree / "schemas" / "payments.raw.avsc").read_text()
    converted = (ROOT / "benchmarks" / "schemas" / "payments.converted.avsc").read_text()
    messages = _messages(raw, built)
    reader = parse_schema(json.loads(raw))
    writer = parse_schema(json.loads(converted))
    prefix = b"\x00" + (2).to_bytes(4, "big")
    producer = Producer()
    produce = producer.produce
    rates = EUR_PER_UNIT
    for start in range(0, events, 500):
        for msg in messages[start:min(start + 500, events)]:
            buf = BytesIO(msg.value())
            buf.seek(5)
            rec = schemaless_reader(buf, reader, None)
            amount = rec["amount"]
            if amount <= 0:
                continue
            rec["amount_eur"] = round(amount * rates[rec["currency"]], 2)
            out = BytesIO()
            out.write(prefix)
            schemaless_writer(out, writer, rec)
            produce("out", out.getvalue(), msg.key(), headers=msg.headers())
        producer.poll(0)
    if Producer.sent != events:
        raise SystemExit(f"floor job broken: {Producer.sent} of {events} outputs")


def _job(events: int, built: int, tree: Path) -> None:
    """The measured body: runs inside valgrind, in `tree`'s code.

    Always builds `built` records, so that building them cancels out of the difference
    between two runs; only the first `events` go through the invoker.
    """
    sys.path.insert(0, str(tree))
    from types import SimpleNamespace

    try:  # the layout since the regroup, then the flat one before it
        from eventing.delivery.invoke import InProcessInvoker
        from eventing.fn.runtime import FunctionHost
    except ImportError:
        from eventing.invoke import InProcessInvoker  # type: ignore[no-redef]
        from eventing.runtime import FunctionHost  # type: ignore[no-redef]
    from eventing.serde import AvroSerde
    from eventing.topology import Delivery, Function

    raw = (tree / "schemas" / "payments.raw.avsc").read_text()
    converted_path = tree / "benchmarks" / "schemas" / "payments.converted.avsc"
    if not converted_path.exists():
        converted_path = tree / "schemas" / "payments.converted.avsc"
    converted = converted_path.read_text()
    schemas = {1: raw, 2: converted}

    class Registry:
        def get_latest_version(self, subject: str) -> SimpleNamespace:
            sid = 2 if subject.startswith("out") else 1
            return SimpleNamespace(schema_id=sid, schema=SimpleNamespace(
                schema_str=schemas[sid], references=[], schema_type="AVRO"))

        def get_schema(self, sid: int) -> SimpleNamespace:
            return SimpleNamespace(schema_str=schemas[sid], references=[], schema_type="AVRO")

    convert = tree / "benchmarks" / "convert" / "main.py"
    if not convert.exists():
        convert = tree / "functions" / "convert" / "main.py"
    function = Function(name="convert", source=convert, target="convert", topics=("in",),
                        consumer_group="g", outputs={"out": ("*",)}, delivery=Delivery())
    host = FunctionHost(function, AvroSerde(client=Registry()))
    invoker = InProcessInvoker(host, Producer())
    messages = _messages(raw, built)
    failed = 0
    for start in range(0, events, 500):
        outcomes = invoker.invoke([messages[start:min(start + 500, events)]], True)
        failed += sum(failure is not None for _msg, failure in outcomes)
    if failed or Producer.sent != events:  # a broken job must not pass for a fast one
        raise SystemExit(f"job broken: {failed} failures, {Producer.sent} of {events} outputs")


def _instructions(events: int, built: int, tree: Path, job: str) -> int:
    """Instructions callgrind counts for one run of `job` ("sluice" or "floor")."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cg.out"
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             sys.executable, __file__, "--run", str(events), "--large", str(built),
             "--tree", str(tree), "--job", job],
            check=True, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"})
        text = out.read_text(errors="replace")
    match = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.M)
    if match is None:
        raise RuntimeError("no instruction total in callgrind's output")
    return int(match.group(1))


def per_event(tree: Path, job: str, small: int, large: int) -> tuple[float, int, int]:
    """(instructions/event, total at `small`, total at `large`) of `job` in `tree`.

    The two callgrind runs go in parallel: their counts do not depend on the machine.
    """
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(_instructions, n, large, tree, job) for n in (small, large)]
        at_small, at_large = (r.result() for r in runs)
    return (at_large - at_small) / (large - small), at_small, at_large


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", default=str(ROOT), help="checkout whose code runs the job")
    p.add_argument("--small", type=int, default=2_000, help="events in the first run")
    p.add_argument("--large", type=int, default=12_000, help="events in the second run")
    p.add_argument("--no-floor", action="store_true", help="skip the floor's count")
    p.add_argument("--run", type=int, help=argparse.SUPPRESS)  # inside valgrind
    p.add_argument("--job", choices=("sluice", "floor"), default="sluice",
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    tree = Path(args.tree).resolve()
    if args.run is not None:
        (_floor_job if args.job == "floor" else _job)(args.run, args.large, tree)
        return 0
    jobs = [("sluice", tree)] + ([] if args.no_floor else [("floor", ROOT)])
    with ThreadPoolExecutor(len(jobs)) as pool:
        counts = dict(zip((j for j, _ in jobs), pool.map(
            lambda jt: per_event(jt[1], jt[0], args.small, args.large), jobs), strict=True))
    sluice, small, large = counts["sluice"]
    print(f"{tree}: {sluice:,.0f} instructions/event "
          f"({small:,} at {args.small:,} events, {large:,} at {args.large:,})")
    if "floor" in counts:
        floor = counts["floor"][0]
        print(f"floor (raw fastavro, same records): {floor:,.0f} instructions/event; "
              f"sluice / floor = {sluice / floor:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
