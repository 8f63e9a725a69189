"""The lake sink part: every table the topology declares, from its topic into Iceberg.

One supervised process (`sluice sink lake --topology ...`) serves all declared tables,
one consumer thread each, started after the object store, registry and broker. The S3
keys are not on its command line (visible in `ps`): it reads them from the state folder,
which `--state-dir` names.
"""

from __future__ import annotations

from eventing import topology as topo
from eventing.stack.health import http_probe, http_status
from eventing.stack.pipeline import _python_part, tracing_args
from eventing.stack.process import PartSpec
from eventing.stack.settings import StackSettings

NAME = "lakesink"


def has_tables(settings: StackSettings) -> bool:
    """Whether the topology declares a table (else there is nothing to sink)."""
    return bool(topo.load(settings.topology_path).tables)


def spec(settings: StackSettings) -> PartSpec:
    port = settings.ports.lake_metrics
    url = f"http://{settings.host}:{port}/metrics"
    tables = topo.load(settings.topology_path).tables
    args = ["--state-dir", str(settings.state_dir),
            "sink", "lake", "--topology", str(settings.topology_path),
            "--bootstrap", settings.bootstrap, "--registry", settings.registry_url,
            "--catalog-uri", settings.iceberg_url, "--s3-endpoint", settings.s3_endpoint,
            "--metrics-port", str(port), "--metrics-host", settings.host,
            *tracing_args(settings, "sluice-lake-sink")]
    listed = ", ".join(f"{t.topic} -> sluice.{t.name}" for t in tables.values())
    part = _python_part(settings, NAME, args, f"lake sink {listed} (metrics {url})",
                        lambda: http_status(f"http://{settings.host}:{port}/healthz") == 200,
                        [port])
    part.liveness = http_probe(f"http://{settings.host}:{port}/healthz")  # loops in 120 s
    part.start_timeout = 60.0  # creating the tables and the first group joins take seconds
    return part
