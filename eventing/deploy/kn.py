"""`kn.sh`: the same deployment as the kustomize base, with `kn` where kn can express it.

The `kn service create` flags are derived from the generated Service manifest (not from
the topology a second time), so the script and the YAML cannot drift apart. What kn
cannot express is applied as YAML with kubectl, with a comment saying why:

- KafkaSource: `kn source kafka create` has no flags for `delivery` (retry, backoff,
  timeout, dead-letter sink), `ordering` or `initialOffset`, nor annotations (KEDA);
- KafkaSink and Strimzi KafkaTopic: kn has no commands for them.
"""

from __future__ import annotations

import shlex

from eventing.deploy import knative
from eventing.deploy.common import DeploySettings, header

SECURITY = "securityContext"


def _probe_opts(probe: dict) -> str:
    keys = ("initialDelaySeconds", "periodSeconds", "timeoutSeconds", "failureThreshold",
            "successThreshold")
    return ",".join(f"{k[0].upper()}{k[1:]}={probe[k]}" for k in keys if k in probe)


def service_args(manifest: dict) -> list[str]:
    """`kn service create` argv equivalent to a generated Knative Service manifest."""
    meta = manifest["metadata"]
    tmpl = manifest["spec"]["template"]
    ann = tmpl["metadata"]["annotations"]
    spec = tmpl["spec"]
    c = spec["containers"][0]
    s = knative.SERVING
    args = ["kn", "service", "create", meta["name"], "--force",
            "--namespace", meta["namespace"], "--image", c["image"],
            "--port", f"{c['ports'][0]['name']}:{c['ports'][0]['containerPort']}",
            "--scale-min", ann[s + "min-scale"], "--scale-max", ann[s + "max-scale"],
            "--scale-target", ann[s + "target"], "--scale-metric", ann[s + "metric"],
            "--annotation-revision", f"{s}class={ann[s + 'class']}",
            "--timeout", str(spec["timeoutSeconds"]),
            "--user", str(c[SECURITY]["runAsUser"])]
    if meta["labels"].get("networking.knative.dev/visibility") == "cluster-local":
        args.append("--cluster-local")
    for k, v in meta["labels"].items():
        if k != "networking.knative.dev/visibility":
            args += ["--label", f"{k}={v}"]
    for e in c["env"]:
        args += ["--env", f"{e['name']}={e['value']}"]
    res = c["resources"]
    if res.get("requests"):
        args += ["--request", ",".join(f"{k}={v}" for k, v in res["requests"].items())]
    if res.get("limits"):
        args += ["--limit", ",".join(f"{k}={v}" for k, v in res["limits"].items())]
    for kind in ("readiness", "liveness"):
        probe = c[f"{kind}Probe"]
        args += [f"--probe-{kind}", f"tcp::{probe['tcpSocket']['port']}",
                 f"--probe-{kind}-opts", _probe_opts(probe)]
    return args


def _cmd(argv: list[str]) -> str:
    """One shell command, one flag per line."""
    out, line = [], []
    for word in argv:
        if word.startswith("--") and line:
            out.append(" ".join(line))
            line = []
        line.append(shlex.quote(word))
    out.append(" ".join(line))
    return " \\\n    ".join(out)


def script(settings: DeploySettings, services: dict[str, dict], sources: dict[str, str],
           sinks: list[str], topics_file: str, source: str) -> str:
    """The kn script. `sources`: function -> KafkaSource file; `sinks`: KafkaSink files;
    paths relative to the script's folder."""
    ns = shlex.quote(settings.namespace)
    lines = [
        "#!/usr/bin/env bash",
        header(source).rstrip("\n"),
        "# Deploys the functions with `kn` and `kubectl` (the same objects as the kustomize",
        "# base: `kubectl apply -k overlays/dev` does all of it in one step).",
        "# Needs: Knative Serving and Eventing, eventing-kafka-broker (KafkaSource, KafkaSink),",
        "# the KEDA autoscaler for Knative Eventing, Strimzi, and the images pushed.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "",
        f"kubectl create namespace {ns} --dry-run=client -o yaml | kubectl apply -f -",
        "",
        "# Topics first: a KafkaSource on a missing topic never becomes ready.",
        "# kn has no command for Strimzi KafkaTopics.",
        f"kubectl apply -n {ns} -f {shlex.quote(topics_file)}",
        "",
        "# Dead-letter sinks: kn has no command for KafkaSink.",
    ]
    lines += [f"kubectl apply -n {ns} -f {shlex.quote(f)}" for f in sinks]
    for name, manifest in services.items():
        lines += ["", f"# Function {name}: the Knative Service, scaling to zero.",
                  _cmd(service_args(manifest)),
                  "# Its subscription as YAML: `kn source kafka create` cannot set delivery",
                  "# (retry, backoff, timeout, dead-letter sink), ordering, initialOffset or",
                  "# the KEDA scaling annotations.",
                  f"kubectl apply -n {ns} -f {shlex.quote(sources[name])}"]
    return "\n".join(lines) + "\n"
