"""The image's entry point, run for real: the CMD parsed from each written Dockerfile,
started with the env of the generated Knative Service, in the build context (which is
what the Dockerfile copies into its WORKDIR), against the test stack's broker and
registry. A binary-mode CloudEvent is POSTed exactly as a KafkaSource sends a record;
the answer must be 2xx and the function's output must be in its output topic.

Differences from a container, on purpose: the listen host is 127.0.0.1 (tests bind
loopback only; the image's default is 0.0.0.0) and the port is a free one (Knative sets
PORT). Python packages come from the project's venv instead of the image's pip install.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from eventing import topology as topo
from eventing.cloudevent import http as ce_http
from eventing.delivery.invoke import record_event
from eventing.deploy import DeploySettings, docker, write_bundle
from eventing.kafka import consumer_config, ensure_topics
from eventing.serde import AvroSerde
from tests.helpers import ROOT, free_port, stop_process

VENV_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- Dockerfile


def logical_lines(text: str) -> list[str]:
    """Dockerfile instructions with `\\` continuations joined and comments dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    return out


def parse_dockerfile(text: str) -> dict:
    """ENV, WORKDIR, COPY and the CMD/ENTRYPOINT argv as Docker would run them."""
    env: dict[str, str] = {}
    copies: list[tuple[str, str]] = []
    workdir, cmd, entrypoint = "/", None, None
    for line in logical_lines(text):
        instr, _, rest = line.partition(" ")
        instr, rest = instr.upper(), rest.strip()
        if instr == "ENV":
            for word in shlex.split(rest):
                key, _, value = word.partition("=")
                env[key] = value
        elif instr == "WORKDIR":
            workdir = rest
        elif instr == "COPY":
            *srcs, dest = shlex.split(rest)
            copies += [(s, dest) for s in srcs]
        elif instr in ("CMD", "ENTRYPOINT"):
            # exec form is a JSON array; shell form runs under /bin/sh -c
            argv = json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]
            if instr == "CMD":
                cmd = argv
            else:
                entrypoint = argv
    return {"env": env, "workdir": workdir, "copies": copies,
            "argv": (entrypoint or []) + (cmd or [])}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def deployed(stack, tmp_path_factory):
    """The bundle written for the test stack's broker and registry."""
    topology = topo.load(ROOT / "functions" / "topology.yaml")
    ensure_topics(stack.bootstrap, topology.all_topics())
    out = tmp_path_factory.mktemp("deploy-entry")
    settings = DeploySettings(bootstrap=stack.bootstrap, registry_url=stack.registry_url,
                              otlp_endpoint="http://127.0.0.1:9")  # no collector needed
    return topology, write_bundle(topology, out, settings)


class Served:
    """The Dockerfile's command running in the build context folder."""

    def __init__(self, ctx: Path, service: dict, log: Path) -> None:
        spec = parse_dockerfile((ctx / "Dockerfile").read_text())
        # The context is laid out as the image's WORKDIR: every COPY keeps its path.
        for src, dest in spec["copies"]:
            assert Path(dest.rstrip("/") or ".").as_posix() in (
                Path(src.rstrip("/")).as_posix(), "."), (src, dest)
            assert (ctx / src).exists(), src
        container = service["spec"]["template"]["spec"]["containers"][0]
        self.port = free_port()
        env = {"PATH": f"{VENV_BIN}:/usr/bin:/bin", "HOME": str(ctx)}
        env.update(spec["env"])
        env.update({e["name"]: e["value"] for e in container["env"]})
        env.update({docker.PORT_VAR: str(self.port), docker.LISTEN_HOST_VAR: "127.0.0.1"})
        self.argv = spec["argv"]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log
        self.log = log.open("w")
        self.proc = subprocess.Popen(self.argv, cwd=ctx, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                if httpx.get(self.url, timeout=1).status_code == 405:  # up (POST only)
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"entry point did not start:\n{log.read_text()}")

    def stop(self) -> None:
        stop_process(self.proc, group=True)  # sh, the gunicorn master and its worker
        self.log.close()


def read_matching(bootstrap: str, topic: str, predicate, timeout: float = 15.0) -> list:
    """Records of `topic` (all partitions, from the start) that satisfy `predicate`."""
    consumer = Consumer(consumer_config(bootstrap, f"deploy-test-{uuid.uuid4().hex}"))
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        found, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline and not found:
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error() is None and predicate(msg):
                    found.append(msg)
        return found
    finally:
        consumer.close()


# --------------------------------------------------------------------------- the test


def test_dockerfile_cmd_parsing():
    text = ('FROM x\nENV A=1 \\\n    B="two words"\nWORKDIR /app\nCOPY a b/ ./\n'
            'CMD exec run --port "$PORT"\n')
    spec = parse_dockerfile(text)
    assert spec["env"] == {"A": "1", "B": "two words"}
    assert spec["argv"] == ["/bin/sh", "-c", 'exec run --port "$PORT"']
    assert spec["copies"] == [("a", "./"), ("b/", "./")]
    assert parse_dockerfile('ENTRYPOINT ["a", "b"]\nCMD ["c"]')["argv"] == ["a", "b", "c"]


@pytest.fixture(scope="module")
def servers(deployed, tmp_path_factory):
    """Every function's image command, running."""
    topology, bundle = deployed
    logs = tmp_path_factory.mktemp("entry-logs")
    started: dict[str, Served] = {}
    try:
        for name in topology.functions:
            started[name] = Served(bundle.out / "functions" / name, bundle.services[name],
                                   logs / f"{name}.log")
        yield started
    finally:
        for s in started.values():
            s.stop()


def post_as_kafkasource(server: Served, msg, function: str) -> httpx.Response:
    """POST a Kafka record the way a KafkaSource does: one binary-mode CloudEvent."""
    headers, body = ce_http.to_binary(record_event(msg, function), validate=False)
    return httpx.post(server.url, headers=headers, content=body, timeout=30)


@pytest.mark.stack
def test_every_image_entry_point_processes_kafkasource_posts(stack, deployed, servers):
    """raw -> validate -> enrich -> score, each hop through an image's own command."""
    topology, bundle = deployed
    serde = AvroSerde(stack.registry_url)
    for name, server in servers.items():
        argv = server.argv[-1]
        assert re.search(r"functions-framework --source entry\.py --target handle "
                         r"--signature-type http .*--port \"\$PORT\"", argv), (name, argv)
    pid = f"pay-{uuid.uuid4().hex[:12]}"
    row = {"payment_id": pid, "card_id": "card-42", "merchant_id": "m-7", "amount": 12.5,
           "currency": "EUR", "country": "DE", "event_time": 1_700_000_000_000}
    validate = topology.function("validate")
    (raw_topic,) = validate.topics
    # The first hop by hand, with the headers a KafkaSource derives from a gateway record.
    headers = {"ce-specversion": "1.0", "ce-id": f"evt-{pid}", "ce-source": "/sluice/gateway",
               "ce-type": "com.sluice.payment.created", "ce-partitionkey": row["card_id"],
               "content-type": "application/avro"}
    resp = httpx.post(servers["validate"].url, headers=headers,
                      content=serde.encode(raw_topic, row), timeout=30)
    assert 200 <= resp.status_code < 300, (resp.status_code, resp.text)

    def has_pid(m) -> bool:
        return serde.decode(m.value()).get("payment_id") == pid

    name = "validate"
    while True:
        fn = topology.function(name)
        produced = {t: read_matching(stack.bootstrap, t, has_pid) for t in fn.outputs}
        assert any(produced.values()), f"{name}: no output in {list(fn.outputs)}\n" \
                                       f"{servers[name].log_path.read_text()}"
        (topic, msgs), = ((t, m) for t, m in produced.items() if m)
        assert len(msgs) == 1 and msgs[0].key() == row["card_id"].encode()
        hdrs = {k: v.decode() for k, v in msgs[0].headers() or []}
        assert hdrs["ce_source"] == f"/sluice/functions/{name}"
        nxt = [f for f in topology.functions.values() if topic in f.topics]
        if not nxt:
            break
        name = nxt[0].name
        resp = post_as_kafkasource(servers[name], msgs[0], name)
        assert 200 <= resp.status_code < 300, (name, resp.status_code, resp.text)
    assert topic == "payments.scored", topic
    assert serde.decode(msgs[0].value())["decision"] in ("approve", "review", "decline")

    # A rejected payment is not retried by Knative: 422, nothing produced.
    bad = {**row, "payment_id": f"{pid}-bad", "amount": -1.0}
    resp = httpx.post(servers["validate"].url, headers={**headers, "ce-id": f"evt-{pid}-bad"},
                      content=serde.encode(raw_topic, bad), timeout=30)
    assert resp.status_code == 422, resp.text

    for name in servers:
        ctx = bundle.out / "functions" / name
        # The server ran the image's copy of the runtime, not the project's checkout.
        assert (ctx / "eventing" / "__pycache__").is_dir(), name
        env = {e["name"] for e in bundle.services[name]["spec"]["template"]["spec"][
            "containers"][0]["env"]}
        assert {"KAFKA_BOOTSTRAP_SERVERS", "SCHEMA_REGISTRY_URL", "SLUICE_OUTPUTS",
                "OTEL_EXPORTER_OTLP_ENDPOINT"} <= env
        assert yaml.safe_load((bundle.out / "base" / "functions" / f"{name}.service.yaml")
                              .read_text()) == bundle.services[name]
