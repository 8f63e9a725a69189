"""Sluice: the real Dispatcher running `benchmarks/convert`, in process or over HTTP.

`--invoke inprocess` builds the dispatcher with `eventing.delivery.runner.build` from a topology
written to a temp dir, exactly as `sluice run` would. `--invoke http|http-batch` also
starts a `functions-framework` process serving `eventing.fn.host` for the function (as
tests/test_invoke_http.py does, and as the function's container does on Knative); its
CPU over the timed window is added to the dispatcher's.

The dispatcher runs its own loop (`Dispatcher.run`); the benchmark only watches: a
wrapper around its consumer starts the clock at the first records, and a stop flag
ends the run once every input succeeded or was dead-lettered. Each dispatcher cycle
flushes the producer before it commits, so at that point every output is acknowledged.

`--profile FILE` runs the timed window under cProfile and writes the stats there.
"""

from __future__ import annotations

import cProfile
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from common import CONVERT, Clock, TimedConsumer, emit, job_args

from eventing import topology as topo
from eventing.delivery.runner import RunSettings, build
from eventing.fn import env as host_env


class Done:
    """The `stop` event Dispatcher.run polls each cycle: set once all inputs are done."""

    def __init__(self, dispatcher, clock: Clock, events: int, deadline: float,
                 profiler: cProfile.Profile | None) -> None:
        self.d, self.clock, self.events, self.deadline = dispatcher, clock, events, deadline
        self.profiler = profiler
        self.profiling = False

    def is_set(self) -> bool:
        st = self.d.stats
        if self.profiler is not None and self.clock.started and not self.profiling:
            self.profiler.enable()
            self.profiling = True
        if st.succeeded + st.dead_lettered >= self.events:
            self.clock.stop()  # the cycle that finished them flushed: outputs acknowledged
            if self.profiling:
                self.profiler.disable()
            return True
        if time.monotonic() > self.deadline:
            if self.clock.started:
                self.clock.stop()  # incomplete: run.py reports the shortfall
            return True
        return False


def write_topology(tmp: Path, args, url: str | None) -> Path:
    spec = {
        "topics": {args.input: {"partitions": 4}, args.output: {"partitions": 4},
                   args.dlq: {"partitions": 1}},
        "functions": {"convert": {
            "source": str(CONVERT),
            "topics": [args.input], "outputs": [args.output],
            "consumerGroup": args.group,
            "invoke": args.invoke,
            "batchSize": args.batch_size,
            "delivery": {"ordering": "ordered", "deadLetterSink": args.dlq},
            **({"url": url} if url else {}),
        }},
    }
    path = tmp / "topology.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(function: topo.Function, args, tmp: Path) -> tuple[subprocess.Popen, str]:
    """functions-framework serving the host; returns once the worker's host is built."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    entry = host_env.write_entry_file(function, tmp / "entry_convert.py", args.bootstrap,
                                      args.registry)
    argv = host_env.serve_command(
        entry, port, executable=str(Path(sys.executable).parent / "functions-framework"))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHONUNBUFFERED": "1"}
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(argv, env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 90  # a loaded 2-core machine took > 30 s to start it
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)  # its own session: nothing else would stop it
            raise SystemExit(f"function server did not start: {(tmp / 'server.log').read_text()}")
        try:
            # An empty batch makes the worker build its serde and Kafka producer now,
            # outside the timed window (they are created lazily on the first request).
            req = urllib.request.Request(url, data=b"[]", method="POST", headers={
                "content-type": "application/cloudevents-batch+json"})
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return proc, url
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # gunicorn master and worker, started here
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def main() -> None:
    p = job_args(__doc__.splitlines()[0])
    p.add_argument("--invoke", choices=["inprocess", "http", "http-batch"], default="inprocess")
    p.add_argument("--batch-size", type=int, default=500, help="topology batchSize")
    p.add_argument("--profile", help="write cProfile stats of the timed window here")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    server = None
    url = None
    if args.invoke != "inprocess":
        # The server needs the function (outputs) before the topology can name its URL.
        fn0 = topo.load(write_topology(tmp, args, "http://127.0.0.1:1/")).function("convert")
        server, url = start_server(fn0, args, tmp)
    try:
        function = topo.load(write_topology(tmp, args, url)).function("convert")
        dispatcher = build(function, RunSettings(args.bootstrap, args.registry))
        clock = Clock(extra_pids=(server.pid,) if server else ())
        dispatcher.consumer = TimedConsumer(dispatcher.consumer, clock)
        profiler = cProfile.Profile() if args.profile else None
        done = Done(dispatcher, clock, args.events, time.monotonic() + args.timeout, profiler)
        stats = dispatcher.run(done)  # type: ignore[arg-type]  # duck-typed Event
        if profiler is not None:
            profiler.dump_stats(args.profile)
        emit(clock.result(stats.consumed, outputs=None, succeeded=stats.succeeded,
                          dead_lettered=stats.dead_lettered, retries=stats.retries,
                          batches=stats.batches, commits=stats.commits,
                          invoke=args.invoke))
    finally:
        if server is not None:
            stop_server(server)


if __name__ == "__main__":
    main()
