"""Trino SQL -> DuckDB: what must be refused, and what must translate to Trino's answers.

Translations are checked by running them on DuckDB over small in-memory tables laid
out as the real-time server lays them out (`memory.main.payments_scored_rt`, and a
`lake` catalog with `sluice.payments_scored`), and comparing with the answer Trino's
semantics require (worked out by hand in each test).
"""

from __future__ import annotations

import datetime as dt
import json

import duckdb
import pytest

from eventing.tables import query
from eventing.tables.query import (
    Refused,
    Result,
    TranslationError,
    format_result,
    translate,
)
from functions.queries import EXAMPLES

UTC = dt.UTC
NOW = dt.datetime.now(UTC).replace(microsecond=0)

# (payment_id, card_id, merchant_id, amount_eur, country, event_time, count_1m, score,
#  decision, payload, reasons, kafka_partition, kafka_offset)
def _rows(now: dt.datetime) -> list[tuple]:
    return [
        ("p1", "card-42", "m1", 10.0, "DE", now - dt.timedelta(minutes=1), 3, 90.0, "decline",
         '{"a": {"b": 1}, "s": "x"}', "velocity", 0, 10),
        ("p2", "card-42", "m1", 20.0, "DE", now - dt.timedelta(minutes=2), 2, 60.0, "review",
         '{"a": [1, 2], "s": null}', "", 0, 11),
        ("p3", "card-7", "m2", 30.0, "FR", now - dt.timedelta(minutes=3), 1, 10.0, "approve",
         '{"s": "y"}', "", 1, 5),
        ("p4", "card-7", "m1", 40.0, "FR", now - dt.timedelta(minutes=30), 7, 95.0, "decline",
         "{}", "amount,velocity", 1, 6),
    ]


ROWS = _rows(NOW)
COLUMNS = ("payment_id VARCHAR, card_id VARCHAR, merchant_id VARCHAR, amount_eur DOUBLE, "
           "country VARCHAR, event_time TIMESTAMPTZ, count_1m INTEGER, score DOUBLE, "
           "decision VARCHAR, payload VARCHAR, reasons VARCHAR, kafka_partition INTEGER, "
           "kafka_offset BIGINT")
SCHEMA_TYPES = {c.split()[0]: c.split()[1] for c in COLUMNS.split(", ")}
assert len(SCHEMA_TYPES) == len(ROWS[0])
SCHEMA = {"payments_scored_rt": SCHEMA_TYPES, "payments_scored": SCHEMA_TYPES}


@pytest.fixture(scope="module")
def con() -> duckdb.DuckDBPyConnection:
    # Rows are placed relative to when the table is built, not when the module was
    # imported: in a long suite minutes pass between the two, and "the last 5 minutes"
    # would then miss them.
    global NOW, ROWS
    NOW = dt.datetime.now(UTC).replace(microsecond=0)
    ROWS = _rows(NOW)
    c = duckdb.connect()
    c.execute("SET TimeZone = 'UTC'")
    c.execute(f"CREATE TABLE memory.main.payments_scored_rt ({COLUMNS})")
    c.executemany("INSERT INTO memory.main.payments_scored_rt VALUES "
                  "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", ROWS)
    c.execute("ATTACH ':memory:' AS lake")
    c.execute("CREATE SCHEMA lake.sluice")
    # The lake has p3 and p4 (partition 1 up to offset 6) and an older row, p0.
    c.execute(f"CREATE TABLE lake.sluice.payments_scored ({COLUMNS})")
    old = ("p0", "card-7", "m9", 5.0, "FR", NOW - dt.timedelta(hours=2), 1, 5.0, "approve",
           "{}", "", 1, 4)
    c.executemany("INSERT INTO lake.sluice.payments_scored VALUES "
                  "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [old, ROWS[2], ROWS[3]])
    return c


def run(con: duckdb.DuckDBPyConnection, trino_sql: str) -> list[tuple]:
    return con.execute(translate(trino_sql, schema=SCHEMA)).fetchall()


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("sql, construct", [
    ("SELECT 7 / 2", "integer division"),
    ("SELECT -7 / 2", "integer division"),
    ("SELECT count_1m / 2 FROM payments_scored_rt", "integer division"),
    ("SELECT p.count_1m / r.count_1m FROM payments_scored p "
     "JOIN payments_scored_rt r ON p.payment_id = r.payment_id", "integer division"),
    ("SELECT sum(count_1m) / count(*) FROM payments_scored_rt", "integer division"),
    ("SELECT count_if(score > 50) / count(*) FROM payments_scored_rt", "integer division"),
    ("SELECT CAST(amount_eur AS BIGINT) / 3 FROM payments_scored_rt", "integer division"),
    ("SELECT c / 2 FROM (SELECT count_1m AS c FROM payments_scored_rt) t",
     "integer division"),
    ("SELECT 1 / 3.0", "decimal division"),
    ("SELECT count_if(score > 50) * 1.0 / count(*) FROM payments_scored_rt",
     "decimal division"),
    ("SELECT unknown_column / 2 FROM payments_scored_rt", "division"),
    ("SELECT count_1m / 2 FROM some_table_without_schema", "division"),
    ("SELECT format_datetime(event_time, 'yyyy-MM-dd') FROM payments_scored_rt",
     "format_datetime()"),
    ("SELECT parse_datetime('2024-01-01', 'yyyy-MM-dd')", "parse_datetime()"),
    ("SELECT map_agg(card_id, score) FROM payments_scored_rt", "map_agg()"),
    ("SELECT approx_set(card_id) FROM payments_scored_rt", "approx_set()"),
    ("SELECT cardinality(merge(s)) FROM (SELECT approx_set(card_id) s FROM "
     "payments_scored_rt) t", "merge()"),
    ("SELECT x, y FROM UNNEST(ARRAY[1, 2], ARRAY['a', 'b']) AS t(x, y)",
     "UNNEST of several arrays"),
    ("SELECT approx_percentile(score, amount_eur, 0.5) FROM payments_scored_rt",
     "approx_percentile with weights or accuracy"),
    ("SELECT approx_percentile(score, 1, 0.5, 0.01) FROM payments_scored_rt",
     "approx_percentile with weights or accuracy"),
    ("SELECT event_time AT TIME ZONE 'Europe/Berlin' FROM payments_scored_rt", "AT TIME ZONE"),
    ("SELECT from_iso8601_timestamp('2024-01-01T10:00:00+02:00')",
     "from_iso8601_timestamp()"),
    ("SELECT from_iso8601_timestamp('2024-01-01T10:00:00-0530')",
     "from_iso8601_timestamp()"),
    ("SELECT from_iso8601_timestamp(payload) FROM payments_scored_rt",
     "from_iso8601_timestamp()"),
])
def test_refuses_what_would_answer_differently(sql: str, construct: str) -> None:
    with pytest.raises(Refused) as info:
        translate(sql, schema=SCHEMA)
    assert info.value.construct.startswith(construct)
    assert info.value.reason  # says why, not only what
    assert str(info.value).startswith("refused: ")


def test_integer_division_refusal_explains_and_suggests() -> None:
    with pytest.raises(Refused) as info:
        translate("SELECT count_1m / 2 FROM payments_scored_rt", schema=SCHEMA)
    text = str(info.value)
    assert "count_1m / 2" in text and "7 / 2 = 3" in text and "CAST(a AS DOUBLE)" in text


def test_schema_may_be_a_lookup_asked_only_for_tables_read() -> None:
    asked = []

    def columns(name: str):
        asked.append(name)
        return SCHEMA_TYPES if name == "payments_scored_rt" else None

    assert "/ 2e0" in translate("SELECT count_1m / 2e0 FROM payments_scored_rt", schema=columns)
    with pytest.raises(Refused):
        translate("SELECT count_1m / 2 FROM payments_scored_rt", schema=columns)
    assert set(asked) == {"payments_scored_rt"}


@pytest.mark.parametrize("sql, message", [
    ("DROP TABLE payments_scored_rt", "only queries"),
    ("INSERT INTO payments_scored_rt (payment_id) VALUES ('x')", "only queries"),
    ("DELETE FROM payments_scored_rt", "only queries"),
    ("SELECT 1; SELECT 2", "one statement"),
    ("SELEC 1 FROM", r"line 1, column 1: 'SELEC' does not start a SQL statement; did you "
                     "mean SELECT\\?"),
    ("SELECT a FROM t WHERE", "does not parse as trino SQL at line 1, column 17"),
    ("SELECT * FROM hive.default.payments", "unknown catalog 'hive'"),
])
def test_rejects_what_cannot_run(sql: str, message: str) -> None:
    with pytest.raises(TranslationError, match=message):
        translate(sql, schema=SCHEMA)


# --------------------------------------------------------------------------- answers


def test_division_with_a_double_operand_gives_trinos_answer(con) -> None:
    # Trino: CAST(3 AS DOUBLE) / 2 = 1.5, 3 / 2e0 = 1.5, avg(int) is a double.
    rows = run(con, "SELECT CAST(count_1m AS DOUBLE) / 2, count_1m / 2e0, "
                    "avg(count_1m) / 2 FROM payments_scored_rt WHERE payment_id = 'p1' "
                    "GROUP BY count_1m")
    assert rows == [(1.5, 1.5, 1.5)]
    rows = run(con, "SELECT count_if(decision = 'decline') / CAST(count(*) AS DOUBLE) "
                    "FROM payments_scored_rt")
    assert rows == [(0.5,)]


def test_integer_math_without_division_is_unchanged(con) -> None:
    # Trino: 3 * 2 + 7 % 2 = 7, -7 % 2 = -1 (sign of the dividend, as in DuckDB).
    assert run(con, "SELECT count_1m * 2 + 7 % 2, -7 % 2 FROM payments_scored_rt "
                    "WHERE payment_id = 'p1'") == [(7, -1)]


def test_date_trunc_and_date_add(con) -> None:
    hour = NOW.replace(minute=0, second=0)
    rows = run(con, "SELECT date_trunc('hour', TIMESTAMP '2024-05-01 10:59:59 UTC'), "
                    "date_add('minute', -5, TIMESTAMP '2024-05-01 10:02:00 UTC'), "
                    "date_trunc('hour', event_time) FROM payments_scored_rt "
                    "WHERE payment_id = 'p1'")
    assert rows[0][0] == dt.datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert rows[0][1] == dt.datetime(2024, 5, 1, 9, 57, tzinfo=UTC)
    expected = (NOW - dt.timedelta(minutes=1)).replace(minute=0, second=0)
    assert rows[0][2] in (hour, expected)
    assert rows[0][2] == expected


def test_date_diff_counts_whole_units_as_trino_does(con) -> None:
    # Trino: 10:59 -> 11:01 is 0 whole hours and 2 minutes; 11:01 -> 10:00 is -1 hour.
    # (DuckDB's own date_diff would say 1 hour: it counts boundaries crossed.)
    rows = run(con, "SELECT date_diff('hour', TIMESTAMP '2024-01-01 10:59:00 UTC', "
                    "TIMESTAMP '2024-01-01 11:01:00 UTC'), "
                    "date_diff('minute', TIMESTAMP '2024-01-01 10:59:00 UTC', "
                    "TIMESTAMP '2024-01-01 11:01:00 UTC'), "
                    "date_diff('hour', TIMESTAMP '2024-01-01 11:01:00 UTC', "
                    "TIMESTAMP '2024-01-01 10:00:00 UTC'), "
                    "date_diff('day', DATE '2024-01-01', DATE '2024-03-01')")
    assert rows == [(0, 2, -1, 60)]


def test_approx_distinct_and_approx_percentile(con) -> None:
    rows = run(con, "SELECT approx_distinct(card_id), approx_percentile(count_1m, 0.5) "
                    "FROM payments_scored_rt")
    distinct, median = rows[0]
    assert distinct == 2
    assert median in (2, 3)  # Trino: an approximate median of 1, 2, 3, 7
    rows = run(con, "SELECT approx_percentile(x, ARRAY[0.5, 0.9]) "
                    "FROM UNNEST(sequence(1, 101)) AS t(x)")
    low, high = rows[0][0]
    assert abs(low - 51) <= 2 and abs(high - 91) <= 2


def test_window_functions(con) -> None:
    rows = run(con, """
        SELECT payment_id,
               row_number() OVER (PARTITION BY card_id ORDER BY event_time) AS n,
               lag(payment_id) OVER (PARTITION BY card_id ORDER BY event_time) AS prev,
               sum(amount_eur) OVER (PARTITION BY card_id ORDER BY event_time) AS running
        FROM payments_scored_rt ORDER BY card_id, event_time""")
    assert rows == [("p2", 1, None, 20.0), ("p1", 2, "p2", 30.0),
                    ("p4", 1, None, 40.0), ("p3", 2, "p4", 70.0)]


def test_json_extract_scalar_is_null_for_objects_and_arrays(con) -> None:
    rows = run(con, "SELECT payment_id, json_extract_scalar(payload, '$.s'), "
                    "json_extract_scalar(payload, '$.a'), json_extract_scalar(payload, '$.a.b') "
                    "FROM payments_scored_rt WHERE payment_id IN ('p1', 'p2', 'p3') "
                    "ORDER BY payment_id")
    # Trino: scalars as text, NULL for objects/arrays/null/missing.
    assert rows == [("p1", "x", None, "1"), ("p2", None, None, None), ("p3", "y", None, None)]


def test_from_iso8601_in_utc_and_date(con) -> None:
    rows = run(con, "SELECT from_iso8601_timestamp('2024-01-01T10:00:00Z'), "
                    "hour(from_iso8601_timestamp('2024-01-01T10:00:00+00:00')), "
                    "from_iso8601_date('2024-02-29')")
    assert rows == [(dt.datetime(2024, 1, 1, 10, tzinfo=UTC), 10, dt.date(2024, 2, 29))]


def test_misc_functions(con) -> None:
    rows = run(con, "SELECT count_if(score > 50), arbitrary(country), max_by(payment_id, score), "
                    "element_at(split('a,b,c', ','), 2), regexp_like('card-42', '\\d+'), "
                    "if(count(*) > 3, 'many', 'few') FROM payments_scored_rt")
    assert rows[0][0] == 3 and rows[0][2] == "p4" and rows[0][3] == "b"
    assert rows[0][4] is True and rows[0][5] == "many"
    assert rows[0][1] in ("DE", "FR")


@pytest.mark.parametrize("name", ["payments_scored_rt", "realtime.payments_scored",
                                  "pinot.default.payments_scored"])
def test_realtime_table_names(con, name: str) -> None:
    assert run(con, f"SELECT count(*) FROM {name}") == [(4,)]


@pytest.mark.parametrize("name", ["payments_scored", "sluice.payments_scored",
                                  "iceberg.sluice.payments_scored"])
def test_lake_table_names(con, name: str) -> None:
    assert run(con, f"SELECT count(*) FROM {name}") == [(3,)]


def test_qualified_columns_and_ctes_keep_working(con) -> None:
    assert run(con, "SELECT payments_scored_rt.payment_id FROM payments_scored_rt "
                    "WHERE payments_scored_rt.count_1m = 7") == [("p4",)]
    # A CTE named like a table shadows it, as in Trino.
    assert run(con, "WITH payments_scored AS (SELECT 1 AS x) "
                    "SELECT x FROM payments_scored") == [(1,)]


def test_union_of_lake_and_realtime(con) -> None:
    rows = run(con, "SELECT count(*), count(DISTINCT payment_id) FROM ("
                    "SELECT payment_id FROM payments_scored UNION ALL "
                    "SELECT payment_id FROM payments_scored_rt) t")
    assert rows == [(7, 5)]


def test_trino_target_only_resolves_names() -> None:
    sql = translate("SELECT count_1m / 2, format_datetime(event_time, 'yyyy') "
                    "FROM payments_scored_rt r JOIN payments_scored p USING (payment_id)",
                    target="trino")
    assert "pinot.default.payments_scored AS r" in sql
    assert "iceberg.sluice.payments_scored AS p" in sql
    assert "count_1m / 2" in sql and "FORMAT_DATETIME" in sql.upper()


# --------------------------------------------------------------------------- examples


def test_examples_translate_and_answer(con) -> None:
    assert set(EXAMPLES) == {"top_risky_merchants_5m", "fraud_rate_by_country_hourly",
                             "card_timeline"}
    top = run(con, EXAMPLES["top_risky_merchants_5m"])
    # Last 5 minutes: p1 (m1 decline), p2 (m1 review), p3 (m2 approve): only m1 is flagged.
    assert top == [("m1", 2, 2, 75.0, 1, 30.0)]

    rates = run(con, EXAMPLES["fraud_rate_by_country_hourly"])
    # Lake: p0, p3, p4; real-time adds p1, p2 (partition 0, not in the lake); p3 and p4
    # are already in the lake (partition 1, offsets <= 6) and are not counted twice.
    total = sum(r[2] for r in rates)
    declined = sum(r[3] for r in rates)
    assert (total, declined) == (5, 2)
    de = [r for r in rates if r[1] == "DE"]
    assert sum(r[2] for r in de) == 2 and all(0 <= r[4] <= 1 for r in rates)

    timeline = run(con, EXAMPLES["card_timeline"])
    assert [r[1] for r in timeline] == ["p2", "p1"]
    assert timeline[0][-1] is None and timeline[1][-1] == 60.0


# --------------------------------------------------------------------------- output


RESULT = Result(columns=["merchant_id", "payments", "score"], types=["VARCHAR", "BIGINT",
                "DOUBLE"], rows=[["m1", 2, 75.5], ["m22", 10, None]])


def test_table_format_aligns_columns() -> None:
    lines = format_result(RESULT, "table").splitlines()
    assert lines[0] == "merchant_id | payments | score"
    assert lines[1] == "------------+----------+------"
    assert lines[2] == "m1          |        2 |  75.5"
    assert lines[3] == "m22         |       10 |  NULL"
    assert lines[4] == "(2 rows)"


def test_csv_and_json_formats() -> None:
    assert format_result(RESULT, "csv").splitlines() == [
        "merchant_id,payments,score", "m1,2,75.5", "m22,10,"]
    assert json.loads(format_result(RESULT, "json")) == [
        {"merchant_id": "m1", "payments": 2, "score": 75.5},
        {"merchant_id": "m22", "payments": 10, "score": None}]


# --------------------------------------------------------------------------- Trino client


class FakeCursor:
    def __init__(self, log: list) -> None:
        self.log = log
        self.description = None

    def execute(self, sql: str) -> None:
        self.log.append(sql)
        if "boom" in sql:
            raise RuntimeError("TrinoUserError: line 1:8: Column 'boom' cannot be resolved")
        self.description = [("merchant_id", "varchar", None, None, None, None, None),
                            ("flagged", "bigint", None, None, None, None, None)]

    def fetchall(self) -> list:
        return [("m1", 2), ("m2", 1)]


class FakeConnection:
    def __init__(self, log: list) -> None:
        self.log = log
        self.closed = False

    def cursor(self) -> FakeCursor:
        return FakeCursor(self.log)

    def close(self) -> None:
        self.closed = True


def fake_connect(log: list, connections: list):
    def connect(**kwargs):
        log.append(kwargs)
        conn = FakeConnection(log)
        connections.append(conn)
        return conn
    return connect


def test_trino_path_uses_the_dbapi_client() -> None:
    log: list = []
    conns: list = []
    out = query.run("SELECT merchant_id, count(*) AS flagged FROM payments_scored_rt "
                    "GROUP BY 1", trino_url="https://analyst@trino.example:8443",
                    fmt="csv", connect=fake_connect(log, conns))
    kwargs, sql = log
    assert kwargs == {"host": "trino.example", "port": 8443, "user": "analyst",
                      "http_scheme": "https", "catalog": "iceberg", "schema": "sluice",
                      "timezone": "UTC"}
    assert "FROM pinot.default.payments_scored AS payments_scored_rt" in sql
    assert out.splitlines() == ["merchant_id,flagged", "m1,2", "m2,1"]
    assert conns[0].closed


def test_trino_path_errors_and_explain() -> None:
    log: list = []
    conns: list = []
    with pytest.raises(query.QueryFailed, match="cannot be resolved"):
        query.run("SELECT boom FROM payments_scored", trino_url="http://localhost:8080",
                  connect=fake_connect(log, conns))
    assert conns[0].closed
    assert log[0]["port"] == 8080 and log[0]["user"] == "sluice"
    explained = query.run("SELECT * FROM payments_scored", trino_url="localhost:8080",
                          explain=True)
    assert explained == "SELECT * FROM iceberg.sluice.payments_scored AS payments_scored"


def test_trino_url_with_catalog_and_schema() -> None:
    params = query.trino_params("http://trino:8080/iceberg/analytics")
    assert (params["catalog"], params["schema"], params["port"]) == ("iceberg", "analytics",
                                                                     8080)
