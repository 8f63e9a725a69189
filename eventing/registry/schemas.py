"""Avro schema text → validated, canonical `ParsedSchema`.

The registry must decide when two registrations are "the same schema" (same id, no new
version) and must refuse invalid schemas with the parser's reason. Comparing raw text would
make whitespace or key order create new versions, so every schema is reduced to a canonical
text (compact JSON, fixed key order, `{"type": "int"}` collapsed to `"int"`), like Avro's
`Schema.toString()` that Confluent stores. With `normalize=true` the names are also fully
qualified (Confluent's normalisation), so `{"name": "A", "namespace": "x"}` and
`{"name": "x.A"}` match.

fastavro does the parsing (and checks defaults against their types); the few rules it lets
through (duplicate field names, duplicate union branches, bad names) are checked here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastavro.schema import parse_schema as _fastavro_parse

PRIMITIVES = frozenset(
    {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
)
NAMED = frozenset({"record", "error", "enum", "fixed"})
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Key order of the canonical text (Avro's toString order); other properties follow sorted.
_TYPE_KEYS = (
    "type", "name", "namespace", "doc", "fields", "symbols", "items", "values", "size",
    "default", "aliases", "order", "logicalType", "precision", "scale",
)
_FIELD_KEYS = ("name", "type", "doc", "default", "order", "aliases")


class SchemaError(ValueError):
    """The schema text is not a valid Avro schema; the message says why."""


@dataclass(frozen=True)
class ParsedSchema:
    """A validated Avro schema.

    `canonical` is what the registry stores and returns; `normalized` is compared when a
    client asks for `normalize=true`. `root` and `named` are fastavro's parsed form (names
    fully qualified) and the table of named types, including those brought in by
    references: the compatibility checker walks these.
    """

    canonical: str
    normalized: str
    root: Any
    named: Mapping[str, Any] = field(repr=False)


def parse(text: str, referenced: Mapping[str, Any] | None = None) -> ParsedSchema:
    """Parse and validate `text`; `referenced` maps full names of types defined by
    referenced schemas (see `named_types_of`). Raises `SchemaError`."""
    if not isinstance(text, str) or not text.strip():
        raise SchemaError("empty schema")
    try:
        obj = json.loads(text)
    except ValueError as exc:
        # A bare primitive name is valid Avro even though it is not JSON.
        if text.strip() in PRIMITIVES:
            obj = text.strip()
        else:
            raise SchemaError(f"not JSON: {exc}") from exc
    named: dict[str, Any] = dict(referenced or {})
    try:
        root = _fastavro_parse(obj, named_schemas=named, _write_hint=False)
    except Exception as exc:  # fastavro raises many types (KeyError for missing size, ...)
        raise SchemaError(_describe(exc)) from exc
    if isinstance(root, dict):
        root = {k: v for k, v in root.items() if not k.startswith("__")}
    _validate(obj, path="")
    return ParsedSchema(
        canonical=_dumps(_canonical(obj)),
        normalized=_dumps(_canonical(_qualify(root, named, set()))),
        root=root,
        named=named,
    )


def named_types_of(schema: ParsedSchema) -> dict[str, Any]:
    """Named types a schema defines or brings in, for use as another schema's reference."""
    return dict(schema.named)


def _describe(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"missing attribute {exc}"
    name = type(exc).__name__
    if name == "UnknownType":
        return f"unknown type: {exc}"
    return str(exc) or name


def _validate(node: Any, path: str) -> None:
    """Rules fastavro does not enforce."""
    if isinstance(node, list):
        seen: set[str] = set()
        for i, branch in enumerate(node):
            if isinstance(branch, list):
                raise SchemaError(f"{path}/{i}: unions may not immediately contain unions")
            key = _branch_key(branch)
            if key in seen:
                raise SchemaError(f"{path}: duplicate {key!r} in union")
            seen.add(key)
            _validate(branch, f"{path}/{i}")
        return
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if isinstance(kind, (dict, list)):
        _validate(kind, path)
        return
    if kind in NAMED:
        for part in str(node.get("name", "")).split("."):
            if not _NAME_RE.match(part):
                raise SchemaError(f"{path}: invalid name {node.get('name')!r}")
    if kind in ("record", "error"):
        fields = node.get("fields")
        if not isinstance(fields, list):
            raise SchemaError(f"{path}: record {node.get('name')!r} needs a 'fields' list")
        names: set[str] = set()
        for i, fld in enumerate(fields):
            fname = fld.get("name") if isinstance(fld, dict) else None
            if not isinstance(fname, str) or not _NAME_RE.match(fname):
                raise SchemaError(f"{path}/fields/{i}: invalid field name {fname!r}")
            if fname in names:
                raise SchemaError(f"{path}/fields/{i}: duplicate field name {fname!r}")
            names.add(fname)
            _validate(fld.get("type"), f"{path}/fields/{i}/type")
    elif kind == "enum":
        for sym in node.get("symbols", []):
            if not isinstance(sym, str) or not _NAME_RE.match(sym):
                raise SchemaError(f"{path}: invalid enum symbol {sym!r}")
    elif kind == "fixed":
        size = node.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise SchemaError(f"{path}: fixed {node.get('name')!r} needs a non-negative size")
    elif kind == "array":
        _validate(node.get("items"), f"{path}/items")
    elif kind == "map":
        _validate(node.get("values"), f"{path}/values")


def _branch_key(branch: Any) -> str:
    """Union branches must differ by type, or by name for named types."""
    if isinstance(branch, str):
        return branch
    if isinstance(branch, dict):
        kind = branch.get("type")
        if kind in NAMED:
            name = str(branch.get("name", ""))
            ns = branch.get("namespace")
            return f"{ns}.{name}" if ns and "." not in name else name
        return str(kind)
    return repr(branch)


def _canonical(node: Any) -> Any:
    """Fixed key order; a primitive written as an object with no other keys becomes a name."""
    if isinstance(node, list):
        return [_canonical(b) for b in node]
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if isinstance(kind, str) and kind in PRIMITIVES and len(node) == 1:
        return kind
    out: dict[str, Any] = {}
    for key in _TYPE_KEYS:
        if key not in node:
            continue
        value = node[key]
        if key == "fields":
            value = [_canonical_field(f) for f in value]
        elif key in ("type", "items", "values"):
            value = _canonical(value)
        out[key] = value
    for key in sorted(k for k in node if k not in out):
        out[key] = node[key]
    return out


def _canonical_field(fld: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in _FIELD_KEYS:
        if key in fld:
            out[key] = _canonical(fld[key]) if key == "type" else fld[key]
    for key in sorted(k for k in fld if k not in out):
        out[key] = fld[key]
    return out


def _qualify(node: Any, named: Mapping[str, Any], seen: set[str]) -> Any:
    """fastavro's parsed form with aliases fully qualified (names already are)."""
    if isinstance(node, list):
        return [_qualify(b, named, seen) for b in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    out.pop("namespace", None)
    kind = node.get("type")
    if kind in NAMED:
        name = str(node["name"])
        ns = name.rpartition(".")[0]
        if "aliases" in node:
            out["aliases"] = [qualify_name(a, ns) for a in node["aliases"]]
        if kind in ("record", "error"):
            out["fields"] = [
                {**f, "type": _qualify(f["type"], named, seen)} for f in node["fields"]
            ]
    elif isinstance(kind, (dict, list)):
        out["type"] = _qualify(kind, named, seen)
    elif kind == "array":
        out["items"] = _qualify(node["items"], named, seen)
    elif kind == "map":
        out["values"] = _qualify(node["values"], named, seen)
    return out


def qualify_name(name: str, namespace: str) -> str:
    """Avro's rule: a name containing a dot is full; otherwise it lives in `namespace`."""
    return name if "." in name or not namespace else f"{namespace}.{name}"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
