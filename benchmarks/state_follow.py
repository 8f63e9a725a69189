"""Cost of keyed state over HTTP: the `score` host's CPU and latency per event, one host vs two.

A Knative Service may run a keyed-state function on several pods, so the HTTP host reads
the key's changelog partition to its end before each event (`eventing.fn.state`,
following mode). This measures what that costs against a running local stack:

- `one`: every event to host A (the catch-up finds only A's own previous write);
- `two`: events alternately to hosts A and B (each catch-up reads the other's write);

each with hosts that follow (now) and hosts that only restore at start (the previous
behaviour, wrong with two hosts: kept for its cost), interleaved in one run so the
machine's load weighs on both alike.

Events are sent one at a time, each after the previous 2xx, as a KafkaSource delivers one
partition in order. Figures: CPU seconds of both host process trees (gunicorn master and
worker, from /proc) per event, and client-side request latency p50/p99. The client runs
on the same cores: read latency as an upper bound, CPU per event as the comparable figure.

    .venv/bin/python benchmarks/state_follow.py --state-dir /tmp/s --port-offset 24000
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eventing import topology as topo  # noqa: E402
from eventing.fn import env as host_env  # noqa: E402
from eventing.serde import AVRO_CONTENT_TYPE, AvroSerde  # noqa: E402
from eventing.stack.settings import load_settings  # noqa: E402

VENV_BIN = Path(sys.executable).parent
CARDS = 8
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and its children (gunicorn master + worker)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                pids.append(int(entry))
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLOCK_TICKS


class Host:
    """One functions-framework process serving `score`, as a Knative pod would."""

    def __init__(self, function: topo.Function, bootstrap: str, registry: str, tmp: Path,
                 name: str, follow: bool) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        entry = host_env.write_entry_file(function, tmp / f"entry_{name}.py", bootstrap,
                                          registry)
        if not follow:  # the previous behaviour: restore once, never read the log again
            entry.write_text("from eventing.fn.state import KeyedState\n"
                             "KeyedState.follow = lambda self, bootstrap, *a, **k: "
                             "self.restore(bootstrap)\n" + entry.read_text())
        argv = host_env.serve_command(entry, self.port,
                                      executable=str(VENV_BIN / "functions-framework"))
        self.log = (tmp / f"{name}.log").open("w")
        self.proc = subprocess.Popen(argv, cwd=tmp, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={"PATH": os.environ.get("PATH", ""),
                                          "HOME": os.environ.get("HOME", "/tmp")},
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url, timeout=1).status_code == 405:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise SystemExit(f"host {name} did not start: {(tmp / f'{name}.log').read_text()}")

    def stop(self) -> None:
        os.killpg(self.proc.pid, 15)
        self.proc.wait(30)
        self.log.close()


def payment(run: str, i: int) -> dict:
    return {"payment_id": f"{run}-{i}", "card_id": f"{run}-card-{i % CARDS}",
            "merchant_id": f"m-{i % 11}", "amount": 3.0 + (i * 37) % 400,
            "currency": "EUR", "country": "DE" if i % 9 else "US",
            "event_time": 1_764_000_000_000 + i * 5_000, "amount_eur": 3.0 + (i * 37) % 400,
            "merchant_category": "retail", "card_home_country": "DE"}


def phase(hosts: list[Host], serde: AvroSerde, client: httpx.Client, run: str,
          events: int) -> tuple[float, float, float]:
    """Send `events` payments round-robin over `hosts`; CPU µs/event, p50 and p99 ms."""
    cpu0 = sum(tree_cpu_s(h.proc.pid) for h in hosts)
    lat = []
    for i in range(events):
        p = payment(run, i)
        headers = {"ce-specversion": "1.0", "ce-id": p["payment_id"], "ce-source": "/bench",
                   "ce-type": "com.sluice.payment.enriched", "ce-partitionkey": p["card_id"],
                   "content-type": AVRO_CONTENT_TYPE}
        t0 = time.perf_counter()
        r = client.post(hosts[i % len(hosts)].url, headers=headers,
                        content=serde.encode("payments.enriched", p))
        lat.append((time.perf_counter() - t0) * 1000)
        if r.status_code >= 300:
            raise SystemExit(f"event {i}: {r.status_code} {r.text}")
    cpu = sum(tree_cpu_s(h.proc.pid) for h in hosts) - cpu0
    lat.sort()
    return cpu / events * 1e6, lat[len(lat) // 2], lat[int(len(lat) * 0.99)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state-dir", help="state folder of the running stack")
    ap.add_argument("--port-offset", type=int, default=0)
    ap.add_argument("--events", type=int, default=600, help="per phase and run")
    ap.add_argument("--runs", type=int, default=3, help="medians reported")
    args = ap.parse_args()
    stack = load_settings(state_dir=args.state_dir, port_offset=args.port_offset).with_saved()
    if stack.host != "127.0.0.1":
        raise SystemExit("loopback only")
    function = topo.load(ROOT / "functions" / "topology.yaml").function("score")
    tmp = Path(tempfile.mkdtemp(prefix="statebench-"))
    serde = AvroSerde(stack.registry_url)
    hosts = {mode: [Host(function, stack.bootstrap, stack.registry_url, tmp, f"{mode}-{n}",
                         mode == "follow") for n in ("a", "b")]
             for mode in ("restore", "follow")}
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    try:
        with httpx.Client(timeout=120) as client:  # first requests restore
            for pair in hosts.values():
                phase(pair, serde, client, f"warm-{uuid.uuid4().hex[:6]}", 40)
            for _ in range(args.runs):
                for name in ("one", "two"):
                    for mode, pair in hosts.items():
                        used = pair[:1] if name == "one" else pair
                        results.setdefault((name, mode), []).append(
                            phase(used, serde, client, f"{name}-{uuid.uuid4().hex[:6]}",
                                  args.events))
    finally:
        for pair in hosts.values():
            for h in pair:
                h.stop()
    print(f"score over HTTP, {args.events} events x {args.runs} runs, {CARDS} cards, "
          f"one request in flight (medians; load average {os.getloadavg()[0]:.0f})")
    print(f"{'phase':<6} {'host':<8} {'host CPU µs/event':>18} {'p50 ms':>8} {'p99 ms':>8}")
    for (name, mode), rows in results.items():
        cpu, p50, p99 = (statistics.median(r[k] for r in rows) for k in range(3))
        print(f"{name:<6} {mode:<8} {cpu:>18.0f} {p50:>8.2f} {p99:>8.2f}   "
              f"(runs: {', '.join(f'{r[0]:.0f}' for r in rows)} µs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
