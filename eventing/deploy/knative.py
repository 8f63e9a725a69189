"""Knative objects for a topology: one Service per function, one KafkaSource per function
subscription, one KafkaSink per dead-letter topic.

Every delivery value comes from `eventing.topology` (the same `Function` objects the local
dispatcher runs), so a topology means the same thing on a laptop and on a cluster:

- KafkaSource `spec.ordering`, `spec.initialOffset`, `spec.consumerGroup`, `spec.topics`
  and `spec.delivery` (retry, backoffPolicy, backoffDelay, timeout) are copied as they are;
- the dead-letter topic becomes a KafkaSink, referenced as `delivery.deadLetterSink`,
  because a KafkaSource's dead letters go to an addressable, not to a topic name;
- the consumer group is always explicit: Knative's default is the source's UID, which
  would restart from `initialOffset` whenever the object is re-created.

Scale-to-zero works at both ends: the Service (Knative Pod Autoscaler, `min-scale: "0"`)
and the KafkaSource's dispatcher (KEDA class, scaled on consumer lag).
"""

from __future__ import annotations

import json
import math

from eventing.deploy import docker
from eventing.deploy.common import DeploySettings, k8s_name, labels, metadata
from eventing.fn import env as host_env
from eventing.topology import Function, Topology

SERVICE_API = "serving.knative.dev/v1"
SOURCE_API = "sources.knative.dev/v1"
SINK_API = "eventing.knative.dev/v1alpha1"
CONTAINER_NAME = "function"
PORT_NAME = "http1"
SERVING = "autoscaling.knative.dev/"
EVENTING = "autoscaling.eventing.knative.dev/"
KEDA_CLASS = "keda.autoscaling.knative.dev"
KPA_CLASS = "kpa.autoscaling.knative.dev"
OTEL_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
RUN_AS_USER = docker.RUN_AS_UID

# Base resources; the overlays replace them (dev smaller, prod larger).
RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}


def service_name(function: Function) -> str:
    return function.name  # topology names are already DNS labels (checked on load)


def sink_name(topic: str) -> str:
    return k8s_name(f"deadletter-{topic}")


def container_env(function: Function, settings: DeploySettings,
                  trace_ids: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment: `eventing.fn.env`'s variables plus the OTLP endpoint.

    The source path is the one inside the image (relative to its WORKDIR), not the path
    on the machine that generated the manifests.
    """
    env = host_env.function_env(function, settings.bootstrap, settings.registry_url)
    env[host_env.ENV_SOURCE] = docker.FUNCTION_SOURCE
    env[OTEL_ENDPOINT] = settings.otlp_endpoint
    env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"  # the SDK exporter; grpc works too
    env["OTEL_SERVICE_NAME"] = function.name
    if trace_ids:  # the topology's business ids, so `trace ids` work on a cluster too
        env[host_env.ENV_TRACE_IDS] = json.dumps(trace_ids, sort_keys=True)
    return env


def _probe(settings: DeploySettings, period: int, failures: int, delay: int = 0) -> dict:
    # TCP, not HTTP: the host answers every GET with 405 (it is a POST-only CloudEvent
    # target), so an HTTP probe would never pass. Knative only accepts a probe port that
    # is omitted or equal to the container port.
    return {"tcpSocket": {"port": settings.container_port}, "initialDelaySeconds": delay,
            "periodSeconds": period, "timeoutSeconds": 1, "failureThreshold": failures}


def has_keyed_state(function: Function) -> bool:
    """Whether the function's module holds a `KeyedState` (found the way the host finds it).

    Imports the function's source file, as `sluice run` does; a function whose code is
    not importable here cannot be checked, so that is an error, not a guess.
    """
    import sys

    from eventing.fn.runtime import load_target
    from eventing.fn.state import KeyedState

    fn = load_target(function.source, function.target)
    module = sys.modules.get(getattr(fn, "__module__", ""), None)
    return module is not None and any(isinstance(v, KeyedState) for v in vars(module).values())


def service_max_scale(max_scale: int, *, stateful: bool) -> int:
    """At most one pod for a function with keyed state.

    Its state is an in-memory copy per pod. Since issue 13 the host reads a key's
    changelog partition to its end before each event (`eventing.fn.state`, following
    mode), so two pods taking turns on a card compute the windows one pod would
    (tests/test_state_hosts_stack.py); that also covers the overlap of an old and a new
    revision during a rollout. The pin stays until following's cost and liveness are
    measured: on Tansu under heavy load its catch-ups fell behind (README, "Keyed state
    on several pods"). One pod costs scale-out beyond one pod's throughput and a cold
    start on the first event after scale-to-zero.
    """
    return 1 if stateful else max_scale


def service(function: Function, settings: DeploySettings,
            trace_ids: dict[str, str] | None = None, *, stateful: bool = False) -> dict:
    """A Knative Service running the function's image, scaling to zero (to one pod at
    most when the function has keyed state: `service_max_scale`)."""
    scale = function.scale
    annotations = {
        SERVING + "class": KPA_CLASS,
        SERVING + "metric": "concurrency",
        SERVING + "min-scale": str(service_max_scale(scale.min, stateful=stateful)
                                   if scale.min else 0),
        SERVING + "max-scale": str(service_max_scale(scale.max, stateful=stateful)),
        SERVING + "target": str(scale.target_concurrency),
    }
    container = {
        "name": CONTAINER_NAME,
        "image": settings.image(function.name),
        "ports": [{"name": PORT_NAME, "containerPort": settings.container_port}],
        "env": [{"name": k, "value": v}
                for k, v in container_env(function, settings, trace_ids).items()],
        "readinessProbe": {**_probe(settings, 2, 3), "successThreshold": 1},
        "livenessProbe": _probe(settings, 10, 3, delay=5),
        "resources": RESOURCES,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": RUN_AS_USER, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    meta = metadata(service_name(function), settings, "function", function.name)
    # Only KafkaSources call functions: keep them off the public ingress.
    meta["labels"]["networking.knative.dev/visibility"] = "cluster-local"
    return {
        "apiVersion": SERVICE_API,
        "kind": "Service",
        "metadata": meta,
        "spec": {"template": {
            "metadata": {"labels": labels("function", function.name),
                         "annotations": annotations},
            "spec": {
                # Knative's request timeout covers one delivery attempt, like `timeout`.
                "timeoutSeconds": math.ceil(function.delivery.timeout_s),
                "containers": [container],
            },
        }},
    }


def source_max_scale(function: Function, topology: Topology) -> int:
    """More consumer replicas than partitions would sit idle."""
    parts = topology.all_topics()
    partitions = sum(parts.get(t, 1) for t in function.topics)
    return max(1, min(function.scale.max, partitions))


def kafka_source(function: Function, topology: Topology, settings: DeploySettings) -> dict:
    """The subscription: what the local dispatcher does, as a Knative KafkaSource."""
    d = function.delivery
    annotations = {
        EVENTING + "class": KEDA_CLASS,
        EVENTING + "min-scale": "0",
        EVENTING + "max-scale": str(source_max_scale(function, topology)),
        EVENTING + "lag-threshold": str(function.scale.lag_threshold),
        EVENTING + "activation-lag-threshold": "1",
    }
    return {
        "apiVersion": SOURCE_API,
        "kind": "KafkaSource",
        "metadata": metadata(service_name(function), settings, "subscription", function.name,
                             annotations),
        "spec": {
            "bootstrapServers": [settings.bootstrap],
            "topics": list(function.topics),
            "consumerGroup": function.consumer_group,
            "initialOffset": function.initial_offset,
            "ordering": d.ordering,
            "delivery": {
                "retry": d.retry,
                "backoffPolicy": d.backoff_policy,
                "backoffDelay": d.backoff_delay,
                "timeout": d.timeout,
                "deadLetterSink": {"ref": {"apiVersion": SINK_API, "kind": "KafkaSink",
                                           "name": sink_name(d.dead_letter_sink)}},
            },
            "sink": {"ref": {"apiVersion": SERVICE_API, "kind": "Service",
                             "name": service_name(function)}},
        },
    }


def dead_letter_sink(topic: str, settings: DeploySettings) -> dict:
    """A KafkaSink writing dead letters to `topic` (binary mode keeps the CloudEvent and
    Knative's `knativeerror*` extensions as Kafka headers, as the dispatcher writes them)."""
    return {
        "apiVersion": SINK_API,
        "kind": "KafkaSink",
        "metadata": metadata(sink_name(topic), settings, "dead-letter"),
        "spec": {"topic": topic, "bootstrapServers": [settings.bootstrap],
                 "contentMode": "binary"},
    }


def dead_letter_topics(topology: Topology) -> list[str]:
    return sorted({f.delivery.dead_letter_sink for f in topology.functions.values()})
