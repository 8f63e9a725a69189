"""What-if launcher: the unchanged `sluice run` CLI with dispatcher settings varied.

Benchmark-only, to put numbers on suggested changes without editing `eventing/`:

  --cap-ms N     cap the wait of the dispatcher's `consume(batch_size, timeout)`. Idle,
                 it waits up to 100 ms, and librdkafka returns only when the batch is
                 full or the timeout passed, so below batch_size / 0.1 s events per
                 second each record waits up to 100 ms per hop.
  --linger-ms N  the dispatcher producer's `linger.ms` (Sluice's default is 5). The
                 dispatcher flushes at the end of every cycle, so linger only delays
                 that flush: each cycle pays at least linger.ms before it can commit.

    python whatif_run.py [--cap-ms N] [--linger-ms N] -- <sluice CLI arguments>
"""

from __future__ import annotations

import argparse
import sys

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


def main() -> int:
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    split = sys.argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--cap-ms", type=float)
    p.add_argument("--linger-ms", type=float)
    opts = p.parse_args(sys.argv[1:split])
    if opts.linger_ms is not None:
        config = dispatcher.producer_config

        def producer_config(bootstrap, **overrides):
            return config(bootstrap, **{**overrides, "linger.ms": opts.linger_ms})

        dispatcher.producer_config = producer_config
    if opts.cap_ms is not None:
        build = runner.build

        def capped_build(function, settings, **kwargs):
            d = build(function, settings, **kwargs)
            d.consumer = CappedConsumer(d.consumer, opts.cap_ms / 1000)
            return d

        runner.build = capped_build
    return cli.main(sys.argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
