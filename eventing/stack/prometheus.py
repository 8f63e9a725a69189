"""Prometheus 2.42 (Debian package) scraping every Sluice process of the stack.

Started without `--web.enable-lifecycle` and `--web.enable-remote-write-receiver`: with
them any local program could stop Prometheus (`POST /-/quit`) or write made-up series
into it (`POST /api/v1/write`). A changed scrape config is loaded on SIGHUP instead,
sent to the pid `sluice up` recorded (and only while its start time still matches).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import yaml

from eventing.stack import binaries
from eventing.stack.health import http_probe, http_status
from eventing.stack.process import PartSpec, ProcessDir, is_alive
from eventing.stack.settings import StackSettings

NAME = "prometheus"


def scrape_config(settings: StackSettings) -> dict:
    """The local scrape config: the same job names the cluster config uses."""
    h, p = settings.host, settings.ports
    rules_dir = settings.project_dir / "infra" / "prometheus"
    return {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "rule_files": [str(rules_dir / "*.rules.yml")],
        "scrape_configs": [
            {"job_name": "prometheus", "static_configs": [{"targets": [f"{h}:{p.prometheus}"]}]},
            {"job_name": "sluice-registry",
             "static_configs": [{"targets": [f"{h}:{p.registry}"]}]},
            {"job_name": "sluice-gateway", "static_configs": [{"targets": [f"{h}:{p.gateway}"]}]},
            {"job_name": "sluice-functions", "static_configs": [
                {"targets": [f"{h}:{port}" for port in _function_ports(settings)]}]},
            {"job_name": "sluice-lake-sink",
             "static_configs": [{"targets": [f"{h}:{p.lake_metrics}"]}]},
            {"job_name": "sluice-realtime",
             "static_configs": [{"targets": [f"{h}:{p.realtime}"]}]},
            {"job_name": "sluice-supervisor",
             "static_configs": [{"targets": [f"{h}:{p.supervisor}"]}]},
            {"job_name": "seaweedfs", "static_configs": [{"targets": [f"{h}:{p.weed_metrics}"]}]},
        ],
    }


def _function_ports(settings: StackSettings) -> list[int]:
    """The metrics port of every function process `sluice up` starts."""
    from eventing.stack.pipeline import function_metrics_port, function_processes

    if not settings.pipeline:
        return []
    return [function_metrics_port(settings, i)
            for i in range(len(function_processes(settings)))]


def write_config(settings: StackSettings) -> Path:
    conf_dir = settings.state_dir / "data" / NAME
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(scrape_config(settings), sort_keys=False))
    return path


def reload(settings: StackSettings) -> None:
    """Rewrite the scrape config for the parts now running and tell Prometheus (SIGHUP)."""
    write_config(settings)
    record = ProcessDir(settings.state_dir).record(NAME)
    if record is not None and is_alive(record):
        os.kill(record.pid, signal.SIGHUP)


def spec(settings: StackSettings) -> PartSpec:
    config = write_config(settings)
    tsdb = settings.state_dir / "data" / NAME / "tsdb"
    tsdb.mkdir(parents=True, exist_ok=True)
    return PartSpec(
        name=NAME,
        argv=[
            binaries.prometheus(),
            f"--config.file={config}",
            f"--storage.tsdb.path={tsdb}",
            f"--storage.tsdb.retention.time={settings.metrics_retention}",
            f"--storage.tsdb.retention.size={settings.metrics_max_size}",
            f"--web.listen-address={settings.host}:{settings.ports.prometheus}",
            "--enable-feature=exemplar-storage",  # latency buckets link to traces
        ],
        env=binaries.base_env(),
        cwd=tsdb.parent,
        endpoint=f"prometheus {settings.prometheus_url}",
        health=lambda: http_status(settings.prometheus_url + "/-/ready") == 200,
        ports=[settings.ports.prometheus],
        liveness=http_probe(settings.prometheus_url + "/-/healthy"),
    )
