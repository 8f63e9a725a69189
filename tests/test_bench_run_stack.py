"""`benchmarks/run.py --quick` end to end: its own stack, the cheap rows, one summary table.

Runs the real script as a user would (it starts and purges its own stack on a free port
offset) with the parts that take seconds at `--quick` counts: the floor, Sluice in
process, one POST per event, the functions-framework baseline, cold start in both modes
and 1 vs 2 replicas. Checks that the summary names every row of the issue's table, that
the rows measured carry numbers (figures, references, ratios) and that every contender's
outputs were read back and counted right. No timing is asserted: on a shared machine the
figures mean nothing; that they are produced, and produced from checked runs, does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port_offset, sluice

sys.path.insert(0, str(ROOT / "benchmarks"))
import summary  # noqa: E402

pytestmark = pytest.mark.stack

CHEAP = ["floor", "sluice", "sluice-http", "ff-baseline", "cold-start", "replicas"]
MEASURED = {"cpu_vs_floor", "throughput_vs_floor", "http_vs_ff_baseline",
            "cold_start_inprocess", "cold_start_http", "replicas"}


@pytest.mark.timeout(1200)  # ~3 min on a quiet machine; > 5 at load average 35
def test_quick_run_prints_every_row_with_numbers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    state, offset = tmp_path / "state", free_port_offset()
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick",
           "--port-offset", str(offset), "--state-dir", str(state),
           "--log-dir", str(tmp_path / "logs"), "--json", str(out),
           "--replica-events", "2000", *(a for part in CHEAP for a in ("--only", part))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stdout, stderr = proc.communicate(timeout=1080)
    except subprocess.TimeoutExpired:
        proc.terminate()  # run.py unwinds on SIGTERM and purges its stack
        stdout, stderr = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            proc.kill()
        sluice("down", "--purge", state_dir=state, offset=offset, check=False)
    tail = f"\n{stdout[-4000:]}\n{stderr[-4000:]}"
    assert proc.returncode == 0, tail
    table = stdout[stdout.index("Summary:"):]
    for name in summary.ROW_NAMES:
        assert name in table, f"row {name!r} missing{tail}"
    report = json.loads(out.read_text())
    assert not report.get("errors"), report.get("errors")
    rows = {r["key"]: r for r in report["summary"]}
    assert set(rows) == {key for key, *_ in summary.ROWS}
    for key in MEASURED:
        row = rows[key]
        for field in ("value", "reference_value", "ratio"):
            assert isinstance(row[field], float | int) and row[field] > 0, (key, row)
    for key in set(rows) - MEASURED:
        assert rows[key]["figure"] == "not run" and rows[key]["value"] is None, rows[key]
    for name in ("floor", "sluice", "sluice-http", "ff-baseline"):
        c = report["rows"][name]
        assert c["ok"], f"{name}: outputs {c['outputs']} vs {c['expected']}"
    for n in ("1", "2"):
        r = report["replicas"][n]
        assert r["ok"], r
        assert sum(r["per_replica_events"]) >= r["events"]
    # two replicas share the work: both processed some of the timed records
    assert all(e > 0 for e in report["replicas"]["2"]["per_replica_events"])
    assert report["cold_start"]["http"]["completed"] == 1
    assert report["cold_start"]["inprocess"]["completed"] == 1
