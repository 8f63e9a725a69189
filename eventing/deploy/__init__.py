"""Cluster manifests written from the topology: `sluice deploy`.

One topology file drives both the local dispatcher and these manifests, so delivery
settings (ordering, retries, backoff, dead letters, consumer groups) cannot differ
between a laptop and a cluster. Modules, one job each:

    common         settings, names, labels, YAML
    docker         per-function build context (Dockerfile, entry file, requirements)
    knative        Service, KafkaSource, KafkaSink
    kn             the kn/kubectl script
    strimzi        KafkaTopics
    pinot, trino   real-time table configs and query catalogs
    observability  OpenTelemetry Collector, Prometheus, Grafana
    kustomize      the bundle: base/ and overlays/{dev,prod}
    apply          kubectl apply, or a clear message when kubectl is missing
"""

from eventing.deploy.common import DeployError, DeploySettings
from eventing.deploy.kustomize import Bundle, write_bundle

__all__ = ["Bundle", "DeployError", "DeploySettings", "write_bundle"]
