"""How long each part's liveness probe takes on a running stack: the margin behind
`settings.Liveness.timeout_s` (probes must not flap on a loaded 2-core machine).

    .venv/bin/python benchmarks/liveness_probes.py --state-dir .state --seconds 120
    .venv/bin/python benchmarks/liveness_probes.py --state-dir .state --via-httpx

Probes every part that has one, round after round (0.5 s apart), and prints per part
p50, p99, max and failures, with the load average. `--via-httpx` times the same HTTP
endpoints with `httpx.request` instead (what the probes used first: it builds a client
and loads the CA bundle on every call). Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import httpx

from eventing.stack.settings import load_settings
from eventing.stack.supervisor import Stack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state-dir", default=".state")
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--via-httpx", action="store_true")
    a = ap.parse_args()
    settings = load_settings(state_dir=a.state_dir).with_saved()
    specs = [f(settings) for f in Stack(settings).factories]
    probes = {s.name: s.liveness for s in specs if s.liveness is not None}
    if a.via_httpx:
        urls = {s.name: getattr(s.liveness, "url", None) for s in specs if s.liveness}
        probes = {n: (lambda t, u=u: httpx.get(u, timeout=t)) for n, u in urls.items() if u}
    took: dict[str, list[float]] = {n: [] for n in probes}
    failed = dict.fromkeys(probes, 0)
    end = time.monotonic() + a.seconds
    while time.monotonic() < end:
        for name, probe in probes.items():
            t0 = time.perf_counter()
            try:
                probe(a.timeout)
            except Exception:  # noqa: BLE001 - counted
                failed[name] += 1
            took[name].append(time.perf_counter() - t0)
        time.sleep(0.5)
    print(f"load average {os.getloadavg()[0]:.1f} ({'httpx.request' if a.via_httpx else 'probes'})")
    for name, d in took.items():
        d.sort()
        print(f"{name:12} n={len(d)} p50={statistics.median(d) * 1000:.1f}ms "
              f"p99={d[max(0, int(len(d) * 0.99) - 1)] * 1000:.1f}ms "
              f"max={d[-1] * 1000:.1f}ms failures={failed[name]}")


if __name__ == "__main__":
    main()
