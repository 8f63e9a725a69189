"""Shared fixtures: one real local stack per test session, on shifted ports.

The stack is started through the same CLI a user runs (`sluice up`), with memory
storage for speed, in a temporary state folder, and stopped (`sluice down --purge`) at
the end, so the suite never touches a developer's running stack.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventing.stack.process import port_open
from eventing.stack.settings import Ports, StackSettings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def free_port_offset(start: int = 20000, step: int = 700, exclude: set[int] = frozenset()) -> int:
    """First offset whose whole port layout is free on loopback."""
    for offset in range(start, 31000, step):
        if offset in exclude:
            continue
        if not any(port_open("127.0.0.1", p, 0.05) for p in Ports().shifted(offset).all().values()):
            return offset
    raise RuntimeError("no free port layout found for a test stack")


def sluice(*args: str, state_dir: Path, offset: int, timeout: float = 120,
           check: bool = True, env_extra: dict[str, str] | None = None,
           ) -> subprocess.CompletedProcess[str]:
    """Run the `sluice` CLI exactly as a user would, against one state folder."""
    cmd = [sys.executable, "-m", "eventing.cli", "--state-dir", str(state_dir),
           "--port-offset", str(offset), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env |= env_extra or {}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackSettings]:
    """The running infrastructure (memory broker storage) for the whole session."""
    state = tmp_path_factory.mktemp("stack") / "state"
    offset = free_port_offset()
    try:
        sluice("up", "--storage", "memory", "--no-pipeline", state_dir=state, offset=offset)
        yield load_settings(state_dir=state, port_offset=offset, broker_storage="memory")
    finally:
        sluice("down", "--purge", state_dir=state, offset=offset, check=False)


@pytest.fixture(scope="session")
def pipeline(stack: StackSettings) -> StackSettings:
    """The example pipeline (gateway + functions of functions/topology.yaml) on `stack`,
    added by a second `sluice up` exactly as a user would."""
    offset = stack.ports.broker - Ports().broker
    sluice("up", "--no-generator", state_dir=stack.state_dir, offset=offset)
    return stack
