"""`sluice deploy` writes the whole platform from the topology, for either example: the
ingest gateway (Knative Service, token from a Secret), the lake sink (a Deployment
serving every declared table), Pinot schemas and REALTIME tables with the local
real-time table's columns, the topology ConfigMap and the optional registry.

Knative kinds are checked against the CRDs in ../shared/knative-crds; Kubernetes' own
kinds strictly against Kubernetes' object schemas (the `kubernetes` client's generated
models: an undeclared field is an error, required fields must be there). The README's
queries are checked against the columns each catalog really has.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import sqlglot
import yaml
from sqlglot.optimizer.qualify import qualify

from eventing import topology as topo
from eventing.deploy import DeploySettings, platform, write_bundle
from eventing.tables import query
from eventing.tables.lake import iceberg_schema
from eventing.tables.realtime import RealtimeSettings, RealtimeTable
from tests.helpers import ROOT
from tests.test_deploy import crd_errors, crds, knative_docs, needs_crds  # noqa: F401

k8s = pytest.importorskip("kubernetes.client")

EXAMPLES = {"payments": ROOT / "functions" / "topology.yaml",
            "iot": ROOT / "examples" / "iot" / "topology.yaml"}
# (apiVersion, kind) -> the kubernetes client's model of it
K8S_MODELS = {("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
              ("batch/v1", "Job"): "V1Job", ("v1", "ConfigMap"): "V1ConfigMap"}
PINOT_TYPES = {"VARCHAR": "STRING", "INTEGER": "INT", "BIGINT": "LONG", "DOUBLE": "DOUBLE",
               "FLOAT": "FLOAT", "BOOLEAN": "BOOLEAN", "BLOB": "BYTES",
               "TIMESTAMP WITH TIME ZONE": "TIMESTAMP"}


@pytest.fixture(scope="module", params=sorted(EXAMPLES))
def example(request, tmp_path_factory):
    topology = topo.load(EXAMPLES[request.param])
    out = tmp_path_factory.mktemp(f"deploy-{request.param}")
    return topology, write_bundle(topology, out, DeploySettings(), include_code=False)


def docs_of(out: Path, pattern: str = "*.yaml") -> list[dict]:
    return [d for p in sorted(out.rglob(pattern)) if "overlays" not in p.parts
            for d in yaml.safe_load_all(p.read_text()) if isinstance(d, dict)]


def named(bundle, kind: str, name: str) -> dict:
    return next(d for d in docs_of(bundle.out / "base") if d.get("kind") == kind
                and d.get("metadata", {}).get("name") == name)


# --------------------------------------------------------------------------- Kubernetes


def k8s_errors(value, type_name: str, path: str = "") -> list[str]:
    """Strict structural check of `value` against a kubernetes-client type name."""
    if type_name.lower().startswith("list["):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, v in enumerate(value) for e in k8s_errors(v, type_name[5:-1],
                                                                    f"{path}[{i}]")]
    if type_name.lower().startswith(("dict(", "dict[")):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        inner = type_name[5:-1].split(", ", 1)[1]
        return [e for k, v in value.items() for e in k8s_errors(v, inner, f"{path}/{k}")]
    simple = {"str": str, "int": int, "bool": bool, "float": (int, float), "bytes": str}
    if type_name in simple:
        ok = isinstance(value, simple[type_name]) and not (
            type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
    if type_name == "object":  # int-or-string, quantities
        return [] if isinstance(value, str | int | float) else [f"{path}: not a scalar"]
    model = getattr(k8s, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} mapping"]
    by_key = {key: attr for attr, key in model.attribute_map.items()}
    errors = [f"{path}/{key}: not a field of {type_name}" for key in value if key not in by_key]
    for key, v in value.items():
        if key in by_key:
            errors += k8s_errors(v, model.openapi_types[by_key[key]], f"{path}/{key}")
    return errors


def k8s_object_errors(doc: dict) -> list[str]:
    model = K8S_MODELS[(doc["apiVersion"], doc["kind"])]
    errors = k8s_errors(doc, model)
    if not errors:  # required fields and enums: what the client's models enforce
        from kubernetes.client import ApiClient

        try:
            ApiClient()._ApiClient__deserialize(doc, model)
        except (ValueError, TypeError) as exc:
            errors.append(str(exc))
    return errors


def test_kubernetes_objects_are_valid_against_kubernetes_schemas(example) -> None:
    topology, bundle = example
    docs = [d for d in docs_of(bundle.out / "base") + docs_of(bundle.out / "optional")
            if (d.get("apiVersion"), d.get("kind")) in K8S_MODELS]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Deployment") == 3 if topology.tables else 2  # sink, registry, otel
    assert "Job" in kinds  # Pinot set-up
    for doc in docs:
        assert k8s_object_errors(doc) == [], f"{doc['kind']} {doc['metadata']['name']}"


def test_the_strict_kubernetes_check_catches_typos() -> None:
    topology = topo.load(EXAMPLES["iot"])
    sink = platform.lake_sink(topology, DeploySettings())
    assert k8s_object_errors(sink) == []
    bad = json.loads(json.dumps(sink))
    bad["spec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    assert any("imagee: not a field of V1Container" in e for e in k8s_object_errors(bad))
    bad = json.loads(json.dumps(sink))
    del bad["spec"]["selector"]
    assert any("selector" in e for e in k8s_object_errors(bad))
    bad = json.loads(json.dumps(sink))
    bad["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"][
        "secretKeyRef"]["keyy"] = "x"
    assert any("keyy" in e for e in k8s_object_errors(bad))


@needs_crds
def test_gateway_and_functions_pass_the_knative_crds(example, crds) -> None:  # noqa: F811
    topology, bundle = example
    docs = knative_docs(docs_of(bundle.out / "base"))
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert services == {platform.GATEWAY, *topology.functions}
    for doc in docs:
        assert crd_errors(crds, doc) == [], f"{doc['kind']} {doc['metadata']['name']}"


def test_secrets_are_referenced_never_written(example) -> None:
    topology, bundle = example
    settings = DeploySettings()
    gateway = named(bundle, "Service", platform.GATEWAY)
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    assert container["env"] == [{"name": "SLUICE_GATEWAY_TOKEN", "valueFrom": {
        "secretKeyRef": {"name": settings.gateway_token_secret, "key": "token"}}}]
    assert "--host" in container["args"] and container["args"][
        container["args"].index("--registry") + 1] == settings.registry_url
    assert not any(d.get("kind") == "Secret" for d in docs_of(bundle.out))
    sink = named(bundle, "Deployment", platform.LAKE_SINK)
    (c,) = sink["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]} == {
        "SLUICE_S3_ACCESS_KEY": {"name": settings.lake_secret, "key": "access-key"},
        "SLUICE_S3_SECRET_KEY": {"name": settings.lake_secret, "key": "secret-key"}}
    assert sink["spec"]["strategy"] == {"type": "Recreate"}  # never two writers


def test_the_topology_configmap_loads_and_serves_every_table(example, tmp_path) -> None:
    topology, bundle = example
    text = (bundle.out / "base" / "config" / platform.TOPOLOGY_CONFIGMAP
            / platform.TOPOLOGY_FILE).read_text()
    (tmp_path / "topology.yaml").write_text(text)
    loaded = topo.load(tmp_path / "topology.yaml")
    assert loaded.tables == {n: t for n, t in topology.tables.items()}
    assert loaded.routes == topology.routes and loaded.trace_ids == topology.trace_ids
    assert loaded.functions == {}
    kustomization = yaml.safe_load((bundle.out / "base" / "kustomization.yaml").read_text())
    assert "platform/gateway.service.yaml" in kustomization["resources"]
    assert "platform/lakesink.deployment.yaml" in kustomization["resources"]
    registry = yaml.safe_load_all((bundle.out / "optional" / "registry" / "registry.yaml")
                                  .read_text())
    topic = next(d for d in registry if d and d["kind"] == "KafkaTopic")
    assert topic["spec"]["topicName"] == "_schemas"
    assert topic["spec"]["config"]["cleanup.policy"] == "compact"


# --------------------------------------------------------------------------- Pinot


def local_realtime_columns(topology: topo.Topology, table: topo.Table) -> dict[str, str]:
    avro = json.loads((topology.schemas / f"{table.topic}.avsc").read_text())
    db = RealtimeTable(RealtimeSettings(bootstrap="x:1", registry_url="http://x",
                                        topic=table.topic, table=table.name,
                                        time_field=table.time_field), avro)
    return db.columns(table.name + "_rt")


def pinot_columns(bundle, name: str) -> dict[str, str]:
    schema = json.loads((bundle.out / "base" / "config" / "pinot-tables"
                         / f"{name}.schema.json").read_text())
    return {f["name"]: f["dataType"] for k in ("dimensionFieldSpecs", "metricFieldSpecs",
                                               "dateTimeFieldSpecs") for f in schema[k]}


def test_each_pinot_table_has_the_local_realtime_tables_columns(example) -> None:
    topology, bundle = example
    assert topology.realtime_tables()
    for table in topology.realtime_tables():
        local = local_realtime_columns(topology, table)
        pinot = pinot_columns(bundle, table.name)
        assert set(pinot) == set(local), table.name
        assert {c: PINOT_TYPES[t] for c, t in local.items()} == pinot
        config = json.loads((bundle.out / "base" / "config" / "pinot-tables"
                             / f"{table.name}.table.json").read_text())
        assert config["segmentsConfig"]["timeColumnName"] == table.time_field
        (stream,) = config["ingestionConfig"]["streamIngestionConfig"]["streamConfigMaps"]
        assert stream["stream.kafka.topic.name"] == table.topic
        assert stream["stream.kafka.metadata.populate"] == "true"
        transforms = {t["columnName"] for t in config["ingestionConfig"]["transformConfigs"]}
        assert transforms == {"kafka_partition", "kafka_offset"}
    job = next(d for d in docs_of(bundle.out / "base") if d.get("kind") == "Job")
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    for table in topology.realtime_tables():
        assert f"@/config/{table.name}.table.json" in script


# --------------------------------------------------------------------------- README SQL


def catalog_columns() -> dict[str, dict[str, str]]:
    """Short table name -> {column: type} as each catalog has it: the lake's from the
    Iceberg schema the sink creates, the real-time ones from the generated Pinot schema."""
    out: dict[str, dict[str, str]] = {}
    settings = DeploySettings()
    from eventing.deploy import pinot

    for path in EXAMPLES.values():
        t = topo.load(path)
        for table in t.tables.values():
            avro = json.loads((t.schemas / f"{table.topic}.avsc").read_text())
            lake = iceberg_schema(avro, table.time_field)
            out[table.name] = {f.name: str(f.field_type) for f in lake.fields}
        for name, (schema, _) in pinot.configs(t, settings).items():
            out[name + query.DEFAULT_NAMES.realtime_suffix] = {
                f["name"]: f["dataType"] for k in ("dimensionFieldSpecs", "metricFieldSpecs",
                                                   "dateTimeFieldSpecs") for f in schema[k]}
    return out


def readme_queries() -> list[str]:
    text = (ROOT / "README.md").read_text()
    found = [m.group(1) for m in re.finditer(r'sluice query "((?:[^"\\]|\\.)*)"', text)]
    found += re.findall(r"```sql\n(.*?)```", text, re.DOTALL)
    return [q for q in found if query.metadata_statement(q) is None and not q.startswith("<")]


def test_every_readme_query_reads_only_columns_its_catalog_has() -> None:
    columns = catalog_columns()
    assert {"payments_scored", "payments_scored_rt", "device_stats_rt",
            "sensor_anomalies"} <= set(columns)
    queries = readme_queries()
    assert len(queries) >= 6
    iot_tables = 0
    for sql in queries:
        tree = sqlglot.parse_one(sql, read="trino")
        tables = {t.name for t in tree.find_all(sqlglot.exp.Table)}
        iot_tables += bool(tables & {"device_stats", "device_stats_rt", "sensor_anomalies",
                                     "sensor_anomalies_rt"})
        schema = {t: columns[t] for t in tables if t in columns}
        ctes = {c.alias_or_name for c in tree.find_all(sqlglot.exp.CTE)}
        assert tables - ctes <= set(schema), f"unknown table in README query: {sql}"
        # Raises OptimizeError naming the column when one is not in its table.
        qualify(tree, schema=schema, dialect="trino", validate_qualify_columns=True)
    assert iot_tables >= 2  # the second example's queries are checked too


def test_the_check_catches_a_column_the_catalog_lacks() -> None:
    from sqlglot.errors import OptimizeError

    columns = catalog_columns()
    tree = sqlglot.parse_one("SELECT no_such_column FROM payments_scored_rt", read="trino")
    with pytest.raises(OptimizeError, match="no_such_column"):
        qualify(tree, schema={"payments_scored_rt": columns["payments_scored_rt"]},
                dialect="trino", validate_qualify_columns=True)


def test_functions_on_a_cluster_get_the_declared_trace_ids(example) -> None:
    from eventing.fn import env as host_env

    topology, bundle = example
    for name in topology.functions:
        (container,) = bundle.services[name]["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert json.loads(env[host_env.ENV_TRACE_IDS]) == topology.trace_ids
        settings = host_env.tracing_from_env(env, name)
        assert dict(settings.business_ids) == topology.trace_ids
    with pytest.raises(host_env.HostConfigError, match="JSON object"):
        host_env.tracing_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                   host_env.ENV_TRACE_IDS: "[1]"}, "f")
