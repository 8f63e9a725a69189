"""The real-time table server as a part of the local stack (`sluice realtime`).

One process serves every real-time table the topology declares (DuckDB allows one
writing process, and one interpreter is cheaper than one per table). It needs the
broker, the registry (the topics' schemas) and the object store (the lake catalog it
ATTACHes), so it starts after them. It reads its ports and the S3 keys from the state
folder, like every `sluice` command started with `--state-dir`.
"""

from __future__ import annotations

import sys

from eventing import topology as topo
from eventing.stack import binaries
from eventing.stack.health import http_probe, http_status
from eventing.stack.pipeline import tracing_args
from eventing.stack.process import PartSpec
from eventing.stack.settings import ENV_QUERY_TOKEN, StackSettings

NAME = "realtime"


def spec(settings: StackSettings) -> PartSpec:
    url = settings.realtime_url
    argv = [sys.executable, "-m", "eventing.cli", "--state-dir", str(settings.state_dir),
            "realtime", "--host", settings.host, "--port", str(settings.ports.realtime),
            "--bootstrap", settings.bootstrap, "--registry", settings.registry_url,
            "--topology", str(settings.topology_path),
            *tracing_args(settings, "sluice-realtime")]
    names = [t.name + "_rt" for t in topo.load(settings.topology_path).realtime_tables()]
    return PartSpec(
        name=NAME,
        argv=argv,
        env=binaries.base_env() | {"PYTHONPATH": str(settings.project_dir),
                                   "PYTHONUNBUFFERED": "1"}
        | ({ENV_QUERY_TOKEN: settings.query_token} if settings.query_token else {}),
        cwd=settings.project_dir,
        endpoint=f"real-time tables {', '.join(names) or 'none'} at {url} (POST /query)",
        health=lambda: http_status(url + "/healthz") == 200,
        ports=[settings.ports.realtime],
        liveness=http_probe(url + "/healthz"),  # the ingest thread polled in the last 10 s
        # Loading DuckDB's extensions and ATTACHing the catalog took 15 s of a 2-core
        # machine at load average 25 (measured): 30 s was too tight to start.
        start_timeout=90.0,
    )
