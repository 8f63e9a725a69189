"""The embedded Confluent-API schema registry, run as its own process."""

from __future__ import annotations

import sys

from eventing.stack import binaries
from eventing.stack.health import http_probe, http_status
from eventing.stack.process import PartSpec
from eventing.stack.settings import StackSettings

NAME = "registry"


def spec(settings: StackSettings) -> PartSpec:
    return PartSpec(
        name=NAME,
        argv=[
            sys.executable, "-m", "eventing.cli", "registry",
            "--host", settings.host,
            "--port", str(settings.ports.registry),
            "--bootstrap", settings.bootstrap,
            "--topic", settings.schemas_topic,
        ],
        env=binaries.base_env() | {"PYTHONPATH": str(settings.project_dir)},
        cwd=settings.project_dir,
        endpoint=f"schema registry {settings.registry_url}",
        health=lambda: http_status(settings.registry_url + "/subjects") == 200,
        ports=[settings.ports.registry],
        # `/` answers from the event loop; `/subjects` takes the store's lock.
        liveness=http_probe(settings.registry_url + "/"),
    )
