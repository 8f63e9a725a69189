"""Avro schema-resolution compatibility, as Confluent's compatibility levels use it.

`check(reader, writer)` answers "can data written with `writer` be read with `reader`?"
following the Avro specification's schema resolution rules (the same cases as Avro Java's
`SchemaCompatibility`, whose error types Confluent reports): records match fields by name
or reader alias and need a reader default for fields the writer lacks; numeric promotions
int→long→float→double and string↔bytes; enums need every writer symbol unless the reader
has a default; fixed sizes and named-type names (or reader aliases) must match; each branch
of a writer union must resolve to the reader; a non-union writer must match some branch of
a reader union; recursion through named types is followed once.

`check_level` maps a level onto directions: BACKWARD = the new schema reads data written
with the previous one(s); FORWARD = the previous one(s) read data written with the new;
FULL = both; *_TRANSITIVE = against every previous version, not only the latest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .schemas import NAMED, PRIMITIVES, ParsedSchema, qualify_name

LEVELS = (
    "NONE", "BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE",
    "FULL", "FULL_TRANSITIVE",
)
DEFAULT_LEVEL = "BACKWARD"

# writer type -> reader types that can read it (besides itself)
_PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}


@dataclass(frozen=True)
class Incompatibility:
    """One reason the reader cannot read the writer's data.

    `kind` is Avro's SchemaIncompatibilityType name (as Confluent reports it), `path` a JSON
    pointer into the reader schema, `field` the dotted field names leading there.
    """

    kind: str
    path: str
    field: str
    message: str


def check(
    reader: ParsedSchema, writer: ParsedSchema,
    reader_label: str = "reader", writer_label: str = "writer",
) -> list[Incompatibility]:
    """Every incompatibility found when `reader` reads data written with `writer`."""
    return _Checker(reader.named, writer.named, reader_label, writer_label).run(
        reader.root, writer.root
    )


def check_level(
    level: str, new: ParsedSchema, previous: Sequence[tuple[int, ParsedSchema]]
) -> list[str]:
    """Messages explaining why `new` breaks `level` against `previous` ((version, schema),
    oldest first); an empty list means compatible. Non-transitive levels look only at the
    last of `previous`."""
    level = level.upper()
    if level not in LEVELS:
        raise ValueError(f"unknown compatibility level {level!r}")
    if level == "NONE" or not previous:
        return []
    targets = list(previous) if level.endswith("_TRANSITIVE") else [previous[-1]]
    base = level.removesuffix("_TRANSITIVE")
    messages: list[str] = []
    for version, old in reversed(targets):
        found: list[Incompatibility] = []
        if base in ("BACKWARD", "FULL"):
            found += check(new, old, "new", "old")
        if base in ("FORWARD", "FULL"):
            found += check(old, new, "old", "new")
        if found:
            messages += [_format(i) for i in found]
            messages.append(f"{{oldSchemaVersion: {version}}}")
            messages.append(f"{{oldSchema: '{old.canonical}'}}")
    if messages:
        messages.append(f"{{compatibility: '{level}'}}")
    return messages


def _format(inc: Incompatibility) -> str:
    return (
        f"{{errorType:'{inc.kind}', description:'{inc.message}', "
        f"additionalInfo:'{inc.field or inc.path}'}}"
    )


def _kind(node: Any) -> str:
    if isinstance(node, list):
        return "union"
    if isinstance(node, dict):
        kind = node["type"]
        if isinstance(kind, (dict, list)):
            return _kind(kind)
        return "record" if kind == "error" else kind
    return node if node in PRIMITIVES else "named"


class _Checker:
    def __init__(
        self, reader_named: Mapping[str, Any], writer_named: Mapping[str, Any],
        reader_label: str, writer_label: str,
    ) -> None:
        self.rnamed = reader_named
        self.wnamed = writer_named
        self.r = reader_label
        self.w = writer_label
        self.in_progress: set[tuple[str, str]] = set()

    def run(self, reader: Any, writer: Any) -> list[Incompatibility]:
        return self.visit(reader, writer, "", "")

    def resolve(self, node: Any, named: Mapping[str, Any]) -> Any:
        while True:
            if isinstance(node, str) and node not in PRIMITIVES:
                node = named[node]
            elif isinstance(node, dict) and isinstance(node["type"], (dict, list)):
                node = node["type"]
            elif isinstance(node, dict) and isinstance(node["type"], str) \
                    and node["type"] not in PRIMITIVES and node["type"] not in NAMED \
                    and node["type"] not in ("array", "map"):
                node = named[node["type"]]
            else:
                return node

    def compatible(self, reader: Any, writer: Any, path: str, fld: str) -> bool:
        return not self.visit(reader, writer, path, fld)

    def visit(self, reader: Any, writer: Any, path: str, fld: str) -> list[Incompatibility]:
        reader = self.resolve(reader, self.rnamed)
        writer = self.resolve(writer, self.wnamed)
        rk, wk = _kind(reader), _kind(writer)

        if wk == "union":
            # Every branch the writer may have used must be readable.
            out: list[Incompatibility] = []
            for i, branch in enumerate(writer):
                if rk == "union":
                    if not any(self.compatible(rb, branch, path, fld) for rb in reader):
                        out.append(self.inc(
                            "MISSING_UNION_BRANCH", f"{path}/{i}", fld,
                            f"reader union lacking writer type: {self.describe(branch, True)}"
                            f" (the {self.r} schema has no union branch that reads branch"
                            f" {i} of the {self.w} schema)",
                        ))
                elif self.visit(reader, branch, path, fld):
                    out.append(self.inc(
                        "MISSING_UNION_BRANCH", f"{path}/{i}", fld,
                        f"reader type {self.describe(reader, False)} cannot read writer union"
                        f" branch {i} ({self.describe(branch, True)})",
                    ))
            return out
        if rk == "union":
            if any(self.compatible(rb, writer, path, fld) for rb in reader):
                return []
            return [self.inc(
                "MISSING_UNION_BRANCH", path, fld,
                f"reader union lacking writer type: {self.describe(writer, True)}",
            )]
        if rk != wk:
            if rk in _PROMOTIONS.get(wk, ()):
                return []
            return [self.type_mismatch(reader, writer, path, fld)]
        if rk in PRIMITIVES:
            return self.logical(reader, writer, path, fld)
        if rk == "array":
            return self.visit(reader["items"], writer["items"], f"{path}/items", fld)
        if rk == "map":
            return self.visit(reader["values"], writer["values"], f"{path}/values", fld)
        if not self.names_match(reader, writer):
            return [self.inc(
                "NAME_MISMATCH", f"{path}/name", fld,
                f"expected: {writer['name']} (the {self.r} {rk} is named {reader['name']}"
                f" and has no alias for the {self.w} {wk} name)",
            )]
        if rk == "fixed":
            if reader["size"] != writer["size"]:
                return [self.inc(
                    "FIXED_SIZE_MISMATCH", f"{path}/size", fld,
                    f"expected: {writer['size']}, found: {reader['size']} (fixed"
                    f" {reader['name']} has size {reader['size']} in the {self.r} schema and"
                    f" {writer['size']} in the {self.w} schema)",
                )]
            return self.logical(reader, writer, path, fld)
        if rk == "enum":
            missing = [s for s in writer["symbols"] if s not in reader["symbols"]]
            if missing and "default" not in reader:
                return [self.inc(
                    "MISSING_ENUM_SYMBOLS", f"{path}/symbols", fld,
                    f"The {self.r} enum {reader['name']} is missing symbols {missing} of the"
                    f" {self.w} schema and has no default symbol",
                )]
            return []
        return self.record(reader, writer, path, fld)

    def record(self, reader: dict, writer: dict, path: str, fld: str) -> list[Incompatibility]:
        key = (reader["name"], writer["name"])
        if key in self.in_progress:
            return []  # recursive type: assume compatible while checking it
        self.in_progress.add(key)
        try:
            wfields = {f["name"]: f for f in writer["fields"]}
            out: list[Incompatibility] = []
            for i, rf in enumerate(reader["fields"]):
                fpath = f"{path}/fields/{i}"
                fname = f"{fld}.{rf['name']}" if fld else rf["name"]
                wf = wfields.get(rf["name"])
                if wf is None:
                    wf = next((wfields[a] for a in rf.get("aliases", []) if a in wfields), None)
                if wf is None:
                    if "default" not in rf:
                        out.append(self.inc(
                            "READER_FIELD_MISSING_DEFAULT_VALUE", fpath, fname,
                            f"The field '{fname}' at path '{fpath}' in the {self.r} schema has"
                            f" no default value and is missing in the {self.w} schema",
                        ))
                    continue
                out += self.visit(rf["type"], wf["type"], f"{fpath}/type", fname)
            return out
        finally:
            self.in_progress.discard(key)

    def names_match(self, reader: dict, writer: dict) -> bool:
        rname, wname = reader["name"], writer["name"]
        if rname.rpartition(".")[2] == wname.rpartition(".")[2]:
            return True
        ns = rname.rpartition(".")[0]
        return wname in {qualify_name(a, ns) for a in reader.get("aliases", [])}

    def logical(self, reader: Any, writer: Any, path: str, fld: str) -> list[Incompatibility]:
        """Decimal scale changes reinterpret the stored digits: refuse them."""
        if not (isinstance(reader, dict) and isinstance(writer, dict)):
            return []
        if reader.get("logicalType") == writer.get("logicalType") == "decimal" \
                and reader.get("scale", 0) != writer.get("scale", 0):
            return [self.inc(
                "TYPE_MISMATCH", path, fld,
                f"decimal scale {reader.get('scale', 0)} in the {self.r} schema differs from"
                f" scale {writer.get('scale', 0)} in the {self.w} schema",
            )]
        return []

    def type_mismatch(self, reader: Any, writer: Any, path: str, fld: str) -> Incompatibility:
        where = f"field '{fld}'" if fld else "the schema"
        return self.inc(
            "TYPE_MISMATCH", path, fld,
            f"reader type: {self.describe(reader, False)} not compatible with writer type:"
            f" {self.describe(writer, True)} (the type of {where} at path '{path or '/'}' in"
            f" the {self.r} schema cannot read the {self.w} schema's type)",
        )

    def describe(self, node: Any, writer: bool) -> str:
        node = self.resolve(node, self.wnamed if writer else self.rnamed)
        kind = _kind(node)
        if kind in ("record", "enum", "fixed"):
            return f"{kind.upper()} {node['name']}"
        return kind.upper()

    @staticmethod
    def inc(kind: str, path: str, fld: str, message: str) -> Incompatibility:
        return Incompatibility(kind, path or "/", fld, message)
