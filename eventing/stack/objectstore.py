"""SeaweedFS (`weed mini`): S3 with SigV4 and an Iceberg REST catalog.

Every listener is named on the command line: `weed mini` otherwise binds defaults of its
own (the admin ports among them) and a second stack on the same machine would clash.

The filer's HTTP port lists, reads, writes and deletes every object with no SigV4, so
it is bound to a signing key: `security.toml` in the part's working folder (where
`weed` looks first) sets `jwt.filer_signing` and `jwt.filer_signing.read` to a random
key kept in the state folder (mode 0600), and an unsigned request is answered 401.
S3 (SigV4) and the Iceberg catalog (OAuth2) are the ways in; the health check uses S3.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from eventing.stack import binaries
from eventing.stack.health import http_probe, http_status
from eventing.stack.process import PartSpec
from eventing.stack.settings import StackSettings

NAME = "objectstore"


def write_security(data_dir: Path) -> Path:
    """`security.toml` binding the filer's HTTP API to a key (kept if already there)."""
    path = data_dir / "security.toml"
    if not path.exists():
        key = secrets.token_urlsafe(32)
        text = "".join(f'[{section}]\nkey = "{key}"\nexpires_after_seconds = 10\n\n'
                       for section in ("jwt.filer_signing", "jwt.filer_signing.read"))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    return path


def bucket_exists(settings: StackSettings, bucket: str) -> bool:
    """Whether `bucket` answers a signed S3 request (pyarrow's S3 client, SigV4)."""
    from pyarrow import fs

    creds = settings.credentials
    s3 = fs.S3FileSystem(access_key=creds.access_key, secret_key=creds.secret_key,
                         endpoint_override=settings.s3_endpoint, region=settings.region,
                         connect_timeout=1, request_timeout=2, retry_strategy=
                         fs.AwsStandardS3RetryStrategy(max_attempts=1))
    try:
        return s3.get_file_info(bucket).type == fs.FileType.Directory
    except OSError:
        return False


def spec(settings: StackSettings) -> PartSpec:
    p = settings.ports
    creds = settings.credentials
    data_dir = settings.state_dir / "data" / NAME
    data_dir.mkdir(parents=True, exist_ok=True)
    write_security(data_dir)
    argv = [
        binaries.weed(), "mini",
        f"-dir={data_dir}",
        f"-ip={settings.host}", f"-ip.bind={settings.host}",
        "-webdav=false", "-admin.ui=false", "-s3.port.lance=0", "-master.telemetry=false",
        f"-tableBucket={settings.warehouse_bucket}",
        f"-bucket={settings.broker_bucket}",
        f"-master.port={p.weed_master}", f"-master.port.grpc={p.weed_master_grpc}",
        f"-volume.port={p.weed_volume}", f"-volume.port.grpc={p.weed_volume_grpc}",
        f"-filer.port={p.weed_filer}", f"-filer.port.grpc={p.weed_filer_grpc}",
        f"-s3.port={p.s3}", f"-s3.port.grpc={p.weed_s3_grpc}",
        f"-s3.port.iceberg={p.iceberg}",
        f"-metricsPort={p.weed_metrics}", f"-debug.port={p.weed_debug}",
        f"-admin.port={p.weed_admin}", f"-admin.port.grpc={p.weed_admin_grpc}",
    ]
    env = {
        **binaries.base_env(),
        "AWS_ACCESS_KEY_ID": creds.access_key,
        "AWS_SECRET_ACCESS_KEY": creds.secret_key,
    }

    def healthy() -> bool:
        # S3 answers (403 unsigned), the catalog answers, and the broker's bucket exists.
        if http_status(settings.s3_endpoint + "/") is None:
            return False
        if http_status(settings.iceberg_url + "/v1/config") is None:
            return False
        return bucket_exists(settings, settings.broker_bucket)

    return PartSpec(
        name=NAME,
        argv=argv,
        env=env,
        cwd=data_dir,
        endpoint=f"s3 {settings.s3_endpoint}  iceberg {settings.iceberg_url}",
        health=healthy,
        start_timeout=60.0,
        liveness=http_probe(settings.s3_endpoint + "/healthz"),
        # Every listener: a clash on any of them (a gRPC port of another stack whose
        # offset differs by 1000, say) would break weed after start, not before.
        ports=[p.s3, p.iceberg, p.weed_master, p.weed_master_grpc, p.weed_volume,
               p.weed_volume_grpc, p.weed_filer, p.weed_filer_grpc, p.weed_s3_grpc,
               p.weed_metrics, p.weed_debug, p.weed_admin, p.weed_admin_grpc],
    )
