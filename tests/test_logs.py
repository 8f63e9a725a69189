"""Part logs stay bounded by size-based rotation while a real process writes them, and
`sluice logs` (last lines and -f) reads across the rotated files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from eventing.stack import logs
from eventing.stack.process import PartSpec, ProcessDir
from eventing.stack.settings import LogRotation
from tests.test_cli_dx import nowhere, run  # noqa: F401 - fixture

WRITER = """
import sys, time
n = 0
while True:
    print(f"line {n:07d} " + "x" * 80, flush=True)
    n += 1
    if n % 50 == 0:
        time.sleep(0.005)
"""


def _numbers(files: list[Path]) -> list[int]:
    out = []
    for f in files:
        for line in f.read_bytes().splitlines():
            if line.startswith(b"line "):
                out.append(int(line.split()[1]))
    return out


def test_a_live_log_is_bounded_and_its_lines_stay_in_order(tmp_path: Path) -> None:
    """A part writing ~1 MiB/s through its inherited O_APPEND descriptor: rotated every
    64 KiB, at most keep+1 files of about that size, every line in order across them,
    none twice, and no hole of NUL bytes after a truncate."""
    rotation = LogRotation(max_bytes=64 * 1024, keep=3)
    procs = ProcessDir(tmp_path, rotation)
    record = procs.start(PartSpec(name="chatty", argv=[sys.executable, "-c", WRITER],
                                  endpoint="", health=lambda: True, env=dict(os.environ)))
    path = Path(record.log)
    rotations = 0
    try:
        deadline = time.monotonic() + 60
        while rotations < 12 and time.monotonic() < deadline:
            if logs.rotate_if_needed(path, rotation):
                rotations += 1
            time.sleep(0.02)
    finally:
        procs.stop(record, timeout=2)
    assert rotations == 12
    files = logs.files(path)
    assert files == [logs.rotated(path, 3), logs.rotated(path, 2), logs.rotated(path, 1), path]
    assert not logs.rotated(path, 4).exists()
    for f in files[:-1]:
        data = f.read_bytes()
        assert b"\0" not in data
        # Over the bound by what was written between two checks (20 ms), no more.
        assert 64 * 1024 <= len(data) < 4 * 64 * 1024, (f, len(data))
    numbers = _numbers(files)
    assert numbers == sorted(set(numbers)), "lines out of order or written twice"
    missing = numbers[-1] - numbers[0] + 1 - len(numbers)
    # A line written between the last copy and the truncate is lost (module docstring):
    # at most a few per rotation, and in practice none.
    assert missing <= rotations, f"{missing} lines lost in {rotations} rotations"


def test_last_lines_and_follow_read_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "p.log"
    path.write_bytes(b"".join(b"a%d\n" % i for i in range(5)))
    logs.rotate(path, keep=2)
    with open(path, "ab") as fh:
        fh.write(b"b0\nb1\n")
    follower = logs.Follower(path)
    with open(path, "ab") as fh:
        fh.write(b"b2\n")
    logs.rotate(path, keep=2)  # b2 now only in .1: the follower must still see it
    with open(path, "ab") as fh:
        fh.write(b"c0\n")
    assert follower.read() == b"b2\nc0\n"
    # Caught mid-rotation (`.1` shifted to `.2`, the new `.1` not in place): it waits
    # rather than reading the live file from its start again.
    os.replace(logs.rotated(path, 1), logs.rotated(path, 2))
    with open(path, "ab") as fh:
        fh.write(b"c1\n")
    assert follower.read() == b""
    os.replace(logs.rotated(path, 2), logs.rotated(path, 1))
    assert follower.read() == b"c1\n"
    assert logs.last_lines(path, 4) == [b"b1\n", b"b2\n", b"c0\n", b"c1\n"]
    assert logs.last_lines(path, 0) == [b"b0\n", b"b1\n", b"b2\n", b"c0\n", b"c1\n"]
    logs.rotate(path, keep=2)
    logs.rotate(path, keep=2)  # .2 (the b-lines) dropped: two old files kept
    assert logs.files(path) == [logs.rotated(path, 2), logs.rotated(path, 1), path]
    assert logs.last_lines(path, 0) == [b"c0\n", b"c1\n"]


def test_sluice_logs_prints_lines_from_rotated_files(tmp_path: Path, nowhere) -> None:  # noqa: F811
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    log = state / "logs" / "gateway.log"
    log.write_text("old one\nold two\n")
    logs.rotate(log, keep=5)
    log.write_text("new one\n")
    proc = run("logs", "gateway", "-n", "3", where=(state, nowhere[1]))
    assert proc.returncode == 0 and proc.stdout == "old one\nold two\nnew one\n"

    follow = subprocess.Popen([sys.executable, "-m", "eventing.cli", "--state-dir", str(state),
                               "logs", "gateway", "-f", "-n", "1"],
                              stdout=subprocess.PIPE, text=True)
    try:
        first = follow.stdout.readline()
        assert first == "new one\n", first
        with open(log, "a") as fh:
            fh.write("before rotation\n")
        logs.rotate(log, keep=5)
        with open(log, "a") as fh:
            fh.write("after rotation\n")
        assert follow.stdout.readline() == "before rotation\n"  # from .1
        assert follow.stdout.readline() == "after rotation\n"
    finally:
        follow.terminate()
        follow.wait(10)
