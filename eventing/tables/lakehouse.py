"""Clients for the lake: the Iceberg REST catalog (pyiceberg), DuckDB, and raw S3.

One place builds all three from the same `LakeConfig`, so the sink that writes a table
and the query engine that reads it can never point at different catalogs or keys.

Settings that work against SeaweedFS's catalog (measured, see
`shared/notes/local-parts.md`):

- pyiceberg: OAuth2 `credential=<key>:<secret>` (SigV4 also works), `s3.path-style-access`;
- DuckDB 1.5.5: extensions come from the `duckdb-extension-*` wheels
  (`duckdb_extensions.import_extension`) because `INSTALL` would download; the iceberg
  extension needs avro loaded first; the catalog is ATTACHed with an iceberg OAuth2
  secret (SigV4 fails there) and the data files are read with an s3 secret using path
  URLs. A long-lived connection sees new commits.

Usage::

    cfg = LakeConfig.from_settings(settings)
    table = catalog(cfg).load_table("sluice.payments_scored")
    con = duckdb_connect(cfg)          # then: SELECT count(*) FROM payments_scored
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:  # heavy imports stay lazy: the CLI imports this module for every command
    import duckdb
    from pyarrow.fs import S3FileSystem
    from pyiceberg.catalog.rest import RestCatalog

DEFAULT_NAMESPACE = "sluice"
DUCKDB_EXTENSIONS = ("httpfs", "aws", "avro", "iceberg")  # order matters: avro before iceberg


@dataclass(frozen=True)
class LakeConfig:
    """Where the lake is and how to sign in: catalog URI, warehouse, S3 endpoint, keys."""

    catalog_uri: str
    s3_endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    warehouse: str = "s3://warehouse"
    region: str = "us-east-1"
    namespace: str = DEFAULT_NAMESPACE

    @staticmethod
    def from_settings(settings: Any, namespace: str = DEFAULT_NAMESPACE) -> LakeConfig:
        """Build from a `StackSettings` (duck-typed, so this module imports no settings)."""
        creds = settings.credentials
        return LakeConfig(
            catalog_uri=settings.iceberg_url,
            s3_endpoint=settings.s3_endpoint,
            access_key=creds.access_key,
            secret_key=creds.secret_key,
            warehouse=f"s3://{settings.warehouse_bucket}",
            region=settings.region,
            namespace=namespace,
        )

    @property
    def warehouse_name(self) -> str:
        """The warehouse as the catalog names it (`warehouse`, not `s3://warehouse`)."""
        return self.warehouse.removeprefix("s3://").rstrip("/")

    def qualified(self, table: str) -> str:
        """`payments_scored` -> `sluice.payments_scored` (already qualified names pass)."""
        return table if "." in table else f"{self.namespace}.{table}"


def table_name_for_topic(topic: str) -> str:
    """Tables are named after their topic: `payments.scored` -> `payments_scored`."""
    return topic.replace(".", "_").replace("-", "_")


def catalog_properties(cfg: LakeConfig) -> dict[str, str]:
    """pyiceberg REST catalog properties (also usable by `pyiceberg.catalog.load_catalog`)."""
    return {
        "type": "rest",
        "uri": cfg.catalog_uri,
        "warehouse": cfg.warehouse,
        "credential": f"{cfg.access_key}:{cfg.secret_key}",
        "oauth2-server-uri": cfg.catalog_uri.rstrip("/") + "/v1/oauth/tokens",
        "s3.endpoint": cfg.s3_endpoint,
        "s3.access-key-id": cfg.access_key,
        "s3.secret-access-key": cfg.secret_key,
        "s3.region": cfg.region,
        "s3.path-style-access": "true",
    }


def catalog(cfg: LakeConfig, *, ensure_namespace: bool = True) -> RestCatalog:
    """A pyiceberg REST catalog; creates `cfg.namespace` when missing (idempotent)."""
    from pyiceberg.catalog.rest import RestCatalog

    cat = RestCatalog("sluice", **catalog_properties(cfg))
    if ensure_namespace:
        cat.create_namespace_if_not_exists(cfg.namespace)
    return cat


def s3_filesystem(cfg: LakeConfig) -> S3FileSystem:
    """A pyarrow S3 filesystem on the object store (listing and deleting files).

    pyiceberg's FileIO cannot list; maintenance needs a listing to find orphan files.
    """
    from pyarrow.fs import S3FileSystem

    url = urlsplit(cfg.s3_endpoint)
    return S3FileSystem(
        access_key=cfg.access_key,
        secret_key=cfg.secret_key,
        endpoint_override=url.netloc,
        scheme=url.scheme or "http",
        region=cfg.region,
        force_virtual_addressing=False,
    )


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def duckdb_connect(
    cfg: LakeConfig,
    *,
    alias: str = "lake",
    use_namespace: bool = True,
    con: duckdb.DuckDBPyConnection | None = None,
) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the catalog ATTACHed as `alias` (read and write).

    Tables are `alias.namespace.table`; with `use_namespace` the default schema is the
    namespace, so `SELECT * FROM payments_scored` works. Pass `con` to attach to an
    existing connection (it must not have autoinstall enabled).
    """
    import duckdb
    import duckdb_extensions

    if con is None:
        con = duckdb.connect(config={"autoinstall_known_extensions": "false",
                                     "autoload_known_extensions": "false"})
    for ext in DUCKDB_EXTENSIONS:
        duckdb_extensions.import_extension(ext, con=con)  # installs from the wheel, offline
        con.execute(f"LOAD {ext}")
    s3 = urlsplit(cfg.s3_endpoint)
    con.execute(
        f"CREATE OR REPLACE SECRET {alias}_s3 (TYPE s3, KEY_ID {_sql_str(cfg.access_key)}, "
        f"SECRET {_sql_str(cfg.secret_key)}, REGION {_sql_str(cfg.region)}, "
        f"ENDPOINT {_sql_str(s3.netloc)}, URL_STYLE 'path', "
        f"USE_SSL {'true' if s3.scheme == 'https' else 'false'})"
    )
    catalog_uri = cfg.catalog_uri.rstrip("/")
    con.execute(
        f"CREATE OR REPLACE SECRET {alias}_iceberg (TYPE iceberg, "
        f"CLIENT_ID {_sql_str(cfg.access_key)}, CLIENT_SECRET {_sql_str(cfg.secret_key)}, "
        f"OAUTH2_SERVER_URI {_sql_str(catalog_uri + '/v1/oauth/tokens')})"
    )
    con.execute(
        f"ATTACH {_sql_str(cfg.warehouse_name)} AS {alias} "
        f"(TYPE iceberg, ENDPOINT {_sql_str(catalog_uri)}, SECRET {alias}_iceberg)"
    )
    if use_namespace:
        con.execute(f"USE {alias}.{cfg.namespace}")
    return con
