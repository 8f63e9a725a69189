"""Strimzi `KafkaTopic`s: every topic the topology touches, plus state changelogs.

Topics are created by the Strimzi topic operator rather than by the clients, so that
partitions, replication and retention are declared (and reviewed) in one place. Knative's
KafkaSource does not create topics, and a KafkaSource on a missing topic never becomes
ready, so these must be applied first.

State changelogs (`eventing.fn.api.store(name, topic=...)` in a function's code) are found by
reading the function sources; they are compacted, as the local stack creates them.
"""

from __future__ import annotations

import ast
from typing import Any

from eventing.deploy import docker
from eventing.deploy.common import DeploySettings, k8s_name, labels
from eventing.topology import Topology

API = "kafka.strimzi.io/v1beta2"
REGISTRY_TOPIC = "_schemas"  # the embedded schema registry's store (compacted)
DAY_MS = 86_400_000


def state_topics(topology: Topology) -> dict[str, int]:
    """Changelog topics declared with `store(..., topic="...", partitions=N)` (or `x.store`)."""
    out: dict[str, int] = {}
    for fn in topology.functions.values():
        out |= function_state_topics(fn)
    return out


def function_state_topics(fn: Any) -> dict[str, int]:
    """The changelog topics one function's code declares (its keyed state)."""
    out: dict[str, int] = {}
    for path in docker.function_files(fn):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name != "store":
                continue
            kw = {k.arg: k.value for k in node.keywords}
            topic = kw.get("topic") or (node.args[1] if len(node.args) > 1 else None)
            parts = kw.get("partitions") or (node.args[2] if len(node.args) > 2 else None)
            if isinstance(topic, ast.Constant) and isinstance(topic.value, str):
                n = parts.value if isinstance(parts, ast.Constant) else 4
                out[topic.value] = int(n)
    return out


def _topic(name: str, partitions: int, config: dict[str, str], settings: DeploySettings,
           replicas: int | None = None) -> dict:
    replicas = replicas or settings.topic_replicas
    config = {"min.insync.replicas": str(max(1, min(2, replicas - 1))), **config}
    return {
        "apiVersion": API,
        "kind": "KafkaTopic",
        "metadata": {
            "name": k8s_name(name),
            "namespace": settings.namespace,
            "labels": {"strimzi.io/cluster": settings.kafka_cluster, **labels("topic")},
        },
        "spec": {"topicName": name, "partitions": partitions, "replicas": replicas,
                 "config": config},
    }


def topics(topology: Topology, settings: DeploySettings) -> list[dict]:
    dead = {f.delivery.dead_letter_sink for f in topology.functions.values()}
    out = []
    for name, parts in sorted(topology.all_topics().items()):
        # Dead letters wait for a human: keep them a month; events a week.
        days = 30 if name in dead else 7
        out.append(_topic(name, parts, {"retention.ms": str(days * DAY_MS)}, settings))
    for name, parts in sorted(state_topics(topology).items()):
        out.append(_topic(name, parts, {"cleanup.policy": "compact"}, settings))
    out.append(_topic(REGISTRY_TOPIC, 1, {"cleanup.policy": "compact"}, settings))
    names = [t["metadata"]["name"] for t in out]
    if len(names) != len(set(names)):  # `a.b` and `a-b` map to the same object name
        raise ValueError(f"topics collide as Kubernetes names: {sorted(names)}")
    return out
