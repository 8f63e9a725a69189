"""Register the Avro schemas in `schemas/` with the registry.

File name = topic (TopicNameStrategy): `payments.raw.avsc` registers subject
`payments.raw-value`. Registration goes through `SchemaRegistryClient`, so the same code
works against the embedded registry and against Confluent, Karapace or Apicurio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from eventing.serde import subject_for


class IncompatibleSchema(RuntimeError):
    """A schema file cannot be registered; the message carries the registry's reason."""


@dataclass(frozen=True)
class Registered:
    subject: str
    schema_id: int
    path: Path


def register_all(registry_url: str, schemas_dir: Path) -> list[Registered]:
    """Register every `*.avsc` under `schemas_dir`; stop at the first refusal."""
    if not schemas_dir.is_dir():
        raise IncompatibleSchema(f"no schemas folder at {schemas_dir}: put the pipeline's "
                                 "<topic>.avsc files there, or point the topology's "
                                 "`schemas:` key at them")
    client = SchemaRegistryClient({"url": registry_url})
    done: list[Registered] = []
    for path in sorted(schemas_dir.glob("*.avsc")):
        subject = subject_for(path.name.removesuffix(".avsc"))  # the file name is the topic
        schema = Schema(path.read_text(), schema_type="AVRO")
        try:
            schema_id = client.register_schema(subject, schema)
        except SchemaRegistryError as exc:
            raise IncompatibleSchema(
                f"{path}: subject {subject!r} refused by the registry "
                f"(error {exc.error_code}): {exc.error_message}"
            ) from exc
        done.append(Registered(subject, schema_id, path))
    return done


# ---------------------------------------------------------------------- inspecting


class RegistryUnavailable(RuntimeError):
    """The registry did not answer."""


def _get(registry_url: str, path: str, **params: str) -> tuple[int, object]:
    import httpx

    url = registry_url.rstrip("/") + path
    try:
        response = httpx.get(url, params=params, timeout=10.0)
    except httpx.HTTPError as exc:
        raise RegistryUnavailable(f"the schema registry at {registry_url} did not answer "
                                  f"({exc}); is the stack up (`sluice status`)?") from None
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


def _subject_of(path: Path) -> str:
    return subject_for(path.name.removesuffix(".avsc"))


def list_subjects(registry_url: str, schemas_dir: Path) -> list[dict]:
    """Every subject the registry or `schemas_dir` knows: latest version, id, level, file."""
    status, subjects = _get(registry_url, "/subjects")
    if status != 200 or not isinstance(subjects, list):
        raise RegistryUnavailable(f"{registry_url}/subjects answered {status}")
    local = {_subject_of(p): p for p in sorted(schemas_dir.glob("*.avsc"))}
    rows = []
    for subject in sorted(set(subjects) | set(local)):
        row: dict = {"subject": subject, "version": None, "id": None, "level": None,
                     "file": str(local[subject]) if subject in local else None,
                     "local": "-"}
        if subject in subjects:
            _, latest = _get(registry_url, f"/subjects/{subject}/versions/latest")
            if isinstance(latest, dict):
                row["version"], row["id"] = latest.get("version"), latest.get("id")
                if subject in local:
                    same = _canonical(latest.get("schema", "")) == _canonical(
                        local[subject].read_text())
                    row["local"] = "same" if same else "changed"
            row["level"] = level(registry_url, subject)
        else:
            row["local"] = "not registered"
        rows.append(row)
    return rows


def level(registry_url: str, subject: str) -> str:
    """The compatibility level that applies to `subject` (its own, else the global one)."""
    status, body = _get(registry_url, f"/config/{subject}", defaultToGlobal="true")
    if status == 200 and isinstance(body, dict):
        return str(body.get("compatibilityLevel") or body.get("compatibility"))
    _, body = _get(registry_url, "/config")
    return str(body.get("compatibilityLevel")) if isinstance(body, dict) else "?"


def show(registry_url: str, subject: str, version: str = "latest") -> str:
    """A registered schema, pretty-printed, with its subject, version and id."""
    status, body = _get(registry_url, f"/subjects/{subject}/versions/{version}")
    if status != 200 or not isinstance(body, dict):
        message = body.get("message") if isinstance(body, dict) else body
        raise LookupError(f"{subject} version {version}: {message}")
    schema = json.dumps(json.loads(body["schema"]), indent=2)
    return f"# {subject} version {body['version']} id {body['id']}\n{schema}"


@dataclass
class Check:
    file: str
    subject: str
    level: str
    compatible: bool
    reasons: list[str]

    def as_dict(self) -> dict:
        verdict = "compatible" if self.compatible else "INCOMPATIBLE"
        return {"file": self.file, "subject": self.subject, "level": self.level,
                "verdict": verdict, "compatible": self.compatible,
                "reasons": "; ".join(self.reasons) or "-"}


def check(registry_url: str, path: Path) -> Check:
    """Would the registry accept `path` under its subject's compatibility level? With the
    registry's reasons when not (`?verbose=true`). A new subject is always compatible."""
    import httpx

    subject = _subject_of(path)
    try:
        text = path.read_text()
        json.loads(text)
    except ValueError as exc:
        return Check(str(path), subject, "-", False, [f"not valid JSON: {exc}"])
    lvl = level(registry_url, subject)
    status, _ = _get(registry_url, f"/subjects/{subject}/versions")
    if status == 404:
        return Check(str(path), subject, lvl, True, ["new subject: nothing to be "
                                                     "compatible with"])
    url = (registry_url.rstrip("/") +
           f"/compatibility/subjects/{subject}/versions/latest?verbose=true")
    try:
        response = httpx.post(url, json={"schema": text, "schemaType": "AVRO"}, timeout=10.0)
    except httpx.HTTPError as exc:
        raise RegistryUnavailable(f"the schema registry at {registry_url} did not answer "
                                  f"({exc})") from None
    body = response.json() if response.content else {}
    if response.status_code == 404 and body.get("error_code") in (40401, 40402):
        return Check(str(path), subject, lvl, True, ["new subject: nothing to be "
                                                     "compatible with"])
    if response.status_code != 200:
        return Check(str(path), subject, lvl, False,
                     [f"registry answered {response.status_code}: {body.get('message', body)}"])
    return Check(str(path), subject, lvl, bool(body.get("is_compatible")),
                 [str(m) for m in body.get("messages") or []])


def diff(registry_url: str, path: Path) -> str:
    """A unified diff of the registered schema (latest) against the local file, both
    pretty-printed; empty when they are the same."""
    import difflib

    subject = _subject_of(path)
    status, body = _get(registry_url, f"/subjects/{subject}/versions/latest")
    registered = (json.dumps(json.loads(body["schema"]), indent=2, sort_keys=True) + "\n"
                  if status == 200 and isinstance(body, dict) else "")
    local = json.dumps(json.loads(path.read_text()), indent=2, sort_keys=True) + "\n"
    label = (f"{subject} version {body['version']} (registry)" if registered
             else f"{subject} (not registered)")
    return "".join(difflib.unified_diff(registered.splitlines(True), local.splitlines(True),
                                        label, str(path)))


def _canonical(text: str) -> str:
    try:
        return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    except ValueError:
        return text
