"""Where an in-process cold start goes: `sluice run` with a timestamp at each of its steps.

Why: `cold_start.py` gives one figure (process start -> first output); to shorten it one
needs to know which step is on the critical path. This starts the same `sluice run
--function convert` on a fresh topic with the event already waiting, but through a small
wrapper (`--child`) that timestamps, relative to the moment before `Popen`: interpreter
up, `import eventing.cli`, `import eventing.delivery.runner`, `ensure_topics`, `build`
(the dispatcher: clients, subscription, the function host with its user code and
schemas), the group's assignment, the first invoke; and the first output's CreateTime.
CPU seconds of the child are printed beside each mark. `--tree DIR,DIR2` runs other
checkouts' code (PYTHONPATH) interleaved, for a before/after on the same broker.

    .venv/bin/python benchmarks/cold_start_phases.py --bootstrap B --registry R [--repeat 3]

It wraps functions of the runner by name; a step an older checkout lacks (e.g.
`Dispatcher.subscribe` before the early subscription) is left unmarked.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _child() -> int:
    """Inside the measured process: wrap the runner's steps, then run `sluice`."""
    t0 = float(os.environ["SLUICE_PHASES_T0"])

    def mark(what: str) -> None:
        print(f"PHASE {time.time() - t0:7.3f} cpu {time.process_time():.3f} {what}",
              file=sys.stderr, flush=True)

    mark("interpreter up")
    import eventing.cli
    mark("import eventing.cli")
    from eventing.delivery import dispatcher, invoke, runner
    from eventing.fn import runtime
    mark("import eventing.delivery.runner")

    def around(owner: object, name: str, label: str) -> None:
        original = getattr(owner, name, None)
        if original is None:  # an older checkout without this step
            return

        def wrapped(*args: object, **kwargs: object) -> object:
            mark(f"{label} start")
            try:
                return original(*args, **kwargs)
            finally:
                mark(f"{label} end")
        setattr(owner, name, wrapped)

    around(runner, "ensure_topics", "ensure_topics")
    around(runner, "build", "build")
    around(runtime.FunctionHost, "__init__", "function host")
    around(dispatcher.Dispatcher, "subscribe", "subscribe")
    around(invoke.InProcessInvoker, "invoke", "invoke")
    on_assign = dispatcher.Dispatcher._on_assign

    def assigned(self: dispatcher.Dispatcher, consumer: object, partitions: list) -> None:
        mark(f"assigned {len(partitions)} partition(s)")
        on_assign(self, consumer, partitions)
    dispatcher.Dispatcher._on_assign = assigned  # type: ignore[method-assign]
    sys.argv = ["sluice", *sys.argv[2:]]
    return eventing.cli.main()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return _child()
    for p in (str(ROOT), str(HERE), str(HERE / "contenders")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import cold_start as cs
    from confluent_kafka import Producer

    from eventing.cloudevent import event as ce_event
    from eventing.cloudevent import kafka as ce_kafka
    from eventing.kafka import ensure_topics, producer_config
    from eventing.serde import AvroSerde
    from tests.pipeline import payment, register

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--registry", required=True)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tree", default=str(ROOT), help="checkouts to run, comma-separated")
    args = p.parse_args()
    work = Path(f"/tmp/sluice-cold-phases-{uuid.uuid4().hex[:6]}")
    work.mkdir(parents=True)
    seed = f"bench.cold.seed.{uuid.uuid4().hex[:8]}"
    register(args.registry, seed, "payments.raw.avsc")
    pay = payment(1, 1, 12.5, "USD")
    key, value, headers = ce_kafka.to_binary(ce_event.make_event({
        "specversion": "1.0", "id": pay["payment_id"], "source": "/bench",
        "type": "com.sluice.payment.created", "partitionkey": pay["card_id"],
        "datacontenttype": "application/avro"}, AvroSerde(args.registry).encode(seed, pay)))
    trees = args.tree.split(",")
    results: dict[str, list[float]] = {t: [] for t in trees}
    for _ in range(args.repeat):
        for tree in trees:
            run = uuid.uuid4().hex[:8]
            topology, ids = cs._topology(work, run)
            ensure_topics(args.bootstrap, {ids["input"]: 1, ids["output"]: 1, ids["dlq"]: 1})
            register(args.registry, ids["input"], "payments.raw.avsc")
            register(args.registry, ids["output"], cs.CONVERTED_SCHEMA)
            producer = Producer(producer_config(args.bootstrap))
            producer.produce(ids["input"], value, key, headers=headers)
            producer.flush(10)
            t0 = time.time()
            proc = subprocess.Popen(
                [sys.executable, __file__, "--child", "--state-dir", str(work / "state"), "run",
                 "--topology", str(topology), "--function", "convert",
                 "--bootstrap", args.bootstrap, "--registry", args.registry],
                cwd=ROOT, env={**cs._env(), "SLUICE_PHASES_T0": str(t0), "PYTHONPATH": tree},
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                start_new_session=True)
            created = cs._first_output(args.bootstrap, ids["output"], time.monotonic() + 60)
            cs._stop(proc)
            print(f"--- {tree}")
            print("\n".join(line for line in proc.stderr.read().splitlines()  # type: ignore[union-attr]
                            if line.startswith("PHASE")))
            if created is not None:
                results[tree].append(created - t0)
                print(f"first output {created - t0:.3f} s", flush=True)
    for tree, got in results.items():
        if got:
            print(f"{tree}: median {statistics.median(got):.2f} s of {[round(g, 2) for g in got]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
