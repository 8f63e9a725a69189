"""The stream clients take their broker storage's tuning (`eventing.kafka.client_tuning`).

On s3 storage a 10 ms fetch wait crowds the object store (see `eventing.kafka`), on memory
a longer wait is pure latency: so the dispatcher built for a stack must carry the tuning of
that stack's storage, and an explicit override from the caller must still win.
"""

from __future__ import annotations

from typing import Any

import pytest

from eventing.delivery import dispatcher as dispatcher_mod
from eventing.delivery.runner import RunSettings, build
from eventing.kafka import CONSUMER_DEFAULTS, STREAM_PRODUCER, client_tuning
from eventing.topology import Delivery, Function


class _Client:
    """Stands in for a confluent-kafka client: keeps the config it was made with."""

    made: list[dict[str, Any]]

    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf
        type(self).made.append(conf)


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch) -> tuple[type[_Client], type[_Client]]:
    consumer = type("FakeConsumer", (_Client,), {"made": []})
    producer = type("FakeProducer", (_Client,), {"made": []})
    monkeypatch.setattr(dispatcher_mod, "Consumer", consumer)
    monkeypatch.setattr(dispatcher_mod, "Producer", producer)
    return consumer, producer


def _function() -> Function:
    return Function(name="conv", source="main.py", target="conv", topics=("payments.valid",),
                    consumer_group="g", outputs={}, delivery=Delivery(timeout="PT2S"),
                    invoke="http", url="http://127.0.0.1:9/")


@pytest.mark.parametrize("storage", ["memory", "s3", None])
def test_dispatcher_clients_follow_the_storage(clients, storage: str | None) -> None:
    consumer, producer = clients
    build(_function(), RunSettings("127.0.0.1:9", None, broker_storage=storage))
    tuning = client_tuning(storage)
    assert consumer.made[-1]["fetch.wait.max.ms"] == tuning.consumer.get(
        "fetch.wait.max.ms", CONSUMER_DEFAULTS["fetch.wait.max.ms"])
    assert producer.made[-1]["linger.ms"] == tuning.stream_producer.get(
        "linger.ms", STREAM_PRODUCER["linger.ms"])


def test_s3_waits_longer_than_memory_and_callers_still_win(clients) -> None:
    consumer, _ = clients
    assert (client_tuning("s3").consumer["fetch.wait.max.ms"]
            > client_tuning("memory").consumer.get("fetch.wait.max.ms",
                                                   CONSUMER_DEFAULTS["fetch.wait.max.ms"]))
    build(_function(), RunSettings("127.0.0.1:9", None, broker_storage="s3"),
          consumer_overrides={"fetch.wait.max.ms": 7, "group.id": "replay"})
    assert consumer.made[-1]["fetch.wait.max.ms"] == 7
    assert consumer.made[-1]["group.id"] == "replay"


# The parts `sluice up` starts must resolve the stack's broker storage themselves: a part
# started without it took memory's 10 ms fetch wait on an s3 broker, and Tansu answers a
# fetch whose wait is shorter than its LIST of the partition with no records, for ever
# (README "Broker storage"; `tests/test_s3_fetch_stack.py` runs it for real).
def test_every_stream_consumer_part_of_an_s3_stack_sees_s3(tmp_path) -> None:
    from eventing.cli import build_parser
    from eventing.cli.edge import Edge
    from eventing.stack.settings import load_settings
    from eventing.stack.supervisor import core_parts

    settings = load_settings(state_dir=tmp_path / "state", port_offset=31500,
                             broker_storage="s3", generator=False)
    settings.save()
    specs = {spec.name: spec for spec in (factory(settings) for factory in core_parts(settings))}
    consumers = [n for n in specs if n.startswith("fn-")] + ["lakesink", "realtime"]
    assert len(consumers) >= 5  # the example's three functions, the sink, the table
    for name in consumers:
        argv = specs[name].argv
        assert argv[1:3] == ["-m", "eventing.cli"], name
        edge = Edge(build_parser().parse_args(argv[3:]))
        assert edge.settings.broker_storage == "s3", f"{name} would run with memory's tuning"
        assert edge.settings.state_dir == settings.state_dir, name


def test_a_stateful_functions_restore_reads_with_the_storage_tuning(
        clients, monkeypatch: pytest.MonkeyPatch) -> None:
    """The keyed-state restore on assignment reads its changelog from the start: on s3
    with the general 10 ms wait it would read nothing and time out."""
    from dataclasses import replace

    from eventing.delivery import runner

    restores: list[dict | None] = []

    class _Host:
        stores = ["a store"]

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...

        def restore_state(self, bootstrap: str, consumer_overrides: dict | None = None) -> None:
            restores.append(consumer_overrides)

    monkeypatch.setattr(runner, "FunctionHost", _Host)
    monkeypatch.setattr(runner, "InProcessInvoker", lambda host, producer: object())
    fn = replace(_function(), invoke="inprocess", url=None)
    dispatcher = build(fn, RunSettings("127.0.0.1:9", None, broker_storage="s3"))
    dispatcher._on_assign(None, ["a partition"])
    assert restores == [client_tuning("s3").consumer]
