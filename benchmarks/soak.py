"""Run the example stack for N minutes and print what each part grows by: RSS and disk.

Starts its own stack exactly as `make up` does (`sluice up`: every part, the example
pipeline and its generator at the example's rate), in a fresh state folder on shifted
ports, samples every part every `--interval` seconds, and prints per part the first and
last RSS and disk use and their slopes (least squares, MiB/min, after `--warmup`), then
stops the stack (`down --purge`; `--keep` leaves it running). It asserts nothing: a
slope is a figure to read. Flat broker and trace store lines are what a bound looks like;
the object store grows with the lake (the tables are the product), compaction aside.

    .venv/bin/python benchmarks/soak.py --minutes 30
    .venv/bin/python benchmarks/soak.py --minutes 10 --trace-max-size 32MiB --json out.json

RSS is the part's process and its children (from /proc); disk is the part's data folder
(`.state/data/<part>/`), so the broker on memory storage shows its log in RSS only.

`--broker-max-rss 96MiB` lowers the memory broker's rollover cap (README "Broker
rollover") so a short soak shows the rollovers: the broker's line is then a sawtooth,
read its `peak` column and the rollover count printed at the end.

`--storage s3` runs the broker on the object store (with the retention part `up` adds);
each sample then also counts the broker's objects and bytes in its bucket (`broker-s3`),
since the object store's folder holds the lake too. Whether the pipeline keeps up is
read from the metrics: events the gateway accepted against records the lake sink consumed
for the scored-payments table (`keepup` lines, and `pipeline` in the report).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eventing.stack.process import ProcessDir, is_alive, port_open  # noqa: E402
from eventing.stack.rollover import load_outcomes  # noqa: E402
from eventing.stack.settings import Ports  # noqa: E402
from eventing.telemetry.traces import db_path  # noqa: E402

MiB = 1 << 20


@dataclass
class Series:
    """One part's samples: (minutes since start, RSS bytes, disk bytes)."""

    name: str
    t: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    disk: list[int] = field(default_factory=list)

    def peak(self, values: list[int], warmup_min: float) -> int:
        """The largest sample after the warm-up: a bounded sawtooth (the memory broker's
        rollovers) has a slope near zero but a peak near its cap."""
        return max((v for t, v in zip(self.t, values, strict=True) if t >= warmup_min),
                   default=values[-1] if values else 0)

    def slope(self, values: list[int], warmup_min: float) -> float | None:
        """MiB per minute by least squares over the samples after the warm-up."""
        pts = [(t, v) for t, v in zip(self.t, values, strict=True) if t >= warmup_min]
        if len(pts) < 3 or pts[-1][0] - pts[0][0] <= 0:
            return None
        fit = statistics.linear_regression([t for t, _ in pts], [v for _, v in pts])
        return fit.slope / MiB


def _children(pid: int, parts: frozenset[int] = frozenset()) -> list[int]:
    """Descendants of `pid`, leaving out other parts and their subtrees."""
    try:
        out = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    kids = [c for c in map(int, out) if c not in parts]
    return kids + [g for k in kids for g in _children(k, parts)]


def rss_bytes(pid: int, parts: frozenset[int] = frozenset()) -> int:
    """Resident memory of `pid` and its descendants (VmRSS from /proc), except
    descendants that are parts themselves (`parts`: their pids): a part started by
    another (the broker and the keyed-state functions a rollover restarts are children
    of the `retention` part, a part the supervisor restarted is its child) is counted
    once, under its own name."""
    total = 0
    for p in [pid, *_children(pid, parts)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def disk_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (allocated size would hide sparse files)."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def metric_sum(url: str, name: str, label: str = "") -> float | None:
    """Sum of a Prometheus metric's samples at `url` whose labels contain `label`, or
    None when it does not answer."""
    import httpx

    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if (line.startswith(name + "{") or line.startswith(name + " "))
               and label in line)


def broker_objects(state_dir: Path) -> tuple[int, int] | None:
    """Objects and bytes in the broker's bucket (s3 storage), listed with the retention
    part's S3 client; None when the object store did not answer this time."""
    from eventing.stack.retention import S3
    from eventing.stack.settings import load_settings

    st = load_settings(state_dir=state_dir).with_saved()
    creds = st.credentials
    try:
        keys = S3(st.s3_endpoint, creds.access_key, creds.secret_key, st.region).list(
            st.broker_bucket, "")
    except Exception:  # noqa: BLE001 - a figure missing from one sample
        return None
    return len(keys), sum(size for _, _, size in keys)


def free_offset(start: int = 24000, step: int = 700) -> int:
    for offset in range(start, 31000, step):
        if not any(port_open("127.0.0.1", p, 0.05) for p in Ports().shifted(offset).all().values()):
            return offset
    raise SystemExit("no free port layout for the soak stack")


def sluice(args: argparse.Namespace, *command: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    return subprocess.run([sys.executable, "-m", "eventing.cli", "--state-dir",
                           str(args.state_dir), "--port-offset", str(args.port_offset),
                           *command], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def report(series: dict[str, Series], args: argparse.Namespace, elapsed_min: float) -> dict:
    rows = []
    for s in series.values():
        rows.append({"part": s.name, "samples": len(s.t),
                     "rss_first_mib": s.rss[0] / MiB, "rss_last_mib": s.rss[-1] / MiB,
                     "rss_slope_mib_min": s.slope(s.rss, args.warmup),
                     "rss_peak_mib": s.peak(s.rss, args.warmup) / MiB,
                     "disk_first_mib": s.disk[0] / MiB, "disk_last_mib": s.disk[-1] / MiB,
                     "disk_slope_mib_min": s.slope(s.disk, args.warmup),
                     "series": {"minutes": s.t, "rss": s.rss, "disk": s.disk}})

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:+.2f}"

    print(f"\nsoak: {elapsed_min:.1f} min, sample every {args.interval:.0f} s, slopes after "
          f"{args.warmup:.1f} min (MiB/min)")
    print(f"{'PART':<12} {'RSS MiB':>17} {'slope':>7} {'peak':>7}   {'DISK MiB':>17} "
          f"{'slope':>7}")
    for r in rows:
        print(f"{r['part']:<12} {r['rss_first_mib']:>8.1f}->{r['rss_last_mib']:>7.1f} "
              f"{fmt(r['rss_slope_mib_min']):>7} {r['rss_peak_mib']:>7.1f}   "
              f"{r['disk_first_mib']:>8.1f}->"
              f"{r['disk_last_mib']:>7.1f} {fmt(r['disk_slope_mib_min']):>7}")
    return {"minutes": elapsed_min, "interval_s": args.interval, "warmup_min": args.warmup,
            "rate": args.rate, "trace_max_size": args.trace_max_size, "parts": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="minutes left out of the slopes (start-up, first compaction)")
    p.add_argument("--rate", help="generator payments/s (default: the example's, `up`'s)")
    p.add_argument("--trace-max-size", help="trace store bound, e.g. 32MiB (default: up's)")
    p.add_argument("--trace-retention", help="trace store age bound, e.g. 10m (default: up's)")
    p.add_argument("--storage", choices=["memory", "s3"], help="broker storage (default: up's)")
    p.add_argument("--broker-max-rss", help="memory broker's rollover cap, e.g. 96MiB "
                   "(default: up's); a lower cap shows rollovers within a short soak")
    p.add_argument("--state-dir", type=Path, help="default: a fresh temporary folder")
    p.add_argument("--port-offset", type=int, help="default: the first free layout >= 24000")
    p.add_argument("--keep", action="store_true", help="leave the stack running at the end")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    args.state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="sluice-soak-")) / "state"
    args.port_offset = free_offset() if args.port_offset is None else args.port_offset

    up = ["up"]
    for flag, value in (("--rate", args.rate), ("--trace-max-size", args.trace_max_size),
                        ("--storage", args.storage), ("--broker-max-rss", args.broker_max_rss),
                        ("--trace-retention", args.trace_retention)):
        if value is not None:
            up += [flag, value]
    print(f"starting the stack: state {args.state_dir}, port offset {args.port_offset}",
          flush=True)
    proc = sluice(args, *up)
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr, file=sys.stderr)
        sluice(args, "down", "--purge")
        return 1
    series: dict[str, Series] = {}
    keepup: list[dict] = []
    data = args.state_dir / "data"
    t0 = time.monotonic()
    try:
        while True:
            now_min = (time.monotonic() - t0) / 60
            records = [r for r in ProcessDir(args.state_dir).records() if is_alive(r)]
            pids = frozenset(r.pid for r in records)
            for r in records:
                s = series.setdefault(r.name, Series(r.name))
                s.t.append(now_min)
                s.rss.append(rss_bytes(r.pid, pids))
                s.disk.append(disk_bytes(data / r.name))
            store = db_path(args.state_dir)
            store_mib = disk_bytes(store.parent) / MiB if store.parent.exists() else 0.0
            print(f"  {now_min:5.1f} min  {len(records)} parts up  rss "
                  + " ".join(f"{s.name}={s.rss[-1] / MiB:.0f}" for s in series.values())
                  + f"  traces.db* {store_mib:.1f} MiB", flush=True)
            ports = Ports().shifted(args.port_offset)
            accepted = metric_sum(f"http://127.0.0.1:{ports.gateway}/metrics",
                                  "sluice_gateway_events_total", 'outcome="accepted"')
            landed = metric_sum(f"http://127.0.0.1:{ports.lake_metrics}/metrics",
                                "sluice_lake_records_consumed_total", "payments_scored")
            keepup.append({"minutes": now_min, "accepted": accepted, "landed": landed})
            line = f"  keepup: accepted {accepted} landed {landed}"
            counted = broker_objects(args.state_dir) if args.storage == "s3" else None
            if counted is not None:
                objects, size = counted
                keepup[-1] |= {"broker_objects": objects, "broker_bytes": size}
                b = series.setdefault("broker-s3", Series("broker-s3"))
                b.t.append(now_min)
                b.rss.append(0)
                b.disk.append(size)
                line += f"  broker objects {objects} ({size / MiB:.2f} MiB)"
            print(line, flush=True)
            if now_min >= args.minutes:
                break
            time.sleep(max(0.0, min(args.interval, (args.minutes - now_min) * 60)))
    except KeyboardInterrupt:
        print("interrupted: reporting what was sampled", file=sys.stderr)
    finally:
        elapsed = (time.monotonic() - t0) / 60
        result = report(series, args, elapsed) if series else {}
        if result:
            result["pipeline"] = keepup
        if result:
            result["rollovers"] = load_outcomes(args.state_dir)
            rolled = result["rollovers"]
            print(f"broker rollovers: {rolled.get('rolled', 0)} done, "
                  f"{rolled.get('aborted', 0)} aborted; last: {rolled.get('last')}")
        if args.json and result:
            args.json.write_text(json.dumps(result, indent=2))
        if not args.keep:
            sluice(args, "down", "--purge")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
