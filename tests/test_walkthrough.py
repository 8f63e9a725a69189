"""The new user's path, end to end, on a stack of its own: new project, new function,
invoke, up, publish, tail, a poison event into dead letters, fix, redrive.

Runs the CLI as a user does, from inside the new project's folder (the project is found
from the current folder, its state in `<project>/.state`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import free_port_offset, wait_until

pytestmark = [pytest.mark.stack, pytest.mark.timeout(600)]

FIXED = '''
import functions_framework
from cloudevents.http import CloudEvent


@functions_framework.cloud_event
def resize(event: CloudEvent) -> dict:
    item = event.data
    return {"id": item["id"], "amount": abs(item["amount"]) * 2}   # negatives are refunds
'''


class User:
    """Runs `sluice` from the project folder, on ports of its own."""

    def __init__(self, project: Path, offset: int) -> None:
        self.project = project
        self.offset = offset

    def __call__(self, *args: str, timeout: float = 180, check: bool = True
                 ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
        env["SLUICE_PORT_OFFSET"] = str(self.offset)
        proc = subprocess.run([sys.executable, "-m", "eventing.cli", *args],
                              capture_output=True, text=True, timeout=timeout,
                              cwd=self.project, env=env)
        if check and proc.returncode != 0:
            raise AssertionError(f"sluice {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc


def test_new_user_walkthrough(tmp_path: Path) -> None:
    project = tmp_path / "shop"
    user = User(tmp_path, free_port_offset(start=23500))
    user("new", "project", str(project))
    user = User(project, user.offset)
    user("new", "function", "resize")

    # Try the function before any stack runs: the project's schema files stand in.
    out = json.loads(user("invoke", "resize", "--data", '{"id": "a", "amount": 2.5}',
                          "-o", "json").stdout)
    assert [o["data"] for o in out["outputs"]] == [{"id": "a", "amount": 5.0}]

    # Keep the function's output as a table: give its schema a time field (a default, so
    # the function need not set it) and declare the table in the project's topology.
    schema = json.loads((project / "schemas" / "resize.in.avsc").read_text())
    schema["name"] += "Out"
    schema["fields"].append({"name": "event_time", "type": "long", "default": 0})
    (project / "schemas" / "resize.out.avsc").write_text(json.dumps(schema, indent=2))
    topology_file = project / "functions" / "topology.yaml"
    topology = yaml.safe_load(topology_file.read_text())
    topology["tables"] = {"resize_out": {"topic": "resize.out", "timeField": "event_time"}}
    topology_file.write_text(yaml.safe_dump(topology, sort_keys=False))
    try:
        user("up", "--storage", "memory", "--no-generator", timeout=300)
        assert (project / ".state" / "stack.json").exists()
        status = json.loads(user("status", "-o", "json", check=False).stdout)
        assert {"gateway", "fn-resize"} <= {p["name"] for p in status if p["healthy"]}

        events = project / "events.jsonl"
        events.write_text("\n".join(json.dumps(
            {"type": "dev.shop.resize.in", "id": f"e-{i}", "partitionkey": f"k-{i}",
             "data": {"id": f"e-{i}", "amount": float(i)}}) for i in (1, 2, 3)) + "\n")
        assert "published 3 events" in user("publish", "--file", str(events)).stdout

        tail = user("tail", "resize.out", "--from-beginning", "-n", "3", "--timeout", "60",
                    "-o", "json")
        rows = [json.loads(line) for line in tail.stdout.splitlines()]
        assert sorted(r["data"]["amount"] for r in rows) == [2.0, 4.0, 6.0]

        # A poison event: the function rejects it, so it is dead-lettered at once.
        user("publish", "--type", "dev.shop.resize.in", "--id", "poison", "--key", "k-9",
             "--data", '{"id": "poison", "amount": -4.0}')

        def dead() -> list[dict]:
            return json.loads(user("deadletters", "list", "--function", "resize",
                                   "-o", "json").stdout)

        letters = wait_until(lambda: dead() or None, 60, "the poison event dead-lettered")
        [letter] = letters
        assert letter["id"] == "poison" and letter["code"] == "422"
        assert letter["error"] == "Reject: amount must not be negative"
        assert letter["source"].startswith("resize.in/")

        # Fix the function, restart its process (the broker keeps the topics), redrive.
        (project / "functions" / "resize" / "main.py").write_text(FIXED)
        [fn] = [p for p in status if p["name"] == "fn-resize"]
        stop_process_by_pid(fn["pid"])
        user("up", "--no-generator", timeout=300)  # starts what is not running
        redriven = json.loads(user("deadletters", "redrive", "--id", letter["ref"],
                                   "-o", "json").stdout)
        assert [r["OUTCOME"] for r in redriven] == ["redriven"]
        again = json.loads(user("deadletters", "redrive", "--id", letter["ref"],
                                "-o", "json").stdout)
        assert [r["OUTCOME"] for r in again] == ["skipped"]

        fixed = user("tail", "resize.out", "--from-beginning", "-n", "1", "--timeout", "60",
                     "--filter", "data.id=poison", "-o", "json")
        [row] = [json.loads(line) for line in fixed.stdout.splitlines()]
        assert row["data"]["id"] == "poison" and row["data"]["amount"] == 8.0
        assert row["key"] == "k-9"

        # The table holds every output once: e-1..e-3 and the redriven poison event.
        def table() -> list | None:
            proc = user("query", "SELECT id, amount FROM resize_out ORDER BY id", "-o", "json",
                        check=False)
            rows = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else []
            return rows if len(rows) >= 4 else None

        rows = wait_until(table, 120, "the lake table holds the four outputs")
        assert [(r["id"], r["amount"]) for r in rows] == [
            ("e-1", 2.0), ("e-2", 4.0), ("e-3", 6.0), ("poison", 8.0)]
    finally:
        user("down", "--purge", check=False, timeout=120)


def stop_process_by_pid(pid: int) -> None:
    """Stop one part the test's own `sluice up` started, by its pid (as `down` does)."""
    import signal

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] == "Z"

    wait_until(gone, 30, f"part pid {pid} stopped")

