"""Table maintenance while a sink writes: compaction, snapshot expiry, orphan deletion.

A streaming sink makes one small file per partition per micro-batch, one manifest and one
snapshot per commit. Left alone, scans slow down (30 one-second commits took a GROUP BY
from 7 to 79 ms here) and the object store only ever grows. pyiceberg 0.12 has neither
compaction nor file deletion, so this module does both with the primitives it has:

- **compact**: per partition with at least `min_files` small files, read exactly those
  files, write their rows as one file, and commit one OVERWRITE snapshot that deletes
  exactly those files and adds the new one. The commit asserts that the snapshot it was
  built on is still the branch head (optimistic concurrency). If an append landed
  meanwhile, the catalog refuses (CommitFailedException) and the same rewrite is rebuilt
  on the new head: an append only adds files, so the rewrite is still exact there (no
  appended row is dropped, no row is written twice). If a file to delete is gone
  (another compaction won), pyiceberg raises ValidationException and the new file is
  deleted. Summary properties starting with `sluice.` (the sink's Kafka offsets) are
  copied from the head each attempt, so the head always carries them.
- **expire_snapshots**: drop snapshots older than `max_snapshot_age_s` except the last
  `keep_snapshots` (Iceberg's own `expireOlderThan` + `retainLast` rule). This deletes
  no file: metadata only. It also bounds every commit's cost: a table's metadata.json
  lists every snapshot (~1 KB each with the sink's offsets) and the catalog writes a new
  one per commit, so 15 minutes of one-second commits made each commit write ~1 MB.
- **metadata files** (`TABLE_PROPERTIES`): the catalog keeps the last
  `write.metadata.previous-versions-max` metadata.json files in the metadata log and,
  with `write.metadata.delete-after-commit.enabled`, deletes older ones at commit
  (SeaweedFS's catalog honours both, measured: 15 commits left 6 files with a maximum of
  5). Without them it kept 100, and every older one waited for orphan deletion.
- **delete_orphans**: list the table location in S3 and delete every data/metadata file
  no remaining snapshot (nor the metadata log) references, if it is older than
  `orphan_age_s`. The margin protects files a writer has uploaded but not committed
  yet, and readers still planning on a just-expired snapshot.

Why `commit.retry.num-retries=0` (`prepare_table`): pyiceberg's own retry rebases a
commit onto the new head but keeps the summary properties computed for the old one, so
the head could carry stale offsets. Every writer here retries itself, re-reading the head.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem
    from pyiceberg.manifest import DataFile
    from pyiceberg.table import Table

log = logging.getLogger("sluice.lake.maintenance")

CARRIED_PREFIX = "sluice."
NO_PYICEBERG_RETRIES = {"commit.retry.num-retries": "0"}
# What every sink table carries (set at creation, and on open for older tables).
TABLE_PROPERTIES = {
    **NO_PYICEBERG_RETRIES,
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "10",
}
# Reports kept in memory per table (one per run: a day at the 5-minute cadence).
KEEP_REPORTS = 300


@dataclass(frozen=True)
class MaintenancePolicy:
    """When maintenance runs and what it keeps. Defaults suit a sink committing every 1-5 s.

    Why these ages: snapshots are kept for readers planning a query (milliseconds to
    seconds) and for the offsets (which the head carries anyway), not for time travel; a
    longer age makes every commit write a bigger metadata.json (see the module doc).
    The orphan age must exceed the longest time between a writer uploading a file and
    committing it (a commit retried through conflicts: seconds; through an outage the
    sink writes its files again after the outage) and a reader's planning time.
    """

    every_commits: int = 50           # run after this many sink commits ...
    every_s: float = 300.0            # ... or this many seconds, whichever comes first
    min_files: int = 8                # compact a partition once it has this many small files
    small_file_bytes: int = 64 << 20  # files at least this big are left alone
    max_rewrite_bytes: int = 512 << 20  # input read per compaction run, at most
    keep_snapshots: int = 20          # always keep the newest N snapshots
    max_snapshot_age_s: float = 120.0  # and every snapshot younger than this
    orphan_age_s: float = 600.0       # delete unreferenced files only when older than this
    commit_attempts: int = 8


@dataclass
class MaintenanceReport:
    data_files_before: int = 0
    data_files_after: int = 0
    partitions_compacted: int = 0
    rows_rewritten: int = 0
    commit_conflicts: int = 0
    snapshots_expired: int = 0
    orphans_deleted: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def prepare_table(table: Table) -> None:
    """Give a table `TABLE_PROPERTIES`: pyiceberg raises on a commit conflict instead of
    rebasing, and the catalog deletes old metadata files (see module doc). A table made
    before a property was added gets it here, at the sink's next start."""
    missing = {k: v for k, v in TABLE_PROPERTIES.items() if table.properties.get(k) != v}
    if missing:
        with table.transaction() as tx:
            tx.set_properties(missing)


def data_file_count(table: Table) -> int:
    """Live data files in the head snapshot."""
    snapshot = table.current_snapshot()
    if snapshot is None:
        return 0
    return int(snapshot.summary["total-data-files"] or 0)


def carried_properties(table: Table) -> dict[str, str]:
    """The head snapshot's `sluice.*` summary properties, to copy into a rewrite."""
    snapshot = table.current_snapshot()
    if snapshot is None or snapshot.summary is None:
        return {}
    return {k: v for k, v in snapshot.summary.additional_properties.items()
            if k.startswith(CARRIED_PREFIX)}


def _small_file_groups(table: Table, policy: MaintenancePolicy) -> list[list[Any]]:
    """Scan tasks grouped by (spec, partition), only groups worth compacting."""
    groups: dict[tuple, list[Any]] = defaultdict(list)
    for task in table.scan().plan_files():
        f = task.file
        if task.delete_files or f.file_size_in_bytes >= policy.small_file_bytes:
            continue  # delete files would need merging on read: not ours to rewrite
        groups[(f.spec_id, tuple(f.partition))].append(task)
    return [tasks for tasks in groups.values() if len(tasks) >= policy.min_files]


def _rewrite(table: Table, tasks: list[Any]) -> tuple[list[DataFile], int]:
    """Read `tasks` and write their rows as new files (not committed yet)."""
    from pyiceberg.expressions import AlwaysTrue
    from pyiceberg.io.pyarrow import ArrowScan, _dataframe_to_data_files

    rows = ArrowScan(table.metadata, table.io, table.schema(), AlwaysTrue()).to_table(tasks)
    files = list(_dataframe_to_data_files(table.metadata, rows, table.io, uuid.uuid4()))
    return files, rows.num_rows


def _delete_quietly(table: Table, files: list[DataFile]) -> None:
    for f in files:
        try:
            table.io.delete(f.file_path)
        except Exception:  # an orphan now; delete_orphans will find it
            log.warning("could not delete uncommitted file %s", f.file_path, exc_info=True)


def _commit_rewrite(table: Table, tasks: list[Any], new_files: list[DataFile],
                    attempts: int, report: MaintenanceReport,
                    lock: AbstractContextManager[Any]) -> bool:
    """Commit "delete these files, add those" (True), rebasing on appends that raced it.

    An append that lands between planning and commit only adds files, so the rewrite
    stays correct on the new head: reload, take the head's `sluice.*` properties, commit
    the same files again. If one of our old files is gone from the head (another
    compaction got there first), pyiceberg raises ValidationException: give up (False).

    The reload happens inside `lock`, right before the commit is built: with the sink's
    lock, no sink append can land between the reload and the commit, so the first attempt
    commits however often the sink appends. Reloading outside the lock let an append slip
    into that gap before every attempt when the sink appends back to back (it is behind
    on its topic), and the compaction lost all `attempts` races. Without a lock (a writer
    in another process) the gap is only as wide as building the commit; conflicts retry.
    """
    from pyiceberg.exceptions import CommitFailedException, ValidationException

    for attempt in range(attempts):
        try:
            with lock:
                table.refresh()
                tx = table.transaction()
                with tx.update_snapshot(
                        snapshot_properties=carried_properties(table)).overwrite() as ow:
                    for task in tasks:
                        ow.delete_data_file(task.file)
                    for f in new_files:
                        ow.append_data_file(f)
                tx.commit_transaction()
            return True
        except CommitFailedException:
            report.commit_conflicts += 1  # not applied: rebase on the new head and retry
            time.sleep(min(1.0, 0.02 * 2 ** attempt))
        except ValidationException:
            table.refresh()
            return False
    return False


def compact(table: Table, policy: MaintenancePolicy, report: MaintenanceReport | None = None,
            *, lock: AbstractContextManager[Any] | None = None) -> MaintenanceReport:
    """Rewrite each partition's small files as one file; all partitions in one commit.

    One commit, because each commit rewrites every manifest that lists a replaced file
    (with fast appends, each sink commit's manifest spans the partitions it touched).
    `lock`, when given, is held around reloading the head and committing: the sink passes
    the lock it holds around its own commits, so its appends cannot starve the rewrite.
    """
    report = report or MaintenanceReport()
    table.refresh()
    tasks: list[Any] = []
    new_files: list[DataFile] = []
    rows = 0
    for group in _small_file_groups(table, policy):
        files, n = _rewrite(table, group)
        tasks += group
        new_files += files
        rows += n
        if sum(t.file.file_size_in_bytes for t in tasks) >= policy.max_rewrite_bytes:
            break  # bounded memory and commit time; the rest waits for the next run
    if not tasks:
        return report
    if _commit_rewrite(table, tasks, new_files, policy.commit_attempts, report,
                       lock or nullcontext()):
        report.partitions_compacted += len({(t.file.spec_id, tuple(t.file.partition))
                                            for t in tasks})
        report.rows_rewritten += rows
    else:
        _delete_quietly(table, new_files)  # never committed: unreferenced
    return report


def expire_snapshots(table: Table, keep_last: int, max_age_s: float) -> int:
    """Expire snapshots older than `max_age_s` beyond the newest `keep_last`; return count."""
    table.refresh()
    cutoff_ms = (time.time() - max_age_s) * 1000
    newest = sorted(table.metadata.snapshots, key=lambda s: s.timestamp_ms, reverse=True)
    heads = {ref.snapshot_id for ref in table.metadata.refs.values()}
    expired = [s.snapshot_id for s in newest[keep_last:]
               if s.timestamp_ms < cutoff_ms and s.snapshot_id not in heads]
    if expired:
        table.maintenance.expire_snapshots().by_ids(expired).commit()
    return len(expired)


def referenced_files(table: Table) -> set[str]:
    """Every file a remaining snapshot or the metadata log points at (full s3:// paths)."""
    md = table.metadata
    refs: set[str] = {table.metadata_location}
    refs.update(entry.metadata_file for entry in md.metadata_log)
    refs.update(s.statistics_path for s in md.statistics)
    refs.update(s.statistics_path for s in md.partition_statistics)
    seen_manifests: set[str] = set()
    for snapshot in md.snapshots:
        refs.add(snapshot.manifest_list)
        for manifest in snapshot.manifests(table.io):
            refs.add(manifest.manifest_path)
            if manifest.manifest_path in seen_manifests:
                continue
            seen_manifests.add(manifest.manifest_path)
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
                refs.add(entry.data_file.file_path)
    return refs


def delete_orphans(table: Table, fs: FileSystem, older_than_s: float,
                   now: float | None = None) -> int:
    """Delete files under the table's data/ and metadata/ that nothing references."""
    from pyarrow.fs import FileSelector, FileType

    table.refresh()
    refs = referenced_files(table)
    location = table.location().rstrip("/")
    scheme, _, root = location.partition("://")
    cutoff = (now if now is not None else time.time()) - older_than_s
    deleted = 0
    for sub in ("data", "metadata"):
        try:
            infos = fs.get_file_info(FileSelector(f"{root}/{sub}", recursive=True,
                                                  allow_not_found=True))
        except FileNotFoundError:
            continue
        for info in infos:
            if info.type != FileType.File or f"{scheme}://{info.path}" in refs:
                continue
            if info.mtime is None or info.mtime.timestamp() > cutoff:
                continue
            fs.delete_file(info.path)
            deleted += 1
    return deleted


def run_maintenance(table: Table, fs: FileSystem | None, policy: MaintenancePolicy,
                    *, lock: AbstractContextManager[Any] | None = None) -> MaintenanceReport:
    """Compact, expire, then delete orphans (when `fs` is given). Errors are reported."""
    start = time.monotonic()
    report = MaintenanceReport()
    table.refresh()
    report.data_files_before = data_file_count(table)
    def expire() -> None:
        report.snapshots_expired = expire_snapshots(
            table, policy.keep_snapshots, policy.max_snapshot_age_s)

    def orphans() -> None:
        if fs is not None:
            report.orphans_deleted = delete_orphans(table, fs, policy.orphan_age_s)

    for name, step in (("compact", lambda: compact(table, policy, report, lock=lock)),
                       ("expire", expire), ("orphans", orphans)):
        try:
            step()
        except Exception as exc:  # one failing step must not stop the others or the sink
            log.warning("maintenance step %s failed", name, exc_info=True)
            report.errors.append(f"{name}: {exc!r}")
    table.refresh()
    report.data_files_after = data_file_count(table)
    report.seconds = time.monotonic() - start
    return report


class MaintenanceThread:
    """Runs `run_maintenance` in the background every K commits or T seconds.

    Why a thread: a compaction of a busy partition can take seconds and must not stall
    the sink's consume loop. It uses its own `Table` object (its own metadata), so the
    only shared state is the catalog, where commits are atomic.
    """

    def __init__(self, load_table: Callable[[], Table], fs: FileSystem | None,
                 policy: MaintenancePolicy,
                 on_report: Callable[[MaintenanceReport], None] | None = None,
                 commit_lock: AbstractContextManager[Any] | None = None) -> None:
        self._load_table = load_table
        self._commit_lock = commit_lock
        self._fs = fs
        self.policy = policy
        self._on_report = on_report
        self._commits = 0
        self._last_run = time.monotonic()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="lake-maintenance", daemon=True)
        self.reports: deque[MaintenanceReport] = deque(maxlen=KEEP_REPORTS)

    def start(self) -> None:
        self._thread.start()

    def notify_commit(self) -> None:
        with self._lock:
            self._commits += 1
            due = (self._commits >= self.policy.every_commits
                   or time.monotonic() - self._last_run >= self.policy.every_s)
        if due:
            self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        table = None
        while not self._stop.is_set():
            self._wake.wait(self.policy.every_s)
            if self._stop.is_set():
                return
            self._wake.clear()
            with self._lock:
                self._commits = 0
                self._last_run = time.monotonic()
            try:
                table = table or self._load_table()
                report = run_maintenance(table, self._fs, self.policy,
                                         lock=self._commit_lock)
            except Exception:
                log.warning("maintenance run failed", exc_info=True)
                table = None
                continue
            self.reports.append(report)
            log.info("maintenance: files %d -> %d, %d partitions compacted, %d snapshots "
                     "expired, %d orphans deleted, %d conflicts, %.2fs",
                     report.data_files_before, report.data_files_after,
                     report.partitions_compacted, report.snapshots_expired,
                     report.orphans_deleted, report.commit_conflicts, report.seconds)
            if self._on_report:
                self._on_report(report)
