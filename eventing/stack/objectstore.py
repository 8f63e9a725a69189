"""SeaweedFS (`weed mini`): S3 with SigV4 and an Iceberg REST catalog.

Every listener is named on the command line: `weed mini` otherwise binds defaults of its
own (the admin ports among them) and a second stack on the same machine would clash.
"""

from __future__ import annotations

from eventing.stack import binaries
from eventing.stack.health import http_status
from eventing.stack.process import PartSpec
from eventing.stack.settings import StackSettings

NAME = "objectstore"


def spec(settings: StackSettings) -> PartSpec:
    p = settings.ports
    creds = settings.credentials
    data_dir = settings.state_dir / "data" / NAME
    data_dir.mkdir(parents=True, exist_ok=True)
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
        filer = f"http://{settings.host}:{p.weed_filer}/buckets/{settings.broker_bucket}/"
        return http_status(filer, headers={"Accept": "application/json"}) == 200

    return PartSpec(
        name=NAME,
        argv=argv,
        env=env,
        cwd=data_dir,
        endpoint=f"s3 {settings.s3_endpoint}  iceberg {settings.iceberg_url}",
        health=healthy,
        start_timeout=60.0,
        # Every listener: a clash on any of them (a gRPC port of another stack whose
        # offset differs by 1000, say) would break weed after start, not before.
        ports=[p.s3, p.iceberg, p.weed_master, p.weed_master_grpc, p.weed_volume,
               p.weed_volume_grpc, p.weed_filer, p.weed_filer_grpc, p.weed_s3_grpc,
               p.weed_metrics, p.weed_debug, p.weed_admin, p.weed_admin_grpc],
    )
