"""SeaweedFS (`weed mini`): S3 with SigV4 and an Iceberg REST catalog.

Every listener is named on the command line: `weed mini` otherwise binds defaults of its
own (the admin ports among them) and a second stack on the same machine would clash.

The filer's HTTP port lists, reads, writes and deletes every object with no SigV4, so
it is bound to a signing key: `security.toml` in the part's working folder (where
`weed` looks first) sets `jwt.filer_signing` and `jwt.filer_signing.read` to a random
key kept in the state folder (mode 0600), and an unsigned request is answered 401.
S3 (SigV4) and the Iceberg catalog (OAuth2) are the ways in; the health check uses S3.

What grows, and its bound (measured with `benchmarks/soak.py`, see the README):

- **The filer's metadata change log.** The filer appends every metadata event (each
  object written or deleted, with its attributes) to files under `/topics/.system/log/
  <day>/<HH-MM>.<filer id>`, one per minute, and never deletes them; SeaweedFS's own
  `fs.log.purge` works in whole days. Under the example pipeline that log grew faster
  than the lake itself (~4-5 MiB/min against the bucket's ~1.9). `purge_filer_log`
  deletes the minute files older than `StackSettings.filer_log_keep_s` (nothing here
  replays it: it serves `filer.sync` and metadata subscribers that fell behind the
  filer's memory buffer), and
  `ObjectStoreJanitor` runs it periodically (in the supervisor, `sluice supervise`: the
  stack's keeper, running as long as the store does).
- **Deleted objects' space.** A volume (`<collection>_<id>.dat` in the data folder; the
  filer log's minute files live in the default collection's, the lake in `warehouse_*`)
  keeps deleted needles until it is compacted ("vacuumed"). `weed mini` starts an admin
  server with a maintenance worker that can vacuum, and while that worker is connected
  the admin *disables the master's automatic vacuum* (`DisableVacuum(ByPlugin)`, SeaweedFS
  `weed/admin/dash/admin_server.go`): `-master.vacuumIntervalSeconds` then does nothing,
  and the worker looks only every 17 minutes and for volumes over 30% garbage. A soak
  saw the data folder grow +5.5 MiB/min for 30 minutes: the purged log minutes were
  never given back. So the janitor compacts too: after each purge it runs `volume.vacuum
  -garbageThreshold=StackSettings.objectstore_garbage_threshold` through `weed shell`
  (a manual vacuum, which the master runs whatever the automatic switch says), and the
  disk holds the kept log minutes, the lake and at most that share of garbage.
  The master's interval stays at `VACUUM_INTERVAL_S`: a fallback for when no worker is
  connected.
- **Go's heap.** `weed mini` holds ~260 MiB of live heap idle; with Go's default GC
  (GOGC=100) its resident size followed the heap's peaks upward (+19 MiB/min). A soft
  `GOMEMLIMIT` (`StackSettings.objectstore_memory_limit`) makes the GC collect and give
  memory back before the limit instead.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from eventing.stack import binaries
from eventing.stack.health import http_probe, http_status
from eventing.stack.process import PartSpec
from eventing.stack.settings import StackSettings

NAME = "objectstore"
FILER_LOG_DIR = "/topics/.system/log"
VACUUM_INTERVAL_S = 300

log = logging.getLogger("sluice.objectstore")


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
        f"-master.vacuumIntervalSeconds={VACUUM_INTERVAL_S}",
    ]
    env = {
        **binaries.base_env(),
        "GOMEMLIMIT": str(settings.objectstore_memory_limit),
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


# --------------------------------------------------------------------------- filer log


def shell(settings: StackSettings, commands: list[str], timeout: float = 60.0) -> str:
    """Run `weed shell` commands against this stack's SeaweedFS; return their output.

    It runs in the part's folder, where `security.toml` is, and speaks gRPC to the
    master and filer (the filer's HTTP API would need a signed token per request).
    """
    p = settings.ports
    data_dir = settings.state_dir / "data" / NAME
    proc = subprocess.run(
        [binaries.weed(), "shell", f"-master={settings.host}:{p.weed_master}.{p.weed_master_grpc}",
         f"-filer={settings.host}:{p.weed_filer}.{p.weed_filer_grpc}"],
        input="\n".join(commands) + "\n", capture_output=True, text=True, timeout=timeout,
        cwd=data_dir, env=binaries.base_env())
    return proc.stdout + proc.stderr


def _listed(output: str) -> list[str]:
    """The full paths in `fs.ls -l` output (`-rw-r--r--  1 root root 123 /path`)."""
    return [line.split()[-1] for line in output.splitlines()
            if line[:1] in ("-", "d") and line.split()[-1].startswith("/")]


def log_file_minute(path: str) -> datetime | None:
    """The minute (UTC) a filer log file covers, from `<log dir>/<YYYY-MM-DD>/<HH-MM>.<id>`."""
    day, _, name = path.removeprefix(FILER_LOG_DIR + "/").partition("/")
    try:
        return datetime.strptime(f"{day} {name.split('.', 1)[0]}", "%Y-%m-%d %H-%M").replace(
            tzinfo=UTC)
    except ValueError:
        return None


def stale_log_files(paths: list[str], keep_s: float, now: float) -> list[str]:
    """The log files whose whole minute ended more than `keep_s` before `now`."""
    stale = []
    for path in paths:
        minute = log_file_minute(path)
        if minute is not None and minute.timestamp() + 60 < now - keep_s:
            stale.append(path)
    return stale


def purge_filer_log(settings: StackSettings, keep_s: float, now: float | None = None) -> int:
    """Delete the filer's metadata log files older than `keep_s`; return how many.

    Day folders left empty are removed too. The current minute's file (still appended
    to) is never older than `keep_s`, so the filer's own writes never race this.
    """
    now = time.time() if now is None else now
    days = [d for d in _listed(shell(settings, [f"fs.ls -l {FILER_LOG_DIR}"]))
            if d.rsplit("/", 1)[-1][:4].isdigit()]
    if not days:
        return 0
    files = _listed(shell(settings, [f"fs.ls -l {d}" for d in days]))
    stale = stale_log_files(files, keep_s, now)
    emptied = [d for d in days if not any(f.startswith(d + "/") and f not in stale
                                          for f in files)]
    gone = set(stale)
    commands = [f"fs.rm {f}" for f in stale if not any(f.startswith(d + "/") for d in emptied)]
    commands += [f"fs.rm -r {d}" for d in emptied]
    # Day folders whose every file is stale go at once; the rest file by file, in
    # batches (one shell per batch: starting `weed shell` costs ~0.2 s of CPU).
    for i in range(0, len(commands), 200):
        shell(settings, commands[i:i + 200])
    return len(gone)


# --------------------------------------------------------------------------- volumes


@dataclass(frozen=True)
class VolumeTotals:
    """The master's view of every volume together: bytes on disk and bytes deleted."""

    size: int
    deleted_bytes: int


_TOTALS = re.compile(r"^total size:(\d+)(?: .*deleted_bytes:(\d+))?", re.MULTILINE)


def parse_volume_totals(output: str) -> VolumeTotals | None:
    """The `total size:N ... deleted_bytes:M` line that ends `volume.list` output.

    SeaweedFS leaves `deleted_bytes` out while nothing was ever deleted.
    """
    m = _TOTALS.search(output)
    return VolumeTotals(int(m.group(1)), int(m.group(2) or 0)) if m else None


def volume_totals(settings: StackSettings) -> VolumeTotals | None:
    """What the master last heard from the volume server (heartbeats, seconds behind)."""
    return parse_volume_totals(shell(settings, ["volume.list"]))


def vacuum_volumes(settings: StackSettings, garbage_threshold: float,
                   timeout: float = 120.0) -> str:
    """Compact every volume whose deleted share is over `garbage_threshold`; wait for it.

    A manual `volume.vacuum`: the master runs it even while its automatic vacuum is
    switched off by `weed mini`'s maintenance worker (see the module's docstring). The
    shell takes the cluster's exclusive lock as the command requires, so two janitors
    (or an operator's shell) never compact the same volume at once.
    """
    return shell(settings, ["lock", f"volume.vacuum -garbageThreshold={garbage_threshold}",
                            "unlock"], timeout=timeout)


class ObjectStoreJanitor:
    """Every `every_s` seconds until `stop`: purge the filer log, then vacuum volumes.

    In that order, so the minutes purged in a round give their disk back in the same
    round. Failures are logged and retried at the next round: an object store that is
    down or restarting is the supervisor's business, not a reason to stop keeping it.
    """

    def __init__(self, settings: StackSettings, stop: threading.Event,
                 every_s: float | None = None) -> None:
        self.settings = settings
        self.keep_s = settings.filer_log_keep_s
        self.garbage_threshold = settings.objectstore_garbage_threshold
        self.every_s = every_s if every_s is not None else max(60.0, self.keep_s / 2)
        self.stop = stop
        self.purged = 0
        self.vacuums = 0
        self._thread = threading.Thread(target=self._loop, name="objectstore-janitor",
                                        daemon=True)

    def start(self) -> ObjectStoreJanitor:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self.stop.wait(self.every_s):
            self.round()

    def round(self) -> None:
        """One purge and one vacuum pass; each failure logged, neither stops the other."""
        try:
            n = purge_filer_log(self.settings, self.keep_s)
            self.purged += n
            if n:
                log.info("purged %d filer log files older than %.0fs", n, self.keep_s)
        except Exception:
            log.warning("purging the object store's filer log failed", exc_info=True)
        try:
            before = volume_totals(self.settings)
            vacuum_volumes(self.settings, self.garbage_threshold)
            self.vacuums += 1
            if before is not None:
                # The master's count lags the deletes by a heartbeat; the vacuum asks
                # the volume server itself, so this is a hint, not what was reclaimed.
                log.info("vacuumed volumes over %.0f%% garbage (the master counted %d of %d "
                         "bytes deleted)", self.garbage_threshold * 100, before.deleted_bytes,
                         before.size)
        except Exception:
            log.warning("vacuuming the object store's volumes failed", exc_info=True)
