"""The lake sink part: `payments.scored` into the Iceberg table `sluice.payments_scored`.

A supervised process like the functions (`sluice sink lake ...`), started after the
object store, registry and broker. The S3 keys are not on its command line (visible in
`ps`): it reads them from the state folder, which `--state-dir` names.
"""

from __future__ import annotations

from eventing.stack.health import http_status
from eventing.stack.pipeline import _python_part, tracing_args
from eventing.stack.process import PartSpec
from eventing.stack.settings import StackSettings

NAME = "lakesink"
TOPIC = "payments.scored"
TABLE = "payments_scored"


def spec(settings: StackSettings, *, topic: str = TOPIC, table: str = TABLE) -> PartSpec:
    port = settings.ports.lake_metrics
    url = f"http://{settings.host}:{port}/metrics"
    args = ["--state-dir", str(settings.state_dir),
            "sink", "lake", "--topic", topic, "--table", table,
            "--bootstrap", settings.bootstrap, "--registry", settings.registry_url,
            "--catalog-uri", settings.iceberg_url, "--s3-endpoint", settings.s3_endpoint,
            "--metrics-port", str(port), "--metrics-host", settings.host,
            *tracing_args(settings, "sluice-lake-sink")]
    part = _python_part(settings, NAME, args, f"lake sink {topic} -> sluice.{table} "
                        f"(metrics {url})",
                        lambda: http_status(f"http://{settings.host}:{port}/healthz") == 200,
                        [port])
    part.start_timeout = 60.0  # creating the table and the first group join take seconds
    return part
