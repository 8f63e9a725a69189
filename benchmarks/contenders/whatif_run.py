"""What-if launcher: the unchanged `sluice run` CLI with dispatcher settings varied.

Benchmark-only, to put numbers on suggested changes without editing `eventing/`:

  --cap-ms N     cap the wait of the dispatcher's `consume(batch_size, timeout)`. Idle,
                 it waits up to 100 ms, and librdkafka returns only when the batch is
                 full or the timeout passed, so below batch_size / 0.1 s events per
                 second each record waits up to 100 ms per hop.
  --linger-ms N  the dispatcher producer's `linger.ms` (Sluice's default: see
                 eventing/kafka.py).
  --batch-wait-ms N  the dispatcher's idle consume wait (BATCH_WAIT_S).
  --probe FILE   time each part of every dispatcher cycle (consume call, function +
                 produce, commit = flush + commit) and write percentiles as JSON to FILE
                 at exit: where a hop's latency goes.

    python whatif_run.py [--cap-ms N] [--linger-ms N] -- <sluice CLI arguments>
"""

from __future__ import annotations

import argparse
import atexit
import json
import sys
import time
from pathlib import Path

from common import ROOT  # noqa: F401 - puts the repo on sys.path

from eventing import cli
from eventing.delivery import dispatcher, runner


class CappedConsumer:
    def __init__(self, inner, cap_s: float) -> None:
        self._inner, self._cap = inner, cap_s

    def consume(self, num_messages: int = 1, timeout: float = -1):
        cap = self._cap if timeout < 0 else min(timeout, self._cap)
        return self._inner.consume(num_messages, cap)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class Probe:
    """Durations of the parts of a dispatcher cycle, in ms, kept per call."""

    def __init__(self) -> None:
        self.parts: dict[str, list[float]] = {"consume": [], "invoke": [], "commit": [],
                                              "batch": []}

    def wrap(self, name: str, fn):
        bucket = self.parts[name]

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                bucket.append((time.perf_counter() - t0) * 1000)
        return timed

    def summary(self) -> dict:
        out = {}
        for name, values in self.parts.items():
            v = sorted(values)
            if not v:
                continue
            out[name] = {"calls": len(v), "total_ms": round(sum(v), 1),
                         "p50": round(v[len(v) // 2], 2),
                         "p99": round(v[min(len(v) - 1, int(len(v) * 0.99))], 2),
                         "max": round(v[-1], 2)}
        return out


def probe_dispatcher(d, probe: Probe) -> None:
    inner = d.consumer.consume

    def consume(num_messages: int = 1, timeout: float = -1):
        msgs = probe.wrap("consume", inner)(num_messages, timeout)
        probe.parts["batch"].append(float(len(msgs)))
        return msgs

    d.consumer = _Proxy(d.consumer, consume=consume)
    d.invoker.invoke = probe.wrap("invoke", d.invoker.invoke)
    d.checkpoint.commit = probe.wrap("commit", d.checkpoint.commit)


class _Proxy:
    def __init__(self, inner, **overrides) -> None:
        self._inner = inner
        self.__dict__.update(overrides)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def main() -> int:
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    split = sys.argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--cap-ms", type=float)
    p.add_argument("--linger-ms", type=float)
    p.add_argument("--batch-wait-ms", type=float)
    p.add_argument("--probe")
    opts = p.parse_args(sys.argv[1:split])
    if opts.batch_wait_ms is not None:
        dispatcher.BATCH_WAIT_S = opts.batch_wait_ms / 1000
    probe = Probe()
    if opts.probe:
        atexit.register(lambda: Path(opts.probe).write_text(json.dumps(probe.summary())))
    if opts.linger_ms is not None:
        config = dispatcher.producer_config

        def producer_config(bootstrap, **overrides):
            return config(bootstrap, **{**overrides, "linger.ms": opts.linger_ms})

        dispatcher.producer_config = producer_config
    build = runner.build

    def tuned_build(function, settings, **kwargs):
        d = build(function, settings, **kwargs)
        if opts.cap_ms is not None:
            d.consumer = CappedConsumer(d.consumer, opts.cap_ms / 1000)
        if opts.probe:
            probe_dispatcher(d, probe)
        return d

    runner.build = tuned_build
    return cli.main(sys.argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
