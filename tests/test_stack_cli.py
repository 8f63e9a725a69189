"""`sluice up / status / down` against the real processes, as a user runs them."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from eventing.kafka import consumer_config, ensure_topics, producer_config
from eventing.stack.process import port_open
from eventing.stack.settings import Ports
from tests.helpers import free_port_offset, sluice

pytestmark = pytest.mark.stack  # every test starts `sluice up` stacks of its own

LOOPBACK_HEX = "0100007F"  # 127.0.0.1 in /proc/net/tcp byte order


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(hex address, port) of every TCP socket `pid` listens on."""
    inodes = _socket_inodes(pid)
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in inodes:
                addr, port = local.split(":")
                found.append((addr, int(port, 16)))
    return found


def _status(state: Path, offset: int) -> list[dict]:
    proc = sluice("status", "--json", state_dir=state, offset=offset, check=False)
    return json.loads(proc.stdout)


@pytest.fixture()
def own_stack(tmp_path: Path, stack):  # after the session stack, so offsets differ
    state = tmp_path / "state"
    used = {int(stack.ports.broker - Ports().broker)}
    offset = free_port_offset(start=20350, exclude=used)
    yield state, offset
    sluice("down", "--purge", state_dir=state, offset=offset, check=False)


def test_up_status_down_lifecycle_of_the_whole_stack(own_stack) -> None:
    """What `make up` starts (pipeline and generator included), twice, then down."""
    state, offset = own_stack
    ports = Ports().shifted(offset)
    out = sluice("up", state_dir=state, offset=offset).stdout
    assert "Ready:" in out and f"127.0.0.1:{ports.broker}" in out

    parts = _status(state, offset)
    names = {p["name"] for p in parts}
    assert names == {"objectstore", "broker", "registry", "collector", "tracestore",
                     "prometheus", "realtime", "gateway", "lakesink", "fn-validate", "fn-enrich",
                     "fn-score", "generator", "retention", "supervisor"}
    assert all(p["healthy"] and p["pid"] for p in parts), parts
    pids = {p["name"]: p["pid"] for p in parts}

    # Nothing listens on anything but loopback.
    for name, pid in pids.items():
        addrs = listening_addresses(pid)
        assert addrs or name in ("generator", "tracestore", "retention"), (
            f"{name} listens on nothing?")
        assert all(a == LOOPBACK_HEX for a, _ in addrs), (name, addrs)

    # Running `up` twice starts no duplicates (the supervisor is stopped first and
    # started again, so it never races `up`).
    again = sluice("up", state_dir=state, offset=offset).stdout
    assert again.count("already running") == len(names) - 1
    now = {p["name"]: p["pid"] for p in _status(state, offset)}
    assert {n: p for n, p in now.items() if n != "supervisor"} == {
        n: p for n, p in pids.items() if n != "supervisor"}
    pids["supervisor"] = now["supervisor"]

    down = sluice("down", state_dir=state, offset=offset).stdout
    assert down.count("stopped") == len(names)
    for pid in pids.values():
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    assert not [p for p in ports.all().values() if port_open("127.0.0.1", p, 0.05)]

    sluice("down", "--purge", state_dir=state, offset=offset)
    assert not state.exists()


def test_topics_survive_down_and_up_on_s3_storage(own_stack) -> None:
    state, offset = own_stack
    ports = Ports().shifted(offset)
    sluice("up", "--storage", "s3", "--no-pipeline", state_dir=state, offset=offset)
    bootstrap = f"127.0.0.1:{ports.broker}"
    ensure_topics(bootstrap, {"durable.check": 1})
    producer = Producer(producer_config(bootstrap))
    for i in range(20):
        producer.produce("durable.check", key=b"k", value=f"v{i}".encode())
    assert producer.flush(10) == 0

    sluice("down", state_dir=state, offset=offset)
    assert not [p for p in ports.all().values() if port_open("127.0.0.1", p, 0.05)]
    sluice("up", state_dir=state, offset=offset)  # the saved settings: s3, no pipeline
    assert "(s3)" in sluice("status", state_dir=state, offset=offset).stdout
    consumer = Consumer(consumer_config(bootstrap, f"durable-{time.time_ns()}"))
    consumer.subscribe(["durable.check"])
    values: list[bytes] = []
    deadline = time.monotonic() + 60
    while len(values) < 20 and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            values.append(msg.value())
    consumer.close()
    assert values == [f"v{i}".encode() for i in range(20)]

    sluice("down", "--purge", state_dir=state, offset=offset)
    assert not state.exists()
    assert not [p for p in ports.all().values() if port_open("127.0.0.1", p, 0.05)]


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_up_names_the_part_whose_port_is_taken(tmp_path: Path, stack) -> None:
    used = {int(stack.ports.broker - Ports().broker)}
    offset = free_port_offset(start=20700, exclude=used)
    ports = Ports().shifted(offset)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", ports.broker))
    blocker.listen()
    try:
        proc = sluice("up", "--storage", "memory", state_dir=tmp_path / "s", offset=offset,
                      check=False)
    finally:
        blocker.close()
        sluice("down", "--purge", state_dir=tmp_path / "s", offset=offset, check=False)
    assert proc.returncode == 1
    assert f"broker {ports.broker}" in proc.stderr
    assert "--port-offset" in proc.stderr


def test_up_fails_fast_with_the_log_tail_of_a_part_that_dies(tmp_path: Path, stack) -> None:
    """A part that exits during start (here a `prometheus` on PATH that cannot open its
    storage) stops `up` at once, naming the part, with the tail of its log."""
    used = {int(stack.ports.broker - Ports().broker)}
    offset = free_port_offset(start=21050, exclude=used)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake = fake_bin / "prometheus"
    fake.write_text("#!/bin/sh\necho 'opening storage failed: lock DB directory: busy' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    env = {"PATH": f"{fake_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    started = time.monotonic()
    try:
        proc = sluice("up", "--storage", "memory", "--no-pipeline", state_dir=tmp_path / "s",
                      offset=offset, check=False, env_extra=env)
    finally:
        sluice("down", "--purge", state_dir=tmp_path / "s", offset=offset, check=False)
    assert proc.returncode == 1
    assert "prometheus failed to start: exited during start" in proc.stderr
    assert "opening storage failed: lock DB directory: busy" in proc.stderr
    assert time.monotonic() - started < 60
