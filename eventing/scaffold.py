"""Start a project or a function: the files `sluice new` writes.

A project is a user's own repository laid out as Sluice expects: `functions/topology.yaml`,
one folder per function, `schemas/<topic>.avsc`, `tests/`, a README and a Makefile with
the same two commands as Sluice's own (`make up`, `make test`). A new function gets its
`main.py` (a functions-framework CloudEvent target), a unit test that calls it with a
CloudEvent, an Avro schema stub for its input topic, and its topology entry: the input
topic, routed from the gateway by an event type of its own, and an output topic.

The generated names are derived from what the user typed (function `resize` reads
`resize.in` and writes `resize.out`); nothing here knows any example's topics.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from eventing.topology import DEFAULT_DEAD_LETTER_TOPIC

NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")

TOPOLOGY = """\
# The project's topology: which functions read which topics, and where their events go.
# `sluice up` runs it locally; `sluice deploy` writes Knative manifests from it.
# Add a function with `sluice new function NAME`.
"""

README = """\
# {name}

Event functions on [Sluice](https://github.com/): CloudEvents in over HTTP, functions on
Kafka topics, results in tables you query with SQL.

```sh
make up                       # start the local stack and this project's functions
make test                     # run the unit tests
sluice new function NAME      # add a function (code, test, schema, topology entry)
sluice invoke NAME --data '{{"id": "1", "amount": 2.5}}'   # try it on one event
sluice tail NAME.out          # watch what it writes
sluice deadletters list       # what failed, and why
```

Layout: `functions/topology.yaml` wires functions to topics, `functions/<name>/main.py`
holds each function, `schemas/<topic>.avsc` each topic's Avro schema (registered by
`sluice up`; check an edit with `sluice schemas check`).
"""

MAKEFILE = """\
SLUICE ?= sluice
PYTHON ?= python

.PHONY: up down test

up:
\t$(SLUICE) up

down:
\t$(SLUICE) down

test:
\t$(PYTHON) -m pytest -q tests
"""

MAIN = '''\
"""{name}: what this function does, in one line."""

import functions_framework
from cloudevents.http import CloudEvent

from eventing.fn.api import Reject


@functions_framework.cloud_event
def {target}(event: CloudEvent) -> dict:
    item = event.data                  # decoded with the input topic's schema
    if item["amount"] < 0:
        raise Reject("amount must not be negative")   # dead letter now, no retries
    return {{"id": item["id"], "amount": item["amount"] * 2}}   # to {output}
'''

TEST = '''\
"""Unit test of {name}: call it with a CloudEvent, as the dispatcher does."""

import importlib.util
from pathlib import Path

import pytest
from cloudevents.http import CloudEvent

from eventing.fn.api import Reject

SOURCE = Path(__file__).resolve().parent.parent / "functions" / "{name}" / "main.py"


def _function():
    spec = importlib.util.spec_from_file_location("{target}_main", SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.{target}


def test_doubles_the_amount():
    out = _function()(CloudEvent({{"type": "{event_type}", "source": "/test"}},
                                 {{"id": "1", "amount": 2.5}}))
    assert out == {{"id": "1", "amount": 5.0}}


def test_rejects_a_negative_amount():
    with pytest.raises(Reject):
        _function()(CloudEvent({{"type": "{event_type}", "source": "/test"}},
                               {{"id": "2", "amount": -1.0}}))
'''

SCHEMA = """\
{{
  "type": "record",
  "name": "{record}",
  "namespace": "{namespace}",
  "doc": "Events on {topic}: edit the fields, then `sluice schemas check`.",
  "fields": [
    {{"name": "id", "type": "string"}},
    {{"name": "amount", "type": "double"}}
  ]
}}
"""


class ScaffoldError(ValueError):
    """What `sluice new` cannot do, and why."""


def new_project(directory: Path) -> list[Path]:
    """Write a new project into `directory` (which must not exist or be empty)."""
    if directory.exists() and any(directory.iterdir()):
        raise ScaffoldError(f"{directory} exists and is not empty; pick a new folder")
    name = directory.resolve().name
    files = {
        directory / "functions" / "topology.yaml": TOPOLOGY + yaml.safe_dump(
            {"schemas": "../schemas", "gateway": {"routes": {}},
             "topics": {DEFAULT_DEAD_LETTER_TOPIC: {"partitions": 1}},
             "functions": {}}, sort_keys=False),
        directory / "schemas" / ".gitkeep": "",
        directory / "tests" / "__init__.py": "",
        directory / "README.md": README.format(name=name),
        directory / "Makefile": MAKEFILE,
        directory / ".gitignore": ".state/\n__pycache__/\n",
    }
    return _write(files)


def new_function(project: Path, name: str, *, event_type: str | None = None,
                 input_topic: str | None = None, output_topic: str | None = None) -> list[Path]:
    """Add function `name` to the project at `project` (files and topology entry)."""
    if not NAME.match(name):
        raise ScaffoldError(f"function name {name!r}: use a lower-case DNS label (a-z, 0-9, "
                            "-, starting with a letter): it becomes a Knative Service name")
    topology_path = project / "functions" / "topology.yaml"
    if not topology_path.exists():
        raise ScaffoldError(f"no topology at {topology_path}: run this inside a project "
                            "(`sluice new project DIR` makes one) or pass --project")
    folder = project / "functions" / name
    if folder.exists():
        raise ScaffoldError(f"{folder} already exists")
    text = topology_path.read_text()
    raw = yaml.safe_load(text) or {}
    if name in (raw.get("functions") or {}):
        raise ScaffoldError(f"{topology_path} already has a function {name!r}")
    target = name.replace("-", "_")
    input_topic = input_topic or f"{name}.in"
    output_topic = output_topic or f"{name}.out"
    project_name = re.sub(r"[^a-z0-9]+", "", project.resolve().name.lower()) or "app"
    event_type = event_type or f"dev.{project_name}.{target}.in"
    record = "".join(p.capitalize() for p in re.split(r"[-_]", name)) + "In"
    files = {
        folder / "main.py": MAIN.format(name=name, target=target, output=output_topic),
        project / "tests" / f"test_{target}.py": TEST.format(name=name, target=target,
                                                             event_type=event_type),
    }
    schema = project / "schemas" / f"{input_topic}.avsc"
    if not schema.exists():
        files[schema] = SCHEMA.format(record=record, namespace=f"dev.{project_name}",
                                      topic=input_topic)
    written = _write(files)
    raw.setdefault("gateway", {}).setdefault("routes", {})
    if raw["gateway"]["routes"] is None:
        raw["gateway"]["routes"] = {}
    raw["gateway"]["routes"].setdefault(event_type, input_topic)
    topics = raw.setdefault("topics", {}) or {}
    raw["topics"] = topics
    for topic in (input_topic, output_topic):
        topics.setdefault(topic, {"partitions": 4})
    topics.setdefault(DEFAULT_DEAD_LETTER_TOPIC, {"partitions": 1})
    functions = raw.get("functions") or {}
    entry: dict = {"topics": [input_topic], "outputs": [output_topic],
                   "delivery": {"retry": 3, "backoffDelay": "PT0.2S",
                                "deadLetterSink": DEFAULT_DEAD_LETTER_TOPIC}}
    if target != name:
        entry["target"] = target
    functions[name] = entry
    raw["functions"] = functions
    leading = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        leading.append(line + "\n")
    header = "".join(leading)
    topology_path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return [*written, topology_path]


def _write(files: dict[Path, str]) -> list[Path]:
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return list(files)
