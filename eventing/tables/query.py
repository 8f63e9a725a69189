"""Trino SQL in, answers out: translate to DuckDB, refuse what would change meaning, run.

Sluice's query language is Trino's, because on a cluster Trino answers (catalogs
`iceberg` for the lake and `pinot` for the real-time table). Locally there is no Trino,
so the same SQL is translated with sqlglot (read "trino", write "duckdb") and runs on
the real-time server's DuckDB (`eventing.tables.realtime`), which holds the real-time table
and ATTACHes the Iceberg catalog.

A translation that runs but answers differently is worse than an error, so `translate`
REFUSES (raises `Refused`, saying what and why) where sqlglot would silently change the
meaning, and rewrites a few functions whose DuckDB namesakes differ:

- `/` must have a DOUBLE/REAL operand. Trino divides integers as integers (`7 / 2` is 3)
  and decimals at the operands' scale (`1 / 3.0` is 0.3); DuckDB gives 3.5 and 0.333.
  Operand types come from literals, casts, functions and the table schema; a division
  whose operands are unknown is refused too. Write `CAST(a AS DOUBLE) / b` or `a / 2e0`.
- `format_datetime` and `parse_datetime` (Joda-Time patterns), `map_agg`, `approx_set`
  and `merge` (HyperLogLog), `UNNEST` of several arrays, `approx_percentile` with
  weights or accuracy (dropped), `AT TIME ZONE` (DuckDB drops the zone), and
  `from_iso8601_timestamp` of anything but a literal without a UTC offset (DuckDB
  normalises to UTC; Trino keeps the offset, so `hour()` differs).
- Rewritten: `date_diff` becomes DuckDB `date_sub` (whole units elapsed, as Trino;
  DuckDB's `date_diff` counts boundaries crossed: 10:59 -> 11:01 is 1 hour there, 0 in
  Trino); `json_extract_scalar` yields NULL for objects and arrays, as in Trino.

The local engine runs in UTC; on Trino, use a UTC session time zone for the same answers.

Table names (short names are what users write; both targets resolve them):

- lake: `payments_scored`, `sluice.payments_scored`, `iceberg.sluice.payments_scored`
  -> DuckDB `lake.sluice.payments_scored`, Trino `iceberg.sluice.payments_scored`;
- real-time: `payments_scored_rt`, `realtime.payments_scored`,
  `pinot.default.payments_scored` -> DuckDB `memory.main.payments_scored_rt`, Trino
  `pinot.default.payments_scored`.

Any other unqualified name is a lake table in the `sluice` namespace; `ns.table` is a lake
table in namespace `ns`; a catalog other than `iceberg`, `lake`, `pinot` is refused.
Only queries (SELECT, WITH, UNION, VALUES ...) are accepted: the engines are read-only.
Three metadata statements are answered too, with Trino's output shape, so a newcomer can
discover what is queryable: `SHOW TABLES` (column `Table`: lake tables and `<name>_rt`
real-time ones), `SHOW COLUMNS FROM t` and `DESCRIBE t` (`Column`, `Type`, `Extra`,
`Comment`, types in Trino's names). `metadata_statement` recognises them.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import sqlglot
from sqlglot import exp

# Trino-side table name -> {column: SQL type}: what the division check knows.
Schema = Mapping[str, Mapping[str, str]]
Columns = Callable[[str], Mapping[str, str] | None]

FORMATS = ("table", "csv", "json")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class TranslationError(ValueError):
    """SQL that cannot be run: it does not parse, or is not a single query."""


class Refused(TranslationError):
    """Trino SQL that would answer differently on DuckDB; `construct` names what."""

    def __init__(self, construct: str, reason: str, hint: str = ""):
        self.construct = construct
        self.reason = reason
        self.hint = hint
        text = f"refused: {construct}: {reason}"
        super().__init__(text + (f". {hint[:1].upper()}{hint[1:]}" if hint else ""))


class QueryFailed(RuntimeError):
    """The engine (server or Trino) did not answer the query; the message says why."""


@dataclass(frozen=True)
class TableNames:
    """Where short table names point, locally (DuckDB) and on a cluster (Trino)."""

    lake_alias: str = "lake"  # the DuckDB alias of the ATTACHed Iceberg catalog
    namespace: str = "sluice"
    realtime_suffix: str = "_rt"
    realtime_schema: str = "realtime"  # `realtime.payments_scored` style names
    realtime_db: str = "memory.main"  # where the real-time server keeps its tables
    trino_lake_catalog: str = "iceberg"
    trino_realtime_catalog: str = "pinot"
    trino_realtime_schema: str = "default"

    def resolve(self, parts: Sequence[str]) -> tuple[str, str, str]:
        """(`lake`|`realtime`, namespace, table) for a name as written (1-3 parts)."""
        parts = [p for p in parts if p]
        if len(parts) == 1:
            (name,) = parts
            if name.endswith(self.realtime_suffix):
                return "realtime", "", name.removesuffix(self.realtime_suffix)
            return "lake", self.namespace, name
        if len(parts) == 2:
            schema, name = parts
            if schema == self.realtime_schema:
                return "realtime", "", name
            return "lake", schema, name
        catalog, schema, name = parts[-3:]
        if catalog in (self.trino_lake_catalog, self.lake_alias):
            return "lake", schema, name
        if catalog == self.trino_realtime_catalog:
            return "realtime", "", name
        raise Refused(f"table {'.'.join(parts)}", f"unknown catalog {catalog!r}",
                      f"Sluice has {self.trino_lake_catalog!r} (the lake) and "
                      f"{self.trino_realtime_catalog!r} (the real-time table)")

    def target(self, kind: str, namespace: str, name: str, dialect: str) -> list[str]:
        """The parts of the table's name in `dialect` (`duckdb` or `trino`)."""
        if dialect == "trino":
            if kind == "lake":
                return [self.trino_lake_catalog, namespace, name]
            return [self.trino_realtime_catalog, self.trino_realtime_schema, name]
        if kind == "lake":
            return [self.lake_alias, namespace, name]
        return [*self.realtime_db.split("."), name + self.realtime_suffix]

    def short(self, kind: str, namespace: str, name: str) -> str:
        """The canonical written name: `payments_scored`, `ns.t`, `payments_scored_rt`."""
        if kind == "realtime":
            return name + self.realtime_suffix
        return name if namespace == self.namespace else f"{namespace}.{name}"


DEFAULT_NAMES = TableNames()


# --------------------------------------------------------------------------- metadata

_NAME = r'(?:"[^"]+"|[A-Za-z_][A-Za-z0-9_]*)'
_QUALIFIED = rf"{_NAME}(?:\s*\.\s*{_NAME}){{0,2}}"
_SHOW_TABLES = re.compile(
    rf"^\s*SHOW\s+TABLES(?:\s+(?:FROM|IN)\s+(?P<schema>{_NAME}(?:\s*\.\s*{_NAME})?))?"
    r"(?:\s+LIKE\s+'(?P<like>(?:[^']|'')*)')?\s*;?\s*$", re.IGNORECASE)
_DESCRIBE = re.compile(
    rf"^\s*(?:DESCRIBE|DESC|SHOW\s+COLUMNS\s+(?:FROM|IN))\s+(?P<table>{_QUALIFIED})"
    r"\s*;?\s*$", re.IGNORECASE)
TABLES_COLUMNS = ["Table"]
DESCRIBE_COLUMNS = ["Column", "Type", "Extra", "Comment"]


@dataclass(frozen=True)
class Metadata:
    """A metadata statement: `tables` (SHOW TABLES) or `columns` (DESCRIBE, SHOW COLUMNS)."""

    kind: str
    table: tuple[str, ...] = ()   # the name as written, for `columns`
    schema: tuple[str, ...] = ()  # SHOW TABLES FROM <schema>
    like: str | None = None       # SHOW TABLES LIKE '<pattern>' (SQL LIKE: % and _)


def _name_parts(text: str) -> tuple[str, ...]:
    return tuple(p.strip().strip('"') for p in re.findall(_NAME, text))


def metadata_statement(sql: str) -> Metadata | None:
    """The metadata statement `sql` is, or None for anything else (a query)."""
    m = _SHOW_TABLES.match(sql)
    if m:
        like = m.group("like")
        return Metadata("tables", schema=_name_parts(m.group("schema") or ""),
                        like=like.replace("''", "'") if like is not None else None)
    m = _DESCRIBE.match(sql)
    if m:
        return Metadata("columns", table=_name_parts(m.group("table")))
    return None


def like_matches(pattern: str | None, name: str) -> bool:
    """SQL LIKE (`%` any run, `_` one character), case-sensitive as in Trino."""
    if pattern is None:
        return True
    regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, re.DOTALL) is not None


_TRINO_TYPES = {"VARCHAR": "varchar", "BIGINT": "bigint", "INTEGER": "integer",
                "SMALLINT": "smallint", "TINYINT": "tinyint", "DOUBLE": "double",
                "FLOAT": "real", "REAL": "real", "BOOLEAN": "boolean", "DATE": "date",
                "BLOB": "varbinary", "TIME": "time(6)", "UUID": "uuid",
                "TIMESTAMP": "timestamp(6)",
                "TIMESTAMP WITH TIME ZONE": "timestamp(6) with time zone"}


def trino_type(duckdb_type: str) -> str:
    """A DuckDB column type in Trino's spelling (what DESCRIBE shows on a cluster)."""
    upper = duckdb_type.upper()
    if upper.startswith("DECIMAL"):
        return upper.lower()
    return _TRINO_TYPES.get(upper, duckdb_type.lower())


def describe_rows(columns: Mapping[str, str]) -> list[list[str]]:
    """DESCRIBE's rows (`Column`, `Type`, `Extra`, `Comment`) for {column: DuckDB type}."""
    return [[name, trino_type(kind), "", ""] for name, kind in columns.items()]


# --------------------------------------------------------------------------- translation


def parse(sql: str, dialect: str = "trino") -> exp.Expression:
    """Parse exactly one query (read-only); `TranslationError` for anything else."""
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except sqlglot.errors.ParseError as exc:
        raise TranslationError(parse_error_message(sql, exc, dialect)) from None
    if len(statements) != 1:
        raise TranslationError(f"expected one statement, got {len(statements)}")
    tree = statements[0]
    if not isinstance(tree, exp.Query | exp.Values):
        raise TranslationError(_not_a_query(sql, tree))
    return tree


def translate(sql: str, *, schema: Schema | Columns | None = None,
              names: TableNames = DEFAULT_NAMES, target: str = "duckdb") -> str:
    """Trino SQL -> SQL for `target` (`duckdb`: translated and checked; `trino`: only
    table names resolved). Raises `Refused` for what DuckDB would answer differently.

    `schema` gives the column types the division check needs: a mapping from short table
    name (`payments_scored`, `payments_scored_rt`, `ns.table`) to {column: type}, or a
    function of the short name (asked only for the tables the query reads).
    """
    if target not in ("duckdb", "trino"):
        raise ValueError(f"target must be duckdb or trino, not {target!r}")
    tree = parse(sql)
    tables = _referenced(tree, names)
    tree = _resolve_tables(tree, names, target)
    if target == "trino":
        return tree.sql(dialect="trino")
    _refuse_unfaithful(tree)
    if tree.find(exp.Div) is not None:
        lookup = schema.get if isinstance(schema, Mapping) else (schema or (lambda _: None))
        known = {t: cols for t in tables if (cols := lookup(t))}
        _check_divisions(tree, _duckdb_schema(known, names))
    tree = _rewrite(tree)
    _trino_column_names(tree)
    return tree.sql(dialect="duckdb")


# Statement keywords a misspelt first word is compared with.
_STATEMENTS = ("SELECT", "WITH", "VALUES", "SHOW", "EXPLAIN", "DESCRIBE", "TABLE")


def parse_error_message(sql: str, exc: sqlglot.errors.ParseError, dialect: str = "trino") -> str:
    """sqlglot's parse error as a person reads it: line, column, the offending token and
    a caret under it, without the terminal escape codes sqlglot puts around the token."""
    typo = _misspelt_keyword(sql)
    if typo:
        return typo
    errors = getattr(exc, "errors", None) or []
    if not errors:
        return f"does not parse as {dialect} SQL: {_ANSI.sub('', str(exc))}"
    first = errors[0]
    line, col = int(first.get("line") or 1), int(first.get("col") or 1)
    token = _ANSI.sub("", str(first.get("highlight") or ""))
    text = sql.splitlines()[line - 1] if sql.splitlines() else ""
    start = max(col - len(token), 0)
    what = str(first.get("description") or "syntax error").split(" for <class")[0]
    return (f"does not parse as {dialect} SQL at line {line}, column {start + 1}: {what}"
            + (f" near {token!r}" if token else "") + f"\n  {text}\n  {' ' * start}^")


def _not_a_query(sql: str, tree: exp.Expression) -> str:
    """Why a parsed statement cannot run: a misspelt keyword, or a statement that writes."""
    if not isinstance(tree, exp.Command | exp.DDL | exp.DML):
        typo = _misspelt_keyword(sql, always=True)
        if typo:
            return typo
    kind = tree.key.upper() if not isinstance(tree, exp.Command) else str(tree.this).upper()
    return f"only queries can run here (got {kind}): the engines are read-only"


def _misspelt_keyword(sql: str, *, always: bool = False) -> str | None:
    """'SELEC' at line 1, column 1 is not a statement: say so, with the likely keyword
    (only when one is close, unless `always`)."""
    import difflib

    stripped = sql.lstrip()
    first = (re.split(r"[\s(;]", stripped, maxsplit=1) or [""])[0]
    upper = first.upper()
    if not upper or upper in _STATEMENTS or not _is_plain_word(first):
        return None
    near = difflib.get_close_matches(upper, _STATEMENTS, n=1)
    if not near and not always:
        return None
    offset = len(sql) - len(stripped)
    line = sql.count("\n", 0, offset) + 1
    col = offset - (sql.rfind("\n", 0, offset) + 1) + 1
    return (f"line {line}, column {col}: {first!r} does not start a SQL statement"
            + (f"; did you mean {near[0]}?" if near else "; a query starts with SELECT or WITH"))


def _is_plain_word(word: str) -> bool:
    """True for a word SQL does not know as a keyword (`SELEC`), false for `DROP`."""
    from sqlglot.tokens import TokenType

    try:
        tokens = sqlglot.Dialect.get_or_raise("trino").tokenize(word)
    except Exception:  # noqa: BLE001 - not even a token: leave it to the parser
        return False
    return bool(tokens) and tokens[0].token_type == TokenType.VAR


def _trino_column_names(tree: exp.Expression) -> None:
    """Name unnamed result columns as Trino does: `_col<position>` (0-based), so a local
    answer has the columns a cluster's Trino would give (`count(*)` is `_col0`, not
    DuckDB's `count_star()`). Column references keep their names; aliases stay."""
    while isinstance(tree, exp.SetOperation):
        tree = tree.this
    if not isinstance(tree, exp.Select):
        return
    for i, node in enumerate(list(tree.expressions)):
        if isinstance(node, exp.Alias | exp.Column | exp.Star | exp.Dot):
            continue
        node.replace(exp.alias_(node.copy(), f"_col{i}"))


def _referenced(tree: exp.Expression, names: TableNames) -> set[str]:
    """Short names of the tables `tree` reads (CTEs and table functions left out)."""
    ctes = _cte_names(tree)
    out = set()
    for table in tree.find_all(exp.Table):
        if not table.name or not isinstance(table.this, exp.Identifier):
            continue
        if not table.catalog and not table.db and table.name in ctes:
            continue
        out.add(names.short(*names.resolve([table.catalog, table.db, table.name])))
    return out


def _cte_names(tree: exp.Expression) -> set[str]:
    return {cte.alias_or_name for cte in tree.find_all(exp.CTE)}


def _resolve_tables(tree: exp.Expression, names: TableNames, dialect: str) -> exp.Expression:
    ctes = _cte_names(tree)
    for table in list(tree.find_all(exp.Table)):
        if not table.name or not isinstance(table.this, exp.Identifier):
            continue  # a table function (UNNEST, VALUES ...)
        parts = [table.catalog, table.db, table.name]
        if not table.catalog and not table.db and table.name in ctes:
            continue
        kind, namespace, name = names.resolve(parts)
        catalog, db, new = _split3(names.target(kind, namespace, name, dialect))
        if table.args.get("alias") is None:
            # Keep `payments_scored_rt.amount` working after the rename.
            table.set("alias", exp.TableAlias(this=exp.to_identifier(table.name)))
        table.set("this", exp.to_identifier(new))
        table.set("db", exp.to_identifier(db) if db else None)
        table.set("catalog", exp.to_identifier(catalog) if catalog else None)
    return tree


def _split3(parts: list[str]) -> tuple[str, str, str]:
    padded = ["", "", *parts][-3:]
    return padded[0], padded[1], padded[2]


def _duckdb_schema(schema: Schema, names: TableNames) -> dict[str, Any]:
    """Short-name schema -> sqlglot's nested {catalog: {db: {table: columns}}}."""
    nested: dict[str, Any] = {}
    for short, columns in schema.items():
        kind, namespace, name = names.resolve(short.split("."))
        catalog, db, table = _split3(names.target(kind, namespace, name, "duckdb"))
        nested.setdefault(catalog, {}).setdefault(db, {})[table] = dict(columns)
    return nested


# Functions sqlglot passes through (or mangles) that DuckDB lacks or answers differently.
_REFUSED_FUNCTIONS = {
    "format_datetime": ("formats with a Joda-Time pattern, which DuckDB does not speak",
                        "use date_format(ts, '%Y-%m-%d %H:%i:%s') (MySQL-style pattern)"),
    "map_agg": ("has no DuckDB equivalent that sqlglot translates",
                "aggregate with array_agg or GROUP BY instead"),
    "approx_set": ("builds a Trino HyperLogLog sketch, which DuckDB cannot read or merge",
                   "use approx_distinct(x)"),
    "merge": ("merges Trino HyperLogLog sketches, which DuckDB does not have",
              "use approx_distinct(x) over the rows"),
}


def _refuse_unfaithful(tree: exp.Expression) -> None:
    for node in tree.walk():
        if isinstance(node, exp.Anonymous):
            name = str(node.this).lower()
            if name in _REFUSED_FUNCTIONS:
                reason, hint = _REFUSED_FUNCTIONS[name]
                raise Refused(f"{name}()", reason, hint)
        elif isinstance(node, exp.ParseDatetime):
            raise Refused("parse_datetime()", "parses with a Joda-Time pattern; sqlglot "
                          "passes the pattern to DuckDB's strptime unchanged",
                          "use date_parse(s, '%Y-%m-%d %H:%i:%s') (MySQL-style pattern)")
        elif isinstance(node, exp.Unnest) and len(node.expressions) > 1:
            raise Refused("UNNEST of several arrays", "DuckDB's unnest takes one array, and "
                          "sqlglot does not zip them as Trino does",
                          "unnest one array, or zip them first: UNNEST(zip(a, b))")
        elif isinstance(node, exp.ApproxQuantile) and (
                node.args.get("weight") is not None or node.args.get("accuracy") is not None):
            raise Refused("approx_percentile with weights or accuracy",
                          "DuckDB's approx_quantile has neither, so they would be dropped "
                          "silently", "use approx_percentile(x, percentage)")
        elif isinstance(node, exp.AtTimeZone):
            raise Refused("AT TIME ZONE", "DuckDB returns a timestamp without the zone (local "
                          "wall time), Trino a timestamp with that zone, so comparisons and "
                          "hour()/date_trunc() differ", "the local engine works in UTC; "
                          "leave timestamps in UTC")
        elif isinstance(node, exp.FromISO8601Timestamp | exp.FromISO8601TimestampNanos):
            _check_iso8601(node)


# --------------------------------------------------------------------------- reach

# DuckDB functions that read files, URLs or the engine's own state, or run SQL given as a
# string: a query naming one could read what no declared table holds (every S3 object the
# server's key can list, any http URL) or escape this check.
_READERS = re.compile(
    r"^(read_\w*|\w*_scan|glob|query|query_table|parquet_\w*|iceberg_\w*|delta_\w*|"
    r"sniff_csv|duckdb_\w*|pragma_\w*|which_secret|getenv|load_\w*|"
    r"current_setting|getvariable)$", re.IGNORECASE)

TablePredicate = Callable[[str, str, str], bool]
_PLAIN_NAME = re.compile(r"[\w$-]+")
# Table functions that make rows out of nothing but their arguments.
_GENERATORS = frozenset({"GENERATE_SERIES", "RANGE", "UNNEST", "EXPLODE"})


def guard(sql: str, reachable: TablePredicate, dialect: str = "duckdb") -> None:
    """Refuse SQL that could read anything but the declared tables.

    `reachable(catalog, db, name)` (empty strings where the SQL leaves a part out) says
    whether a named table may be read; CTE names are always fine. Refused: table
    functions (`glob('s3://warehouse/**')`, `read_parquet(...)`, `query_table(...)`),
    file or URL names used as tables (`FROM 's3://...'`), and functions that read files,
    URLs, secrets or settings wherever they appear. Runs on the SQL that will execute, so
    a query sent as DuckDB SQL is checked the same as translated Trino SQL; the server's
    DuckDB settings (no local files, no http, locked configuration) are a second wall.
    """
    tree = parse(sql, dialect=dialect)
    ctes = _cte_names(tree)
    for node in tree.walk():
        if isinstance(node, exp.Table):
            this = node.this
            if not isinstance(this, exp.Identifier):
                name = _function_name(this)
                if isinstance(this, exp.Values | exp.Subquery) or name.upper() in _GENERATORS:
                    continue
                raise Refused(f"table function {name.lower()}()", "only the declared tables can "
                              "be read here", "name a table: `sluice query` lists them")
            catalog, db, name = node.catalog, node.db, node.name
            if not catalog and not db and name in ctes:
                continue
            # A name with `/`, `:` or `.` could be a file or URL to DuckDB's replacement
            # scans (even under a catalog that is not there): never a table name.
            if not _PLAIN_NAME.fullmatch(name) or not reachable(catalog, db, name):
                written = ".".join(p for p in (catalog, db, name) if p)
                raise Refused(f"table {written}", "not a declared table (files, URLs and "
                              "system tables cannot be read)",
                              "name a lake or real-time table")
        elif isinstance(node, exp.Func):
            name = _function_name(node)
            if _READERS.match(name):
                raise Refused(f"{name.lower()}()", "reads files, URLs or engine state, "
                              "which queries here may not", "query the tables instead")


def _function_name(node: exp.Expression) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.name)
    if isinstance(node, exp.Func):
        return node.sql_name()
    return node.key


_ISO_OFFSET = re.compile(r"(?:[+-]\d{2}(?::?\d{2})?|\[[^\]]+\])$")
_UTC_OFFSET = re.compile(r"(?:Z|[+-]00(?::?00)?)$", re.IGNORECASE)


def _check_iso8601(node: exp.Expression) -> None:
    arg = node.this
    name = "from_iso8601_timestamp()"
    if not (isinstance(arg, exp.Literal) and arg.is_string):
        raise Refused(name, "its argument is not a literal, so Sluice cannot check it has no "
                      "UTC offset; DuckDB converts offsets to UTC where Trino keeps them",
                      "parse literals, or store timestamps as epoch ms / UTC")
    text = arg.this.strip()
    if _UTC_OFFSET.search(text):
        return
    if "T" in text.upper() and _ISO_OFFSET.search(text.split("T", 1)[-1].split("t", 1)[-1]):
        raise Refused(name, f"{text!r} has a UTC offset; DuckDB normalises it to UTC, Trino "
                      "keeps it (hour() and date_trunc() would differ)",
                      "write the instant in UTC (…Z)")


# --------------------------------------------------------------------------- division


_FLOATS = {exp.DataType.Type.DOUBLE, exp.DataType.Type.FLOAT}
_DECIMALS = {exp.DataType.Type.DECIMAL, exp.DataType.Type.BIGDECIMAL,
             exp.DataType.Type.DECIMAL32, exp.DataType.Type.DECIMAL64,
             exp.DataType.Type.DECIMAL128, exp.DataType.Type.DECIMAL256,
             exp.DataType.Type.MONEY, exp.DataType.Type.SMALLMONEY}


def _kind(node: exp.Expression) -> str:
    """Trino's numeric kind of `node`: float, int, decimal or unknown."""
    if isinstance(node, exp.Paren | exp.Neg):
        return _kind(node.this)
    if isinstance(node, exp.Literal):
        if node.is_string:
            return "unknown"
        text = node.this.lower()
        return "float" if "e" in text else ("decimal" if "." in text else "int")
    if isinstance(node, exp.Add | exp.Sub | exp.Mul | exp.Mod | exp.Div):
        kinds = {_kind(node.left), _kind(node.right)}
        if "float" in kinds:
            return "float"
        if "unknown" in kinds:
            return "unknown"
        return "decimal" if "decimal" in kinds else "int"
    dtype = node.type
    if dtype is None:
        return "unknown"
    if dtype.this in _FLOATS:
        return "float"
    if dtype.this in exp.DataType.INTEGER_TYPES:
        return "int"
    if dtype.this in _DECIMALS:
        return "decimal"
    return "unknown"


def _annotated(tree: exp.Expression, schema: dict[str, Any]) -> exp.Expression:
    from sqlglot.optimizer.annotate_types import annotate_types
    from sqlglot.optimizer.qualify import qualify

    copy = tree.copy()
    try:
        copy = qualify(copy, schema=schema, dialect="trino", validate_qualify_columns=False,
                       quote_identifiers=False, identify=False)
    except sqlglot.errors.SqlglotError:
        copy = tree.copy()  # types of columns stay unknown: their divisions are refused
    try:
        return annotate_types(copy, schema=schema, dialect="trino")
    except sqlglot.errors.SqlglotError:
        return copy


def _display(node: exp.Expression) -> str:
    def bare(n: exp.Expression) -> exp.Expression:
        return exp.column(n.name) if isinstance(n, exp.Column) else n

    return node.copy().transform(bare).sql(dialect="trino")


def _check_divisions(tree: exp.Expression, schema: dict[str, Any]) -> None:
    # Most divisions are decided by their text (`x / 1e3`, `CAST(a AS DOUBLE) / b`, `7 / 2`);
    # typing the whole query with the schema costs ~50 ms, so only when one is not.
    undecided = False
    for div in tree.find_all(exp.Div):
        kinds = (_kind(div.left), _kind(div.right))
        if "unknown" in kinds and "float" not in kinds:
            undecided = True
        else:
            _judge(div, *kinds)
    if undecided:
        for div in _annotated(tree, schema).find_all(exp.Div):
            _judge(div, _kind(div.left), _kind(div.right))


def _judge(div: exp.Div, left: str, right: str) -> None:
    """Refuse `div` unless one operand is DOUBLE/REAL (then both engines agree)."""
    if "float" in (left, right):
        return
    hint = ("Make one operand DOUBLE: CAST(a AS DOUBLE) / b, or a / 2e0 (a DOUBLE "
            "literal)")
    shown = _display(div)
    if left == right == "int":
        raise Refused(f"integer division `{shown}`", "Trino divides integers as integers "
                      "(7 / 2 = 3) but DuckDB returns 3.5", hint)
    if "unknown" not in (left, right):
        raise Refused(f"decimal division `{shown}`", "Trino keeps the operands' decimal "
                      "scale (1 / 3.0 = 0.3) but DuckDB returns 0.333", hint)
    raise Refused(f"division `{shown}`", "the operand types are not known here, and "
                  "Trino's integer and decimal division answer differently from "
                  "DuckDB's", hint)


# --------------------------------------------------------------------------- rewrites


def _rewrite(tree: exp.Expression) -> exp.Expression:
    def fix(node: exp.Expression) -> exp.Expression:
        if isinstance(node, exp.DateDiff):
            unit = node.args.get("unit")
            unit_name = unit.name if unit is not None else "DAY"
            return exp.Anonymous(this="DATE_SUB", expressions=[
                exp.Literal.string(unit_name.upper()), node.expression, node.this])
        if isinstance(node, exp.JSONExtractScalar):
            value = node.copy()
            kind = exp.Anonymous(this="JSON_TYPE",
                                 expressions=[node.this.copy(), _json_path(node.expression)])
            is_container = exp.In(this=kind, expressions=[exp.Literal.string("OBJECT"),
                                                          exp.Literal.string("ARRAY")])
            return exp.Case(ifs=[exp.If(this=is_container, true=exp.Null())], default=value)
        return node

    return tree.transform(fix)


def _json_path(path: exp.Expression) -> exp.Expression:
    if isinstance(path, exp.JSONPath):
        return exp.Literal.string(path.sql(dialect="duckdb").strip("'"))
    return path.copy()


# --------------------------------------------------------------------------- results


@dataclass
class Result:
    """A query's answer: column names and types, rows, and where the time went."""

    columns: list[str]
    types: list[str]
    rows: list[list[Any]]
    timing_ms: dict[str, float] = field(default_factory=dict)
    sql: str = ""  # what ran (DuckDB or Trino SQL)
    truncated: bool = False


def format_result(result: Result, fmt: str = "table") -> str:
    """Render as an aligned table, CSV or JSON (one object per row)."""
    if fmt == "json":
        rows = [dict(zip(result.columns, row, strict=False)) for row in result.rows]
        return json.dumps(rows, default=str, indent=None, ensure_ascii=False)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows([["" if v is None else _cell(v) if isinstance(v, bool) else v
                           for v in row] for row in result.rows])
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    cells = [[_cell(v) for v in row] for row in result.rows]
    widths = [len(c) for c in result.columns]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=False)]
    numeric = [t.upper().split("(")[0] in _NUMERIC for t in result.types] or [False] * len(widths)

    def line(values: Sequence[str], header: bool = False) -> str:
        out = []
        for i, (v, w) in enumerate(zip(values, widths, strict=False)):
            right = not header and i < len(numeric) and numeric[i]
            out.append(v.rjust(w) if right else v.ljust(w))
        return " | ".join(out).rstrip()

    lines = [line(result.columns, header=True), "-+-".join("-" * w for w in widths)]
    lines += [line(row) for row in cells]
    count = len(result.rows)
    lines.append(f"({count} row{'s' if count != 1 else ''}"
                 f"{', truncated' if result.truncated else ''})")
    return "\n".join(lines)


_NUMERIC = {"TINYINT", "SMALLINT", "INTEGER", "INT", "BIGINT", "HUGEINT", "UBIGINT",
            "UINTEGER", "USMALLINT", "UTINYINT", "DOUBLE", "FLOAT", "REAL", "DECIMAL",
            "NUMBER"}


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):  # Trino's rendering, not Python's True/False
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --------------------------------------------------------------------------- running


def run(sql: str, *, server_url: str | None = None, trino_url: str | None = None,
        fmt: str = "table", explain: bool = False, timeout_s: float = 60.0,
        connect: Any = None, token: str | None = None, max_rows: int | None = None,
        on_truncated: Callable[[int], None] | None = None) -> str:
    """Run Trino SQL and return the formatted answer (or, with `explain`, the SQL that
    would run). Locally it goes to the real-time server at `server_url` (which knows the
    tables' columns and translates; `token` is its bearer token, `max_rows` how many rows
    to ask for); with `trino_url` to Trino through its DB-API client (`connect` replaces
    `trino.dbapi.connect`, for tests). When the server cut the answer, `on_truncated`
    gets the number of rows kept: csv and json carry no marker of their own."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    if trino_url:
        if explain:
            meta = metadata_statement(sql)
            return translate(sql, target="trino") if meta is None else "; ".join(
                trino_metadata_sql(meta))
        return format_result(query_trino(sql, trino_url, connect=connect), fmt)
    if not server_url:
        raise ValueError("give the real-time server's URL or a Trino URL")
    if explain:
        return explain_server(sql, server_url, timeout_s=timeout_s, token=token)
    result = query_server(sql, server_url, timeout_s=timeout_s, token=token,
                          max_rows=max_rows)
    if result.truncated and on_truncated is not None:
        on_truncated(len(result.rows))
    return format_result(result, fmt)


def _post(server_url: str, body: dict[str, Any], timeout_s: float,
          token: str | None = None) -> dict[str, Any]:
    import httpx

    url = server_url.rstrip("/") + "/query"
    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.post(url, json=body, timeout=timeout_s, headers=headers)
    except httpx.HTTPError as exc:
        raise QueryFailed(f"the real-time server at {server_url} did not answer: {exc} "
                          "(is the stack up? `sluice status`)") from None
    try:
        data = response.json()
    except ValueError:
        raise QueryFailed(f"{url} answered {response.status_code}: "
                          f"{response.text[:300]}") from None
    if response.status_code != 200:
        if data.get("error") == "refused":
            raise Refused(data.get("construct", "query"), data.get("reason", ""),
                          data.get("hint", ""))
        if data.get("error") == "invalid query":  # the user's SQL, not the server, is wrong
            raise TranslationError(data.get("message") or "invalid query")
        raise QueryFailed(data.get("message") or data.get("error") or str(data))
    return data


def query_server(sql: str, server_url: str, *, timeout_s: float = 60.0,
                 token: str | None = None, max_rows: int | None = None) -> Result:
    """POST Trino SQL to the real-time server; it translates and runs it on DuckDB."""
    body: dict[str, Any] = {"sql": sql, "engine": "trino"}
    if max_rows is not None:
        body["max_rows"] = max_rows
    data = _post(server_url, body, timeout_s, token)
    return Result(columns=data["columns"], types=data.get("types", []), rows=data["rows"],
                  timing_ms=data.get("timing_ms", {}), sql=data.get("duckdb_sql", ""),
                  truncated=data.get("truncated", False))


def explain_server(sql: str, server_url: str, *, timeout_s: float = 60.0,
                   token: str | None = None) -> str:
    """The DuckDB SQL the server would run for `sql` (translated with its schema)."""
    return _post(server_url, {"sql": sql, "engine": "trino", "explain": True},
                 timeout_s, token)["duckdb_sql"]


def trino_params(url: str) -> dict[str, Any]:
    """`http(s)://[user@]host[:port][/catalog[/schema]]` -> `trino.dbapi.connect` kwargs."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    path = [p for p in parts.path.split("/") if p]
    scheme = parts.scheme or "http"
    return {
        "host": parts.hostname or "localhost",
        "port": parts.port or (443 if scheme == "https" else 8080),
        "user": parts.username or "sluice",
        "http_scheme": scheme,
        "catalog": path[0] if path else DEFAULT_NAMES.trino_lake_catalog,
        "schema": path[1] if len(path) > 1 else DEFAULT_NAMES.namespace,
        "timezone": "UTC",
    }


def query_trino(sql: str, trino_url: str, *, connect: Any = None) -> Result:
    """Run on Trino (catalogs `iceberg` and `pinot`), short table names resolved."""
    if connect is None:
        from trino.dbapi import connect
    started = time.perf_counter()
    meta = metadata_statement(sql)
    if meta is not None and meta.kind == "tables":
        return _trino_show_tables(meta, trino_url, connect, started)
    target_sql = (translate(sql, target="trino") if meta is None
                  else trino_metadata_sql(meta)[0])
    rows, description = _trino_execute(target_sql, trino_url, connect)
    return Result(columns=[d[0] for d in description],
                  types=[str(d[1]) for d in description], rows=rows, sql=target_sql,
                  timing_ms={"total": round((time.perf_counter() - started) * 1000, 2)})


def _trino_execute(sql: str, trino_url: str, connect: Any) -> tuple[list[list[Any]], list]:
    conn = connect(**trino_params(trino_url))
    try:
        cur = conn.cursor()
        try:
            cur.execute(sql)
            rows = [list(r) for r in cur.fetchall()]
        except Exception as exc:  # the client raises its own hierarchy
            raise QueryFailed(f"Trino at {trino_url}: {exc}") from exc
        return rows, list(cur.description or [])
    finally:
        conn.close()


def _show_tables_sides(meta: Metadata) -> list[tuple[str, str]]:
    """(Trino statement, suffix for its names) per catalog SHOW TABLES reads."""
    n = DEFAULT_NAMES
    schema = list(meta.schema)
    realtime_only = bool(schema) and (schema[-1] == n.realtime_schema
                                      or schema[0] == n.trino_realtime_catalog)
    sides = []
    if not realtime_only:
        namespace = schema[-1] if schema else n.namespace
        sides.append((f'SHOW TABLES FROM "{n.trino_lake_catalog}"."{namespace}"', ""))
    if not schema or realtime_only:
        sides.append((f'SHOW TABLES FROM "{n.trino_realtime_catalog}".'
                      f'"{n.trino_realtime_schema}"', n.realtime_suffix))
    return sides


def trino_metadata_sql(meta: Metadata) -> list[str]:
    """The Trino statement(s) a metadata statement runs as, names resolved."""
    if meta.kind == "tables":
        return [statement for statement, _ in _show_tables_sides(meta)]
    kind, namespace, name = DEFAULT_NAMES.resolve(list(meta.table))
    return ["DESCRIBE " + ".".join(
        f'"{p}"' for p in DEFAULT_NAMES.target(kind, namespace, name, "trino"))]


def _trino_show_tables(meta: Metadata, trino_url: str, connect: Any,
                       started: float) -> Result:
    """SHOW TABLES over both catalogs: the lake's tables as they are, the real-time
    catalog's with the `_rt` suffix, as `sluice query` names them locally. `FROM <schema>`
    narrows it to one side (`realtime`, or a lake namespace)."""
    sides = _show_tables_sides(meta)
    names: list[str] = []
    for statement, suffix in sides:
        rows, _ = _trino_execute(statement, trino_url, connect)
        names += [f"{r[0]}{suffix}" for r in rows]
    names = sorted(x for x in names if like_matches(meta.like, x))
    return Result(columns=TABLES_COLUMNS, types=["varchar"], rows=[[x] for x in names],
                  sql="; ".join(st for st, _ in sides),
                  timing_ms={"total": round((time.perf_counter() - started) * 1000, 2)})
