"""Telemetry on a cluster: the OpenTelemetry Collector, Prometheus scraping, Grafana.

Functions export spans over OTLP to the collector (their `OTEL_EXPORTER_OTLP_ENDPOINT`).
The collector batches them, sends them to Tempo, and derives request/error/duration
metrics from them (the spanmetrics connector) for Prometheus to scrape, so dashboards
need no instrumentation beyond traces. Locally `rotel` plays the collector's part.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from eventing.deploy.common import DeploySettings, labels

COLLECTOR_IMAGE = "otel/opentelemetry-collector-contrib:0.115.1"  # spanmetrics is in contrib
COLLECTOR_PORTS = {"otlp-grpc": 4317, "otlp-http": 4318, "metrics": 8889}
LATENCY_BUCKETS = ["2ms", "5ms", "10ms", "25ms", "50ms", "100ms", "250ms", "500ms", "1s",
                   "2.5s", "5s", "10s"]


def collector_config(settings: DeploySettings) -> dict:
    return {
        "receivers": {"otlp": {"protocols": {
            "grpc": {"endpoint": f"0.0.0.0:{COLLECTOR_PORTS['otlp-grpc']}"},
            "http": {"endpoint": f"0.0.0.0:{COLLECTOR_PORTS['otlp-http']}"},
        }}},
        "processors": {
            "memory_limiter": {"check_interval": "1s", "limit_percentage": 80,
                               "spike_limit_percentage": 20},
            "batch": {"timeout": "200ms", "send_batch_size": 8192},
        },
        "connectors": {"spanmetrics": {
            "histogram": {"explicit": {"buckets": LATENCY_BUCKETS}},
            "dimensions": [{"name": "messaging.destination.name"},
                           {"name": "cloudevents.event_type"}],
            "metrics_flush_interval": "15s",
        }},
        "exporters": {
            "otlp/tempo": {"endpoint": settings.tempo_endpoint, "tls": {"insecure": True}},
            "prometheus": {"endpoint": f"0.0.0.0:{COLLECTOR_PORTS['metrics']}",
                           "resource_to_telemetry_conversion": {"enabled": True}},
        },
        "extensions": {"health_check": {"endpoint": "0.0.0.0:13133"}},
        "service": {
            "extensions": ["health_check"],
            "pipelines": {
                "traces": {"receivers": ["otlp"], "processors": ["memory_limiter", "batch"],
                           "exporters": ["otlp/tempo", "spanmetrics"]},
                "metrics/spanmetrics": {"receivers": ["spanmetrics"], "processors": ["batch"],
                                        "exporters": ["prometheus"]},
            },
        },
    }


def collector_workload(settings: DeploySettings, configmap: str) -> list[dict]:
    """Deployment + Service named like the functions' OTLP endpoint host."""
    name = urlparse(settings.otlp_endpoint).hostname or "otel-collector"
    sel = {"app.kubernetes.io/name": name}
    meta = {"name": name, "namespace": settings.namespace,
            "labels": {**labels("telemetry"), **sel}}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {
            "replicas": 1,
            "selector": {"matchLabels": sel},
            "template": {"metadata": {"labels": {**labels("telemetry"), **sel}}, "spec": {
                "containers": [{
                    "name": "collector", "image": COLLECTOR_IMAGE,
                    "args": ["--config=/conf/collector.yaml"],
                    "ports": [{"name": n, "containerPort": p}
                              for n, p in COLLECTOR_PORTS.items()],
                    "readinessProbe": {"httpGet": {"path": "/", "port": 13133}},
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                  "limits": {"memory": "512Mi"}},
                    "volumeMounts": [{"name": "conf", "mountPath": "/conf"}],
                }],
                "volumes": [{"name": "conf", "configMap": {"name": configmap}}],
            }},
        }},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {
            "selector": sel,
            "ports": [{"name": n, "port": p, "targetPort": p}
                      for n, p in COLLECTOR_PORTS.items()],
        }},
    ]


def prometheus_config(settings: DeploySettings, rule_files: list[str]) -> dict:
    """Scrape the collector's span metrics, Knative's per-revision queue-proxy metrics
    (requests, latency, concurrency of every function) and Sluice's own services."""
    collector = urlparse(settings.otlp_endpoint).hostname or "otel-collector"
    registry = urlparse(settings.registry_url)
    return {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": rule_files,
        "scrape_configs": [
            {"job_name": "otel-collector-spanmetrics", "static_configs": [
                {"targets": [f"{collector}:{COLLECTOR_PORTS['metrics']}"]}]},
            {"job_name": "sluice-registry", "static_configs": [
                {"targets": [f"{registry.hostname}:{registry.port or 80}"]}]},
            {"job_name": "sluice-gateway", "static_configs": [
                {"targets": ["sluice-gateway:8080"]}]},
            {"job_name": "knative-functions",
             "kubernetes_sd_configs": [{"role": "pod",
                                        "namespaces": {"names": [settings.namespace]}}],
             "relabel_configs": [
                 {"source_labels": ["__meta_kubernetes_pod_label_sluice_dev_function"],
                  "regex": ".+", "action": "keep"},
                 {"source_labels": ["__meta_kubernetes_pod_container_port_name"],
                  "regex": "http-usermetric", "action": "keep"},
                 {"source_labels": ["__meta_kubernetes_pod_label_sluice_dev_function"],
                  "target_label": "function"},
             ]},
        ],
    }


def rule_files(project_dir: Path) -> list[Path]:
    """Alerting/recording rules kept in infra/prometheus (`*.rules.yml`), if any."""
    d = project_dir / "infra" / "prometheus"
    return sorted(d.glob("*.rules.yml")) + sorted(d.glob("*.rules.yaml")) if d.is_dir() else []


def grafana_datasources(settings: DeploySettings) -> dict:
    return {"apiVersion": 1, "datasources": [
        {"name": "Prometheus", "uid": "prometheus", "type": "prometheus", "access": "proxy",
         "url": settings.prometheus_url, "isDefault": True},
        {"name": "Tempo", "uid": "tempo", "type": "tempo", "access": "proxy",
         "url": settings.tempo_url},
    ]}


def grafana_dashboard_provider(path: str = "/var/lib/grafana/dashboards/sluice") -> dict:
    return {"apiVersion": 1, "providers": [
        {"name": "sluice", "folder": "Sluice", "type": "file", "disableDeletion": False,
         "allowUiUpdates": False, "updateIntervalSeconds": 30, "options": {"path": path}},
    ]}


# (title, PromQL, unit): one time-series panel each.
PANELS = [
    # Knative queue-proxy metrics; `function` is added by the scrape config's relabelling.
    ("Function requests/s", "sum by (function) (rate(revision_app_request_count[1m]))",
     "reqps"),
    ("Function errors/s (5xx)", 'sum by (function) (rate(revision_app_request_count'
     '{response_code_class="5xx"}[1m]))', "reqps"),
    ("Function p99 latency", "histogram_quantile(0.99, sum by (function, le) "
     "(rate(revision_app_request_latencies_bucket[5m])))", "ms"),
    ("Span rate by service", "sum by (service_name) (rate(traces_span_metrics_calls_total[1m]))",
     "ops"),
    ("Span p95 duration by service", "histogram_quantile(0.95, sum by (service_name, le) "
     "(rate(traces_span_metrics_duration_milliseconds_bucket[5m])))", "ms"),
    ("Gateway events/s by outcome", "sum by (outcome) (rate(sluice_gateway_events_total[1m]))",
     "ops"),
]


def grafana_dashboard(settings: DeploySettings) -> dict:
    panels = []
    for i, (title, expr, unit) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "datasource": {"type": "prometheus", "uid": "prometheus"},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": "A", "expr": expr, "legendFormat": "__auto",
                         "datasource": {"type": "prometheus", "uid": "prometheus"}}],
        })
    return {
        "uid": "sluice-pipeline", "title": "Sluice pipeline", "schemaVersion": 39,
        "version": 1, "editable": False, "tags": ["sluice"], "timezone": "utc",
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
        "description": f"Functions of namespace {settings.namespace}",
        "panels": panels,
    }
