"""The real-time table server as a part of the local stack (`sluice realtime`).

It needs the broker, the registry (the topic's schema) and the object store (the lake
catalog it ATTACHes), so it starts after them. It reads its ports and the S3 keys from
the state folder, like every `sluice` command started with `--state-dir`.
"""

from __future__ import annotations

import sys

from eventing.stack import binaries
from eventing.stack.health import http_status
from eventing.stack.pipeline import tracing_args
from eventing.stack.process import PartSpec
from eventing.stack.settings import StackSettings

NAME = "realtime"
TOPIC = "payments.scored"
RETENTION = "1h"


def spec(settings: StackSettings) -> PartSpec:
    url = settings.realtime_url
    argv = [sys.executable, "-m", "eventing.cli", "--state-dir", str(settings.state_dir),
            "realtime", "--host", settings.host, "--port", str(settings.ports.realtime),
            "--bootstrap", settings.bootstrap, "--registry", settings.registry_url,
            "--topic", TOPIC, "--retention", RETENTION,
            *tracing_args(settings, "sluice-realtime")]
    return PartSpec(
        name=NAME,
        argv=argv,
        env=binaries.base_env() | {"PYTHONPATH": str(settings.project_dir),
                                   "PYTHONUNBUFFERED": "1"},
        cwd=settings.project_dir,
        endpoint=f"real-time table {url} (POST /query)",
        health=lambda: http_status(url + "/healthz") == 200,
        ports=[settings.ports.realtime],
        # DuckDB extensions, the lake ATTACH and the schema fetch: 30 s was too short on a
        # loaded 2-core machine.
        start_timeout=60.0,
    )
