"""Function replicas in `sluice up`: how many processes, their names and metrics ports.

The stack test (`test_replicas_stack.py`) shows keyed state following partitions when
replicas join and leave; this pins down the wiring without starting anything.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import yaml

from eventing.cli.edge import Edge
from eventing.stack import pipeline, prometheus
from eventing.stack.settings import load_settings


@pytest.fixture()
def settings(tmp_path):
    project = tmp_path / "project"
    for name in ("one", "two"):
        (project / "functions" / name).mkdir(parents=True)
        (project / "functions" / name / "main.py").write_text(f"def {name}(event): pass\n")
    (project / "functions" / "topology.yaml").write_text(yaml.safe_dump({
        "topics": {"a": {"partitions": 4}, "b": {"partitions": 4}},
        "functions": {
            "one": {"source": "one", "target": "one", "topics": ["a"], "outputs": ["b"]},
            "two": {"source": "two", "target": "two", "topics": ["a"], "outputs": ["b"],
                    "scale": {"min": 2, "max": 4}},
        }}))
    return load_settings(state_dir=tmp_path / "state", project_dir=project, port_offset=100)


def test_scale_min_and_replicas_flag_set_the_process_count(settings) -> None:
    assert pipeline.function_processes(settings) == [
        ("one", "fn-one"), ("two", "fn-two"), ("two", "fn-two-2")]
    more = dataclasses.replace(settings, replicas=(("one", 3), ("two", 1)))
    assert pipeline.function_processes(more) == [
        ("one", "fn-one"), ("one", "fn-one-2"), ("one", "fn-one-3"), ("two", "fn-two")]
    specs = [f(more) for f in pipeline.function_specs(more)]
    assert [s.name for s in specs] == ["fn-one", "fn-one-2", "fn-one-3", "fn-two"]
    ports = [s.ports[0] for s in specs]
    assert ports == list(range(more.ports.dispatcher_metrics,
                               more.ports.dispatcher_metrics + 4))
    assert prometheus._function_ports(more) == ports  # every replica is scraped
    for s in specs:  # replicas are the same function in the same group
        assert s.argv[s.argv.index("--function") + 1] in ("one", "two")


def test_unknown_function_or_too_many_processes_is_a_clear_error(settings) -> None:
    with pytest.raises(ValueError, match="names no function.*three"):
        pipeline.function_processes(dataclasses.replace(settings, replicas=(("three", 2),)))
    many = dataclasses.replace(settings, replicas=(("one", 20),))
    with pytest.raises(ValueError, match="too many function processes"):
        [f(many) for f in pipeline.function_specs(many)]


def test_replicas_survive_the_settings_file(settings) -> None:
    s = dataclasses.replace(settings, replicas=(("two", 3),))
    s.save()
    assert load_settings(state_dir=s.state_dir, project_dir=s.project_dir,
                         port_offset=100).with_saved().replicas == (("two", 3),)


@pytest.mark.parametrize("flag", ["score", "score=0", "=2", "score=two"])
def test_a_bad_replicas_flag_names_the_fix(flag) -> None:
    edge = Edge(argparse.Namespace(replicas=[flag]))
    with pytest.raises(SystemExit, match="NAME=N with N >= 1"):
        _ = edge.replicas


def test_replicas_flag_parses() -> None:
    assert Edge(argparse.Namespace(replicas=["score=2", "enrich=3"])).replicas == {
        "score": 2, "enrich": 3}
