"""The whole bundle: build contexts, `kn.sh`, a kustomize base and dev/prod overlays.

    <out>/functions/<name>/   build context (Dockerfile, entry.py, code, requirements.txt)
    <out>/platform/           build context of the gateway / lake sink / registry image
    <out>/kn.sh               the kn + kubectl script
    <out>/base/               every object, and ConfigMaps generated from config files:
                              functions, gateway, lake sink, topics, Pinot tables,
                              Trino catalogs, telemetry
    <out>/optional/registry/  Sluice's own schema registry, for clusters without one
    <out>/overlays/dev|prod/  JSON patches: scale bounds and resources per environment

Overlays use JSON 6902 patches, not strategic merges: Knative kinds are CRDs, for which
kustomize can only do JSON merge patches, and those would replace the whole `containers`
list instead of one field of it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from eventing.deploy import docker, kn, knative, observability, pinot, platform, strimzi, trino
from eventing.deploy.common import DeploySettings, dump_yaml, header, to_yaml, topology_label
from eventing.topology import Topology

PROD_RESOURCES = {"requests": {"cpu": "500m", "memory": "512Mi"},
                  "limits": {"cpu": "2", "memory": "1Gi"}}
DEV_RESOURCES = {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}
DEV_MAX_SCALE = 2


@dataclass
class Bundle:
    """What was written, for the CLI to print and tests to open."""

    out: Path
    files: list[Path]
    services: dict[str, dict]
    sources: dict[str, dict]
    sinks: dict[str, dict]

    def manifests(self) -> list[dict]:
        return [*self.services.values(), *self.sources.values(), *self.sinks.values()]


def _write(path: Path, text: str, files: list[Path]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    files.append(path)
    return path


def _esc(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _patch(target: dict, ops: list[dict]) -> dict:
    return {"target": target, "patch": to_yaml(ops)}


def _overlay(name: str, topology: Topology, settings: DeploySettings,
             stateful: set[str]) -> str:
    svc_target = {"group": "serving.knative.dev", "version": "v1", "kind": "Service"}
    src_target = {"group": "sources.knative.dev", "version": "v1", "kind": "KafkaSource"}
    ann = "/spec/template/metadata/annotations/"
    patches = []
    for fn in topology.functions.values():
        if name == "prod":
            svc_max = fn.scale.max * settings.prod_scale_factor
            resources = PROD_RESOURCES
        else:
            svc_max = min(fn.scale.max, DEV_MAX_SCALE)
            resources = DEV_RESOURCES
        svc_max = knative.service_max_scale(svc_max, stateful=fn.name in stateful)
        patches.append(_patch({**svc_target, "name": fn.name}, [
            {"op": "replace", "path": ann + _esc(knative.SERVING + "max-scale"),
             "value": str(svc_max)},
            {"op": "replace", "path": "/spec/template/spec/containers/0/resources",
             "value": resources},
        ]))
        if name == "dev":  # prod keeps the base: consumers are bounded by partitions
            src_max = min(DEV_MAX_SCALE, knative.source_max_scale(fn, topology))
            patches.append(_patch({**src_target, "name": fn.name}, [
                {"op": "replace", "path": "/metadata/annotations/"
                 + _esc(knative.EVENTING + "max-scale"), "value": str(src_max)},
            ]))
    if name == "dev":  # a one-broker development cluster
        patches.append(_patch({"group": "kafka.strimzi.io", "kind": "KafkaTopic"}, [
            {"op": "replace", "path": "/spec/replicas", "value": 1},
            {"op": "replace", "path": "/spec/config/min.insync.replicas", "value": "1"},
        ]))
    doc = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
           "resources": ["../../base"], "patches": patches}
    return to_yaml(doc)


def write_bundle(topology: Topology, out: Path, settings: DeploySettings, *,
                 include_code: bool = True) -> Bundle:
    """Write every file under `out` (its generated folders are replaced, nothing else).

    `include_code=False`: build contexts hold only generated files (see docker.write_context).
    """
    source = topology_label(topology.path)
    out = Path(out)
    for sub in ("functions", "platform", "base", "optional", "overlays"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
    files: list[Path] = []
    base = out / "base"
    bundle = Bundle(out=out, files=files, services={}, sources={}, sinks={})

    stateful = {fn.name for fn in topology.functions.values() if knative.has_keyed_state(fn)}
    for fn in topology.functions.values():
        ctx = docker.write_context(fn, out / "functions" / fn.name, source,
                                   include_code=include_code)
        files += sorted(p for p in ctx.rglob("*") if p.is_file())
        bundle.services[fn.name] = knative.service(fn, settings, topology.trace_ids,
                                                   stateful=fn.name in stateful)
        bundle.sources[fn.name] = knative.kafka_source(fn, topology, settings)
    for topic in knative.dead_letter_topics(topology):
        bundle.sinks[topic] = knative.dead_letter_sink(topic, settings)

    resources: list[str] = []

    def resource(rel: str, docs: list[dict] | dict) -> str:
        _write(base / rel, dump_yaml(docs, source), files)
        resources.append(rel)
        return rel

    sink_files = [resource(f"functions/{knative.sink_name(t)}.kafkasink.yaml", m)
                  for t, m in bundle.sinks.items()]
    source_files = {}
    for name in topology.functions:
        resource(f"functions/{name}.service.yaml", bundle.services[name])
        source_files[name] = resource(f"functions/{name}.kafkasource.yaml", bundle.sources[name])
    topics_file = resource("kafka/topics.yaml", strimzi.topics(topology, settings))

    # The platform: the gateway (events get in), the lake sink (results reach S3), and
    # the image they run; the registry is one URL, or Sluice's own under optional/.
    files += platform.write_context(out / "platform", source, include_code=include_code)
    resource("platform/gateway.service.yaml", platform.gateway_service(settings))
    if topology.tables:
        resource("platform/lakesink.deployment.yaml", platform.lake_sink(topology, settings))
    _write(out / "optional" / "registry" / "registry.yaml",
           dump_yaml(platform.registry(settings), source), files)
    _write(out / "optional" / "registry" / "kustomization.yaml", header(source) + to_yaml({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": settings.namespace, "resources": ["registry.yaml"]}), files)

    generators: list[dict] = []

    def config_map(name: str, files_: dict[str, str], extra_labels: dict | None = None) -> str:
        for fname, text in files_.items():
            _write(base / "config" / name / fname, text, files)
        gen: dict = {"name": name, "files": [f"config/{name}/{f}" for f in files_]}
        if extra_labels:
            gen["options"] = {"labels": extra_labels}
        generators.append(gen)
        return name

    platform_topology = yaml.safe_dump(platform.platform_topology(topology), sort_keys=False,
                                       width=100)
    config_map(platform.TOPOLOGY_CONFIGMAP,
               {platform.TOPOLOGY_FILE: header(source) + platform_topology})

    # Pinot: per real-time table a schema + table config, and a Job that posts them.
    pinot_configs = pinot.configs(topology, settings)
    if pinot_configs:
        pinot_files = {}
        for name, (p_schema, p_table) in pinot_configs.items():
            pinot_files[f"{name}.schema.json"] = json.dumps(p_schema, indent=2) + "\n"
            pinot_files[f"{name}.table.json"] = json.dumps(p_table, indent=2) + "\n"
        cm = config_map("pinot-tables", pinot_files)
        resource("pinot/setup-job.yaml", pinot.setup_job(settings, list(pinot_configs), cm))

    config_map("trino-catalogs", trino.catalogs(settings))

    collector_cm = config_map("otel-collector-config", {
        "collector.yaml": header(source) + yaml.safe_dump(
            observability.collector_config(settings), sort_keys=False)})
    resource("telemetry/otel-collector.yaml",
             observability.collector_workload(settings, collector_cm))

    rules = observability.rule_files(docker.PROJECT_DIR)
    prom_files = {"prometheus.yml": header(source) + yaml.safe_dump(
        observability.prometheus_config(settings, [f"/etc/prometheus/{r.name}" for r in rules]),
        sort_keys=False)}
    prom_files.update({r.name: r.read_text() for r in rules})
    config_map("prometheus-config", prom_files)

    config_map("grafana-datasources", {"datasources.yaml": yaml.safe_dump(
        observability.grafana_datasources(settings), sort_keys=False)},
        {"grafana_datasource": "1"})
    config_map("grafana-dashboard-provider", {"dashboards.yaml": yaml.safe_dump(
        observability.grafana_dashboard_provider(), sort_keys=False)})
    config_map("grafana-dashboards", {"sluice-pipeline.json": json.dumps(
        observability.grafana_dashboard(settings), indent=2) + "\n"}, {"grafana_dashboard": "1"})

    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": settings.namespace,
        "labels": [{"pairs": {"app.kubernetes.io/part-of": "sluice"}}],
        "resources": resources,
        # Stable names: Helm-installed Trino, Pinot, Prometheus and Grafana mount these.
        "generatorOptions": {"disableNameSuffixHash": True},
        "configMapGenerator": generators,
    }
    _write(base / "kustomization.yaml", header(source) + yaml.safe_dump(
        kustomization, sort_keys=False, width=100), files)
    for env in ("dev", "prod"):
        _write(out / "overlays" / env / "kustomization.yaml",
               header(source) + _overlay(env, topology, settings, stateful), files)

    script = _write(out / "kn.sh", kn.script(
        settings, bundle.services, {n: f"base/{f}" for n, f in source_files.items()},
        [f"base/{f}" for f in sink_files], f"base/{topics_file}", source), files)
    script.chmod(0o755)
    return bundle
