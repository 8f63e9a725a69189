"""Wire a topology's functions into dispatchers and run them until told to stop.

`sluice run` calls this in the foreground; `sluice up` starts one process per function
(`sluice run --function NAME`) so each function has its own pid, log and core, and one
slow function cannot starve another of the GIL.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from confluent_kafka import Producer

from eventing.delivery.dispatcher import Dispatcher, Stats
from eventing.delivery.invoke import InProcessInvoker, Invoker
from eventing.fn.runtime import FunctionHost
from eventing.kafka import client_tuning, ensure_topics
from eventing.topology import Function, Topology

log = logging.getLogger("sluice.runner")


@dataclass(frozen=True)
class RunSettings:
    bootstrap: str
    registry_url: str | None
    # The broker's storage, for its client tuning (`eventing.kafka.client_tuning`).
    broker_storage: str | None = None


def make_serde(registry_url: str | None):
    if not registry_url:
        return None
    from eventing.serde import AvroSerde

    return AvroSerde(registry_url)


def build(function: Function, settings: RunSettings, **kwargs) -> Dispatcher:
    """A dispatcher for `function` with the invoker its topology entry asks for."""
    tuning = client_tuning(settings.broker_storage)
    kwargs["consumer_overrides"] = {**tuning.consumer, **(kwargs.get("consumer_overrides") or {})}
    kwargs.setdefault("producer_overrides", tuning.stream_producer)
    if function.invoke == "inprocess":
        # The host (user code, registry client, output schemas) is built by the factory,
        # so a dispatcher that subscribes first builds it while its group join runs.
        # State changes reach the changelog only after their events' outputs are
        # acknowledged (`Checkpoint.commit` step 3 says why).
        hosts: list[FunctionHost] = []

        def factory(producer: Producer) -> Invoker:
            hosts.append(FunctionHost(function, make_serde(settings.registry_url),
                                      defer_state=True))
            return InProcessInvoker(hosts[0], producer)

        def restore() -> None:
            # Restored again on every assignment: keys may have moved between instances.
            if hosts and hosts[0].stores:
                hosts[0].restore_state(settings.bootstrap, consumer_overrides=tuning.consumer)

        kwargs.setdefault("on_assign", restore)
        return Dispatcher(function, settings.bootstrap, factory, **kwargs)
    from eventing.delivery.http import HttpInvoker

    if not function.url:
        raise ValueError(f"function {function.name!r}: invoke {function.invoke} needs `url`")
    return Dispatcher(function, settings.bootstrap, lambda p: HttpInvoker(
        function, function.url, batched=function.invoke == "http-batch"), **kwargs)


def run(topology: Topology, names: list[str], settings: RunSettings, stop: threading.Event,
        metrics: tuple[str, int] | None = None) -> dict[str, Stats]:
    """Run the named functions (all if empty), each in its own thread, until `stop`.

    A dispatcher that dies (e.g. outputs not acknowledged) stops the others and the
    error is raised: the process exits, and a restart resumes from the last commit.
    """
    ensure_topics(settings.bootstrap, topology.all_topics())
    functions = [topology.function(n) for n in names] if names else list(
        topology.functions.values())
    dispatchers = {f.name: build(f, settings, subscribe_first=True) for f in functions}
    if metrics:
        from eventing.telemetry.metrics import serve_dispatcher_metrics

        serve_dispatcher_metrics(dispatchers, *metrics)
    errors: list[BaseException] = []

    def guarded(d: Dispatcher) -> None:
        try:
            d.run(stop)
        except BaseException as exc:
            log.exception("dispatcher %s failed", d.function.name)
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=guarded, args=(d,), name=f"dispatch-{n}", daemon=True)
               for n, d in dispatchers.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {n: d.stats for n, d in dispatchers.items()}
