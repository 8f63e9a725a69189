"""`sluice deploy`: the generated bundle is accepted by the real CRD schemas, agrees with
what the local dispatcher runs, and its config files have the documented shapes.

The Knative checks read the CRDs from ../shared/knative-crds (never copied into the
project) and validate strictly: a field the schema does not declare is an error, except
under `x-kubernetes-preserve-unknown-fields`, because a real API server would silently
drop it (a typo'd `retires:` would deploy with Knative's defaults).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from eventing import topology as topo
from eventing.delivery.runner import RunSettings, build
from eventing.deploy import DeploySettings, docker, knative, kustomize, pinot, write_bundle
from eventing.deploy.apply import ToolMissing, apply
from eventing.topology import Delivery
from tests.helpers import ROOT

jsonschema = pytest.importorskip("jsonschema")

CRD_DIR = ROOT.parent / "shared" / "knative-crds"  # /work/main -> /work/shared/knative-crds
TOPOLOGY = ROOT / "functions" / "topology.yaml"
STATIC = ROOT / "infra" / "cluster"
REGENERATE = ".venv/bin/sluice deploy --dry-run --no-code --out infra/cluster"
KNATIVE_GROUPS = ("serving.knative.dev", "sources.knative.dev", "eventing.knative.dev",
                  "messaging.knative.dev")

needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(),
                                reason=f"Knative CRDs not found at {CRD_DIR} (../shared/"
                                       "knative-crds): schema checks skipped")


# --------------------------------------------------------------------------- CRD schemas

# What the API server checks for every object's metadata (ObjectMeta), strictly.
OBJECT_META = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
        "namespace": {"type": "string"}, "generateName": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}


def strict(schema: dict) -> dict:
    """An openAPIV3Schema as a strict JSON Schema (structural-schema semantics)."""
    s = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")
         and k not in ("nullable", "format")}
    if schema.get("x-kubernetes-int-or-string"):
        s.pop("type", None)
        s.pop("anyOf", None)
        s["type"] = ["integer", "string"]
    if "properties" in s:
        s["properties"] = {k: strict(v) for k, v in s["properties"].items()}
    if "items" in s:
        s["items"] = strict(s["items"])
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict(s["additionalProperties"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [strict(x) for x in s[key]]
    if s.get("type") == "object" and "additionalProperties" not in s \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        # An object without declared properties keeps nothing on a real server either.
        s["additionalProperties"] = False
    if schema.get("nullable") and "type" in s:
        types = s["type"] if isinstance(s["type"], list) else [s["type"]]
        s["type"] = [*types, "null"]
    return s


def load_crds() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict JSON Schema, for every served version."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if not version.get("served"):
                    continue
                schema = strict(version["schema"]["openAPIV3Schema"])
                schema["properties"]["metadata"] = OBJECT_META
                schema["required"] = sorted({*schema.get("required", []),
                                             "apiVersion", "kind", "metadata"})
                schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
                schema["properties"]["kind"] = {"const": kind}
                out[(f"{group}/{version['name']}", kind)] = schema
    return out


@pytest.fixture(scope="module")
def crds() -> dict:
    if not CRD_DIR.is_dir():
        pytest.skip(f"Knative CRDs not found at {CRD_DIR}: schema checks skipped")
    return load_crds()


def crd_errors(crds: dict, manifest: dict) -> list[str]:
    key = (manifest.get("apiVersion"), manifest.get("kind"))
    if key not in crds:
        return [f"no served CRD version for {key}"]
    validator = jsonschema.Draft7Validator(crds[key])
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(manifest)]


def knative_docs(docs) -> list[dict]:
    return [d for d in docs if isinstance(d, dict) and isinstance(d.get("apiVersion"), str)
            and d["apiVersion"].split("/")[0] in KNATIVE_GROUPS]


# --------------------------------------------------------------------------- the bundle


@pytest.fixture(scope="module")
def topology() -> topo.Topology:
    return topo.load(TOPOLOGY)


@pytest.fixture(scope="module")
def bundle(topology, tmp_path_factory):
    return write_bundle(topology, tmp_path_factory.mktemp("deploy"), DeploySettings())


def files_docs(bundle, pattern: str) -> list[dict]:
    return [d for p in sorted((bundle.out / "base").rglob(pattern))
            for d in yaml.safe_load_all(p.read_text()) if d]


@needs_crds
def test_every_written_knative_object_is_valid_against_the_crds(bundle, crds, topology):
    docs = knative_docs(files_docs(bundle, "*.yaml"))
    kinds = sorted(d["kind"] for d in docs)
    n = len(topology.functions)
    # One Service per function, and the ingest gateway's.
    assert kinds.count("Service") == n + 1 and kinds.count("KafkaSource") == n
    assert kinds.count("KafkaSink") == len(knative.dead_letter_topics(topology))
    for doc in docs:
        assert crd_errors(crds, doc) == [], f"{doc['kind']} {doc['metadata']['name']}"


@needs_crds
@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlays_build_and_stay_valid(bundle, crds, overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (for `kubectl kustomize`) is not installed")
    proc = subprocess.run([kubectl, "kustomize", str(bundle.out / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    built = [d for d in yaml.safe_load_all(proc.stdout) if d]
    for doc in knative_docs(built):
        assert crd_errors(crds, doc) == [], f"{overlay}: {doc['kind']} {doc['metadata']['name']}"
    services = {d["metadata"]["name"]: d for d in built  # the functions' (overlays scale them)
                if d["kind"] == "Service" and d["apiVersion"] == knative.SERVICE_API
                and d["metadata"]["name"] in bundle.services}
    assert set(services) == set(bundle.services)
    for name, svc in services.items():
        base = bundle.services[name]["spec"]["template"]
        ann = svc["spec"]["template"]["metadata"]["annotations"]
        mx = int(ann[knative.SERVING + "max-scale"])
        base_mx = int(base["metadata"]["annotations"][knative.SERVING + "max-scale"])
        res = svc["spec"]["template"]["spec"]["containers"][0]["resources"]
        assert ann[knative.SERVING + "min-scale"] == "0"
        if name == "score":  # keyed state: one pod in every environment
            assert mx == base_mx == 1
        elif overlay == "prod":
            assert mx > base_mx and res == kustomize.PROD_RESOURCES
        else:
            assert mx <= base_mx and res == kustomize.DEV_RESOURCES
        # The patch replaced one field, not the container (env, probes survive).
        assert svc["spec"]["template"]["spec"]["containers"][0]["env"] == \
            base["spec"]["containers"][0]["env"]
    configmaps = {d["metadata"]["name"] for d in built if d["kind"] == "ConfigMap"}
    assert {"trino-catalogs", "otel-collector-config", "prometheus-config", "pinot-tables",
            "grafana-dashboards", "grafana-datasources"} <= configmaps


def _break(manifest: dict, path: list, value=..., rename: str | None = None) -> dict:
    m = copy.deepcopy(manifest)
    node = m
    for key in path[:-1]:
        node = node[key]
    if rename:
        node[rename] = node.pop(path[-1])
    elif value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return m


@needs_crds
def test_deliberately_broken_manifests_are_rejected(bundle, crds):
    source = bundle.sources["validate"]
    svc = bundle.services["validate"]
    sink = next(iter(bundle.sinks.values()))
    c0 = ["spec", "template", "spec", "containers", 0]
    broken = {
        "typo in delivery (retries)": _break(source, ["spec", "delivery", "retry"],
                                             rename="retries"),
        "typo in spec (consumerGroupp)": _break(source, ["spec", "consumerGroup"],
                                                rename="consumerGroupp"),
        "typo in container (imagee)": _break(svc, [*c0, "image"], rename="imagee"),
        "unknown field in metadata": _break(svc, ["metadata", "lables"], {"a": "b"}),
        "wrong type: retry as text": _break(source, ["spec", "delivery", "retry"], "3"),
        "wrong type: topics not a list": _break(source, ["spec", "topics"], "payments.raw"),
        "wrong type: annotation not text": _break(
            svc, ["spec", "template", "metadata", "annotations",
                  knative.SERVING + "min-scale"], 0),
        "wrong type: probe port a float": _break(
            svc, [*c0, "readinessProbe", "tcpSocket", "port"], 80.5),
        "missing required: KafkaSource topics": _break(source, ["spec", "topics"]),
        "missing required: KafkaSource bootstrapServers": _break(
            source, ["spec", "bootstrapServers"]),
        "missing required: Service containers": _break(
            svc, ["spec", "template", "spec", "containers"]),
        "missing required: KafkaSink topic": _break(sink, ["spec", "topic"]),
        "missing required: sink ref name": _break(source, ["spec", "sink", "ref", "name"]),
        "wrong apiVersion (v2)": _break(source, ["apiVersion"], "sources.knative.dev/v2"),
    }
    for what, manifest in broken.items():
        assert crd_errors(crds, manifest), f"accepted a manifest with {what}"
    # ... while what the generator writes, and legal variants, pass.
    assert crd_errors(crds, _break(svc, [*c0, "readinessProbe", "tcpSocket", "port"],
                                   "http1")) == []  # x-kubernetes-int-or-string
    assert crd_errors(crds, _break(svc, ["spec", "template", "metadata", "extra"], "x")) == [], \
        "template.metadata preserves unknown fields"
    assert crd_errors(crds, {**source, "apiVersion": "sources.knative.dev/v1beta1"}) == []


# --------------------------------------------------------------------------- one source


def delivery_from_yaml(bundle, name: str) -> tuple[Delivery, dict]:
    """Read a KafkaSource back from its YAML file, following its dead-letter KafkaSink."""
    src = yaml.safe_load((bundle.out / "base" / "functions" / f"{name}.kafkasource.yaml")
                         .read_text())
    spec, d = src["spec"], src["spec"]["delivery"]
    ref = d["deadLetterSink"]["ref"]
    assert ref["kind"] == "KafkaSink"
    sink = yaml.safe_load((bundle.out / "base" / "functions" / f"{ref['name']}.kafkasink.yaml")
                          .read_text())
    delivery = Delivery(ordering=spec["ordering"], retry=d["retry"],
                        backoff_policy=d["backoffPolicy"], backoff_delay=d["backoffDelay"],
                        timeout=d["timeout"], dead_letter_sink=sink["spec"]["topic"])
    return delivery, spec


def test_kafkasources_say_what_the_dispatcher_runs(bundle, topology):
    for name, fn in topology.functions.items():
        delivery, spec = delivery_from_yaml(bundle, name)
        # The dispatcher the local runner builds for this function (no broker needed).
        d = build(fn, RunSettings(bootstrap="127.0.0.1:9", registry_url=None))
        try:
            assert delivery == d.delivery == fn.delivery, name
            assert (spec["ordering"] == "ordered") == d.ordered
            assert spec["consumerGroup"] == d.function.consumer_group
            assert spec["topics"] == list(d.function.topics)
            assert spec["initialOffset"] == d.function.initial_offset
            # Every backoff the dispatcher would wait is the one Knative computes.
            for n in range(1, delivery.retry + 1):
                assert delivery.backoff(n) == d.delivery.backoff(n)
        finally:
            d.consumer.close()
        assert spec["sink"]["ref"] == {"apiVersion": knative.SERVICE_API, "kind": "Service",
                                       "name": name}


def test_the_topology_changes_what_is_written(topology, tmp_path):
    """Not just defaults: a changed delivery spec shows up in the KafkaSource."""
    text = TOPOLOGY.read_text().replace("retry: 3", "retry: 7").replace(
        "backoffDelay: PT0.2S", "backoffDelay: PT1.5S")
    assert text != TOPOLOGY.read_text()
    (tmp_path / "functions").mkdir()
    for d in (ROOT / "functions").iterdir():
        if d.is_dir():
            shutil.copytree(d, tmp_path / "functions" / d.name,
                            ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "schemas", tmp_path / "schemas")  # `schemas: ../schemas`
    path = tmp_path / "functions" / "topology.yaml"
    path.write_text(text)
    changed = topo.load(path)
    b = write_bundle(changed, tmp_path / "out", DeploySettings(namespace="payments"))
    delivery, spec = delivery_from_yaml(b, "validate")
    assert delivery.retry == 7 and delivery.backoff_delay == "PT1.5S"
    assert delivery == changed.function("validate").delivery
    assert b.sources["validate"]["metadata"]["namespace"] == "payments"


def test_scale_to_zero_and_keda_annotations(bundle, topology):
    for name, fn in topology.functions.items():
        ann = bundle.services[name]["spec"]["template"]["metadata"]["annotations"]
        assert ann[knative.SERVING + "min-scale"] == "0"
        stateful = knative.has_keyed_state(fn)
        assert stateful == (name == "score")  # the example's one function with a store
        assert ann[knative.SERVING + "max-scale"] == ("1" if stateful else str(fn.scale.max))
        assert ann[knative.SERVING + "target"] == str(fn.scale.target_concurrency)
        src = bundle.sources[name]["metadata"]["annotations"]
        assert src[knative.EVENTING + "class"] == "keda.autoscaling.knative.dev"
        assert src[knative.EVENTING + "min-scale"] == "0"
        assert src[knative.EVENTING + "lag-threshold"] == str(fn.scale.lag_threshold)
        partitions = sum(topology.all_topics()[t] for t in fn.topics)
        assert 1 <= int(src[knative.EVENTING + "max-scale"]) <= min(fn.scale.max, partitions)
        env = {e["name"]: e["value"] for e in bundle.services[name]["spec"]["template"]["spec"][
            "containers"][0]["env"]}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == DeploySettings().otlp_endpoint
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == DeploySettings().bootstrap
        assert env["SCHEMA_REGISTRY_URL"] == DeploySettings().registry_url
        assert json.loads(env["SLUICE_OUTPUTS"]) == {t: list(v) for t, v in fn.outputs.items()}


def test_every_topic_has_a_strimzi_topic(bundle, topology):
    topics = {d["spec"]["topicName"]: d for d in files_docs(bundle, "topics.yaml")}
    for name, parts in topology.all_topics().items():
        assert topics[name]["spec"]["partitions"] == parts
        assert topics[name]["metadata"]["labels"]["strimzi.io/cluster"] == "sluice"
    assert topics["_schemas"]["spec"]["config"]["cleanup.policy"] == "compact"
    assert topics["score.state"]["spec"]["config"]["cleanup.policy"] == "compact"


# --------------------------------------------------------------------------- images


def test_each_image_has_only_its_function_and_the_host_runtime(bundle, topology):
    runtime = {p.relative_to(docker.PROJECT_DIR).as_posix() for p in docker.runtime_modules()}
    assert {"eventing/fn/host.py", "eventing/fn/runtime.py", "eventing/cloudevent/event.py",
            "eventing/cloudevent/json.py", "eventing/cloudevent/kafka.py",
            "eventing/cloudevent/http.py"} <= runtime
    assert not any(p.startswith("eventing/cli/") for p in runtime)
    assert "eventing/ingest/gateway.py" not in runtime
    for name in topology.functions:
        ctx = bundle.out / "functions" / name
        copied = {p.relative_to(ctx).as_posix() for p in (ctx / "eventing").rglob("*.py")}
        assert copied == runtime
        fn_files = {p.relative_to(ctx / "function").as_posix()
                    for p in (ctx / "function").rglob("*") if p.is_file()}
        src = topology.function(name).source.parent
        assert fn_files == {p.relative_to(src).as_posix() for p in src.rglob("*")
                            if p.is_file() and "__pycache__" not in p.parts}
        reqs = (ctx / "requirements.txt").read_text().splitlines()
        assert any(r.startswith("functions-framework==") for r in reqs)
        assert not any(r.startswith(("duckdb", "pyiceberg", "starlette")) for r in reqs)
        text = (ctx / "Dockerfile").read_text()
        assert "FROM python:3.11-slim" in text and "USER 10001" in text
        assert "--target handle --signature-type http" in text


# --------------------------------------------------------------------------- kn.sh


def test_kn_script_creates_what_the_yaml_declares(bundle, topology, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    for tool in ("kn", "kubectl"):
        shim = bin_dir / tool
        shim.write_text(f"#!{sys.executable}\nimport json, sys\n"
                        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n"
                        "if sys.argv[1:3] == ['create', 'namespace']: print('kind: Namespace')\n"
                        # read a piped manifest, or its writer may hit a closed pipe
                        "if sys.argv[-2:] == ['-f', '-']: sys.stdin.read()\n")
        shim.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(["bash", str(bundle.out / "kn.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    creates = {c[3]: c for c in calls if Path(c[0]).name == "kn" and c[1:3] == ["service",
                                                                                "create"]}
    assert set(creates) == set(topology.functions)
    applied = [c[-1] for c in calls if Path(c[0]).name == "kubectl" and c[1] == "apply"]
    for name, argv in creates.items():
        def flag(f, argv=argv):
            return [argv[i + 1] for i, a in enumerate(argv) if a == f]
        svc = bundle.services[name]
        c = svc["spec"]["template"]["spec"]["containers"][0]
        assert flag("--scale-min") == ["0"]
        assert flag("--image") == [c["image"]]
        assert dict(e.split("=", 1) for e in flag("--env")) == {
            e["name"]: e["value"] for e in c["env"]}
        assert "--cluster-local" in argv
        # KafkaSources go through kubectl, after topics and sinks.
        assert f"base/functions/{name}.kafkasource.yaml" in applied
    assert applied.index("base/kafka/topics.yaml") < applied.index(
        "base/functions/validate.kafkasource.yaml")
    text = (bundle.out / "kn.sh").read_text()
    assert "cannot set delivery" in text


# --------------------------------------------------------------------------- config formats


def test_otel_collector_config_is_wired(bundle):
    path = bundle.out / "base" / "config" / "otel-collector-config" / "collector.yaml"
    cfg = yaml.safe_load(path.read_text())
    for section in ("receivers", "processors", "exporters", "connectors", "service"):
        assert section in cfg
    assert set(cfg["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    assert "batch" in cfg["processors"]
    assert "spanmetrics" in cfg["connectors"]
    assert cfg["exporters"]["otlp/tempo"]["endpoint"] == DeploySettings().tempo_endpoint
    pipelines = cfg["service"]["pipelines"]
    defined = {kind: set(cfg.get(kind, {})) for kind in ("receivers", "processors",
                                                         "exporters", "connectors")}
    used_as_exporter, used_as_receiver = set(), set()
    for name, p in pipelines.items():
        assert name.split("/")[0] in ("traces", "metrics", "logs")
        assert p["receivers"] and p["exporters"]
        for r in p["receivers"]:
            assert r in defined["receivers"] | defined["connectors"], r
            used_as_receiver.add(r)
        for x in p.get("processors", []):
            assert x in defined["processors"], x
        for e in p["exporters"]:
            assert e in defined["exporters"] | defined["connectors"], e
            used_as_exporter.add(e)
    # A connector must be an exporter in one pipeline and a receiver in another.
    for conn in defined["connectors"]:
        assert conn in used_as_exporter and conn in used_as_receiver
    assert "prometheus" in pipelines["metrics/spanmetrics"]["exporters"]
    assert "spanmetrics" in pipelines["traces"]["exporters"]
    assert set(cfg["service"]["extensions"]) <= set(cfg["extensions"])


def test_pinot_schema_and_realtime_table(bundle):
    d = bundle.out / "base" / "config" / "pinot-tables"
    schema = json.loads((d / "payments_scored.schema.json").read_text())
    table = json.loads((d / "payments_scored.table.json").read_text())
    avro = json.loads((ROOT / "schemas" / "payments.scored.avsc").read_text())
    columns = {f["name"]: f for k in ("dimensionFieldSpecs", "metricFieldSpecs",
                                      "dateTimeFieldSpecs") for f in schema[k]}
    # The local real-time table's columns: the Avro fields plus Kafka's coordinates.
    assert set(columns) == {f["name"] for f in avro["fields"]} | {"kafka_partition",
                                                                  "kafka_offset"}
    assert all(f["dataType"] in {"STRING", "INT", "LONG", "FLOAT", "DOUBLE", "BOOLEAN", "BYTES",
                                 "TIMESTAMP"} for f in columns.values())
    (time_col,) = schema["dateTimeFieldSpecs"]
    assert time_col == {"name": "event_time", "dataType": "TIMESTAMP",
                        "format": "1:MILLISECONDS:TIMESTAMP", "granularity": "1:MILLISECONDS"}
    assert {"score", "amount"} <= {m["name"] for m in schema["metricFieldSpecs"]}
    assert table["tableType"] == "REALTIME"
    assert table["tableName"] == schema["schemaName"] == table["segmentsConfig"]["schemaName"]
    assert table["segmentsConfig"]["timeColumnName"] == "event_time"
    for key in ("tenants", "tableIndexConfig", "ingestionConfig"):
        assert key in table
    (stream,) = table["ingestionConfig"]["streamIngestionConfig"]["streamConfigMaps"]
    assert stream["streamType"] == "kafka"
    assert stream["stream.kafka.topic.name"] == "payments.scored"
    assert stream["stream.kafka.broker.list"] == DeploySettings().bootstrap
    assert stream["stream.kafka.decoder.class.name"] == pinot.DECODER == (
        "org.apache.pinot.plugin.inputformat.avro.confluent."
        "KafkaConfluentSchemaRegistryAvroMessageDecoder")
    assert stream["stream.kafka.decoder.prop.schema.registry.rest.url"] == \
        DeploySettings().registry_url
    assert all(isinstance(v, str) for v in stream.values())  # Pinot's map is string->string
    # alerts.fraud is declared as a real-time table too.
    assert (d / "alerts_fraud.table.json").exists()
    job = files_docs(bundle, "setup-job.yaml")[0]
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "/schemas" in script and "/tables" in script


def read_properties(text: str) -> dict[str, str]:
    """Java .properties (as Trino reads catalogs): key=value lines, # comments."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        assert "=" in line, f"not key=value: {line!r}"
        key, value = line.split("=", 1)
        assert key.strip() not in out, f"duplicate key {key}"
        out[key.strip()] = value.strip()
    return out


def test_trino_catalogs(bundle):
    d = bundle.out / "base" / "config" / "trino-catalogs"
    ice = read_properties((d / "iceberg.properties").read_text())
    assert ice["connector.name"] == "iceberg"
    assert ice["iceberg.catalog.type"] == "rest"
    assert ice["iceberg.rest-catalog.uri"].startswith("http")
    assert ice["s3.aws-secret-key"].startswith("${ENV:")  # no secret in the bundle
    pin = read_properties((d / "pinot.properties").read_text())
    assert pin["connector.name"] == "pinot"
    host, port = pin["pinot.controller-urls"].split(":")
    assert host and int(port) == 9000


def test_prometheus_config_and_dashboard_queries(bundle, tmp_path):
    d = bundle.out / "base" / "config" / "prometheus-config"
    cfg = yaml.safe_load((d / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in cfg["scrape_configs"]}
    assert {"otel-collector-spanmetrics", "knative-functions"} <= jobs
    dashboard = json.loads((bundle.out / "base" / "config" / "grafana-dashboards"
                            / "sluice-pipeline.json").read_text())
    assert dashboard["uid"] and dashboard["panels"]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    provider = yaml.safe_load((bundle.out / "base" / "config" / "grafana-dashboard-provider"
                               / "dashboards.yaml").read_text())
    assert provider["apiVersion"] == 1 and provider["providers"][0]["type"] == "file"
    ds = yaml.safe_load((bundle.out / "base" / "config" / "grafana-datasources"
                         / "datasources.yaml").read_text())
    assert {x["uid"] for x in ds["datasources"]} >= {p["datasource"]["uid"]
                                                      for p in dashboard["panels"]}
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: config structure checked, syntax not")
    # Rule files are mounted next to the config; check it where they sit side by side.
    local = tmp_path / "prometheus.yml"
    cfg["rule_files"] = [str(d / Path(r).name) for r in cfg["rule_files"]]
    # Debian's Prometheus is built without Kubernetes discovery, so its promtool rejects
    # `kubernetes_sd_configs`: check those by hand, and the rest (relabelling too) by promtool.
    for job in cfg["scrape_configs"]:
        for sd in job.pop("kubernetes_sd_configs", []):
            assert sd["role"] in ("node", "service", "pod", "endpoints", "endpointslice",
                                  "ingress")
            assert all(isinstance(n, str) for n in sd.get("namespaces", {}).get("names", []))
            job.setdefault("static_configs", [{"targets": ["placeholder:9091"]}])
    local.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([promtool, "check", "config", "--syntax-only", str(local)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = tmp_path / "dashboard.rules.yml"  # every panel query, parsed by Prometheus
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": [
        {"record": f"sluice:panel{i}", "expr": e} for i, e in enumerate(exprs)]}]}))
    proc = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- apply, static


def test_apply_without_kubectl_says_so_and_points_at_dry_run(bundle):
    with pytest.raises(ToolMissing) as err:
        apply(bundle.out, "dev", which=lambda name: None)
    assert "kubectl is not installed" in str(err.value) and "--dry-run" in str(err.value)
    with pytest.raises(ToolMissing) as err:
        apply(bundle.out, "dev", which=lambda name: "/usr/bin/kn" if name == "kn" else None)
    assert "kn cannot create KafkaSources" in str(err.value)
    calls = []
    rc = apply(bundle.out, "prod", which=lambda name: f"/usr/bin/{name}",
               run=lambda argv, check: calls.append(argv) or subprocess.CompletedProcess(argv, 0))
    assert rc == 0 and calls == [["kubectl", "apply", "-k",
                                  str(bundle.out / "overlays" / "prod")]]


def test_cli_without_kubectl_prints_the_message(tmp_path):
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # neither kubectl nor kn
    proc = subprocess.run([sys.executable, "-m", "eventing.cli", "deploy", "--out",
                           str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert "kubectl is not installed" in proc.stderr and "--dry-run" in proc.stderr
    assert (tmp_path / "out" / "overlays" / "dev" / "kustomization.yaml").exists()


def test_checked_in_infra_cluster_is_current(topology, tmp_path):
    if not STATIC.is_dir():
        pytest.skip(f"{STATIC} not present")
    fresh = tmp_path / "cluster"
    write_bundle(topology, fresh, DeploySettings(), include_code=False)
    want = {p.relative_to(fresh): p.read_bytes() for p in fresh.rglob("*") if p.is_file()}
    have = {p.relative_to(STATIC): p.read_bytes() for p in STATIC.rglob("*") if p.is_file()}
    stale = sorted(str(p) for p in set(want) | set(have) if want.get(p) != have.get(p))
    assert not stale, f"infra/cluster is stale ({stale[:5]}...); regenerate: {REGENERATE}"
    assert os.access(STATIC / "kn.sh", os.X_OK)


def test_no_two_pods_ever_share_a_key_of_a_function_with_keyed_state(tmp_path):
    """A Service spreads a KafkaSource's events over its pods, and each pod holds its own
    in-memory copy of a keyed store: with two pods, one key's events would update two
    diverging copies. So a function with a `store` is pinned to one pod in the base and
    in every overlay, whatever its topology asks; a stateless one keeps its scale."""
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump({
        "topics": {"in": {"partitions": 8}, "out": {"partitions": 8}},
        "functions": {
            "counter": {"source": str(ROOT / "tests" / "functions" / "counter"),
                        "topics": ["in"], "outputs": ["out"], "scale": {"min": 2, "max": 8}},
            "flaky": {"source": str(ROOT / "tests" / "functions" / "flaky"),
                      "topics": ["in"], "outputs": ["out"], "scale": {"min": 2, "max": 8}},
        }}))
    t = topo.load(tmp_path / "topology.yaml")
    b = write_bundle(t, tmp_path / "out", DeploySettings(), include_code=False)

    def scale(svc: dict) -> tuple[str, str]:
        ann = svc["spec"]["template"]["metadata"]["annotations"]
        return ann[knative.SERVING + "min-scale"], ann[knative.SERVING + "max-scale"]

    assert scale(b.services["counter"]) == ("1", "1")
    assert scale(b.services["flaky"]) == ("2", "8")
    for env in ("dev", "prod"):
        doc = yaml.safe_load((tmp_path / "out" / "overlays" / env / "kustomization.yaml")
                             .read_text())
        for patch in doc["patches"]:
            if patch["target"].get("kind") != "Service":
                continue
            ops = {op["path"]: op.get("value") for op in yaml.safe_load(patch["patch"])}
            mx = ops["/spec/template/metadata/annotations/autoscaling.knative.dev~1max-scale"]
            assert (mx == "1") == (patch["target"]["name"] == "counter"), (env, patch)
    kn = (tmp_path / "out" / "kn.sh").read_text()
    counter_cmd = kn.split("kn service create counter", 1)[1].split("kn service create", 1)[0]
    assert "--scale-max 1 " in counter_cmd.replace("\\\n", " ").replace("  ", " ")
