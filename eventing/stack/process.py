"""Start, find and stop one detached local process, remembered by a pid file.

Why detached processes with pid records instead of one foreground supervisor: `sluice up`
returns once the stack is healthy, and `sluice down` must stop exactly what `up` started
and nothing else. A pid alone can be recycled by the OS, so each record also keeps the
process start time (from /proc) and `down` kills only a pid whose start time still
matches.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eventing.stack import logs
from eventing.stack.settings import LogRotation

HealthCheck = Callable[[], bool]
# A liveness probe: returns when the part answered within `timeout` seconds, raises
# (the message is the reason `sluice status` shows) when it did not.
LivenessProbe = Callable[[float], None]


@dataclass
class PartSpec:
    """How to run one part of the stack: its command, environment and health check."""

    name: str
    argv: list[str]
    endpoint: str
    health: HealthCheck
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    start_timeout: float = 30.0
    # Listening ports, checked free before start so a clash is named, not a mystery.
    ports: list[int] = field(default_factory=list)
    # What the supervisor probes to find the part hung (`watchdog.Prober`): a cheap check
    # of the process itself, not of what it depends on. None: supervised by exit only.
    liveness: LivenessProbe | None = None


@dataclass
class PartRecord:
    """What `up` wrote down about a started part; `status` and `down` read it back."""

    name: str
    pid: int
    start_ticks: int
    started_at: float
    endpoint: str
    log: str
    argv: list[str]

    @staticmethod
    def load(path: Path) -> PartRecord | None:
        try:
            return PartRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def proc_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    rest = stat[stat.rindex(")") + 2 :].split()
    if rest[0] == "Z":  # a zombie has exited; it only waits to be reaped
        return None
    return int(rest[19])


def is_alive(record: PartRecord) -> bool:
    return proc_start_ticks(record.pid) == record.start_ticks


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class ProcessDir:
    """The `run/` and `logs/` folders of one state folder."""

    def __init__(self, state_dir: Path, rotation: LogRotation | None = None) -> None:
        self.run_dir = state_dir / "run"
        self.log_dir = state_dir / "logs"
        self.rotation = rotation or LogRotation()
        # The Popen of the last `start`: the supervisor keeps it to read the exit status.
        self.last_child: subprocess.Popen | None = None

    def stopping_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.stopping"

    def stopping(self, name: str) -> bool:
        """Whether `stop` is under way for `name` (the supervisor must not restart it)."""
        return self.stopping_path(name).exists()

    def record_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def held_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.held"

    def hold(self, record: PartRecord, timeout: float = 15.0) -> bool:
        """Stop a part that its stopper will start again (a broker rollover stops the
        functions with keyed state). Its record is kept as `<name>.held`, so the
        supervisor can tell it from a part `down` stopped and bring it back if the
        stopper dies before starting it (`watchdog.Supervisor`). `start` releases it."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.held_path(record.name).write_text(json.dumps(asdict(record), indent=2))
        return self.stop(record, timeout)

    def held(self, name: str) -> PartRecord | None:
        """The record of `name` as it was when `hold` stopped it, or None."""
        return PartRecord.load(self.held_path(name))

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def record(self, name: str) -> PartRecord | None:
        return PartRecord.load(self.record_path(name))

    def records(self) -> list[PartRecord]:
        if not self.run_dir.exists():
            return []
        found = (PartRecord.load(p) for p in sorted(self.run_dir.glob("*.json")))
        return [r for r in found if r is not None]

    def start(self, spec: PartSpec) -> PartRecord:
        """Spawn `spec` in its own session, its output appended to its log file."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path(spec.name)
        logs.rotate_if_needed(log_path, self.rotation)
        # O_APPEND ("ab"), inherited by the part: what lets `logs.rotate` truncate it.
        with open(log_path, "ab") as log:
            log.write(f"\n--- start {time.strftime('%Y-%m-%dT%H:%M:%S')} ---\n".encode())
            log.flush()
            proc = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=spec.env,
                cwd=spec.cwd,
                start_new_session=True,
                close_fds=True,
            )
        ticks = None
        for _ in range(100):
            ticks = proc_start_ticks(proc.pid)
            if ticks is not None:
                break
            time.sleep(0.01)
        record = PartRecord(
            name=spec.name,
            pid=proc.pid,
            start_ticks=ticks or -1,
            started_at=time.time(),
            endpoint=spec.endpoint,
            log=str(log_path),
            argv=spec.argv,
        )
        self.record_path(spec.name).write_text(json.dumps(asdict(record), indent=2))
        self.held_path(spec.name).unlink(missing_ok=True)  # started: no longer held
        self.last_child = proc
        return record

    def stop(self, record: PartRecord, timeout: float = 15.0) -> bool:
        """Stop the recorded process group: SIGTERM, then SIGKILL after `timeout`.

        Returns True if something was stopped. A record whose pid now belongs to another
        process (start time differs) is only forgotten: that process is not ours.
        """
        marker = self.stopping_path(record.name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        marker.touch()
        try:
            return self._stop(record, timeout)
        finally:
            marker.unlink(missing_ok=True)

    def _stop(self, record: PartRecord, timeout: float) -> bool:
        stopped = False
        if is_alive(record):
            stopped = True
            terminate(record)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and is_alive(record):
                time.sleep(0.05)
            if is_alive(record):
                kill(record)
                while is_alive(record):
                    time.sleep(0.05)
        # Children left in the group (none expected) are ours too.
        _signal_group(record.pid, signal.SIGKILL, only_if_group_exists=True)
        self.record_path(record.name).unlink(missing_ok=True)
        return stopped


def terminate(record: PartRecord) -> None:
    """SIGTERM to the part's process group, then SIGCONT: a stopped (SIGSTOPped) process
    would otherwise hold the SIGTERM pending and never shut down gracefully."""
    if is_alive(record):
        _signal_group(record.pid, signal.SIGTERM)
        _signal_group(record.pid, signal.SIGCONT, only_if_group_exists=True)


def kill(record: PartRecord) -> None:
    """SIGKILL to the part's process group (only while the record's process is alive)."""
    if is_alive(record):
        _signal_group(record.pid, signal.SIGKILL)


def _signal_group(pid: int, sig: int, only_if_group_exists: bool = False) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    except PermissionError:
        if not only_if_group_exists:
            raise


def wait_healthy(spec: PartSpec, record: PartRecord, timeout: float | None = None) -> str | None:
    """Poll the health check until it passes. Returns None on success, else a reason."""
    deadline = time.monotonic() + (timeout or spec.start_timeout)
    while time.monotonic() < deadline:
        if not is_alive(record):
            return "exited during start"
        try:
            if spec.health():
                return None
        except Exception:  # noqa: BLE001 - a failing probe means "not yet"
            pass
        time.sleep(0.1)
    return f"not healthy after {timeout or spec.start_timeout:.0f}s"


def tail(path: str | Path, lines: int = 20) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])
