"""A part's log file: bounded by size-based rotation, and read back across rotations.

Every part writes its output to `logs/<part>.log` for as long as the stack runs. The
supervisor (and every start of a part) rotates a log that grew past
`LogRotation.max_bytes` to `<part>.log.1`, shifting older ones up to `.<keep>` and
dropping the oldest, so a part's logs never exceed (keep + 1) x max_bytes.

Why copy-and-truncate rather than rename: a part writes straight into the file through
a descriptor it inherited at start (Tansu, SeaweedFS and Prometheus cannot be told to
reopen their log), so a renamed file would keep growing under its new name. The
descriptor is opened with O_APPEND (`ProcessDir.start`), so after the truncate the
part's next write lands at the new end of the file, with no hole. Bytes the part writes
between the last copy and the truncate are lost: the copy is repeated until it has
caught up, so that window is one empty read long (microseconds), not a whole copy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from eventing.stack.settings import LogRotation

CHUNK = 1 << 20


def rotated(path: Path, n: int) -> Path:
    """The `n`-th older file of the log at `path` (`gateway.log.1` is the newest)."""
    return path.with_name(f"{path.name}.{n}")


def files(path: Path) -> list[Path]:
    """The log's files that exist, oldest first, the live file last."""
    older = []
    n = 1
    while rotated(path, n).exists():
        older.append(rotated(path, n))
        n += 1
    return [*reversed(older), *([path] if path.exists() else [])]


def rotate_if_needed(path: Path, rotation: LogRotation) -> bool:
    """Rotate the log at `path` when it is over `rotation.max_bytes`; whether it did."""
    try:
        if path.stat().st_size <= rotation.max_bytes:
            return False
    except OSError:
        return False
    rotate(path, rotation.keep)
    return True


def rotate(path: Path, keep: int) -> None:
    """Shift `.1`...`.keep-1` up by one (dropping `.keep`), copy the live file to `.1`
    and truncate it (see the module docstring for why copy-and-truncate)."""
    for n in range(keep, 0, -1):
        older = rotated(path, n)
        if n == keep:
            older.unlink(missing_ok=True)
        elif older.exists():
            os.replace(older, rotated(path, n + 1))
    if keep < 1:
        os.truncate(path, 0)
        return
    tmp = path.with_name(path.name + ".rotating")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(CHUNK):
            dst.write(chunk)
        # Caught up: what the part wrote during the copy is in `tmp` too. Truncate at once.
        while chunk := src.read(CHUNK):
            dst.write(chunk)
        os.truncate(path, 0)
    os.replace(tmp, rotated(path, 1))


def last_lines(path: Path, n: int) -> list[bytes]:
    """The last `n` lines of the log across its rotated files (0: every line), oldest
    first. Reads backwards from the end, so a long log costs what `n` lines cost."""
    chunks: list[bytes] = []
    newlines = 0
    for file in reversed(files(path)):
        for block in _blocks_backwards(file):
            chunks.append(block)
            newlines += block.count(b"\n")
            if n and newlines > n:
                break
        else:
            continue
        break
    lines = b"".join(reversed(chunks)).splitlines(keepends=True)
    return lines[-n:] if n else lines


def _blocks_backwards(path: Path, size: int = 65536) -> Iterator[bytes]:
    try:
        with open(path, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            while end > 0:
                start = max(0, end - size)
                fh.seek(start)
                yield fh.read(end - start)
                end = start
    except OSError:
        return


class Follower:
    """Yields what is appended to a log, across rotations (`sluice logs -f`).

    A rotation shows as a new `.1` (each is a fresh file moved into place) or as a live
    file smaller than the position read so far (no `.1` kept). The rest of what was
    being read is then in `.1`, the live file's copy, so that is read from the same
    position first, then the live file from its start. (A size check alone misses a
    rotation followed by a write longer than what had been read.)
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rotated_id = _file_id(rotated(path, 1))
        self.waits = 0
        try:
            self.pos = path.stat().st_size
        except OSError:
            self.pos = 0

    def read(self) -> bytes:
        try:
            size = self.path.stat().st_size
        except OSError:
            return b""
        out = b""
        rotated_id = _file_id(rotated(self.path, 1))
        if rotated_id is None and (self.rotated_id is not None or size < self.pos):
            # Mid-rotation (`.1` moved up, its successor not in place yet), or no `.1`
            # kept at all: wait a few reads for it, then start the live file over.
            self.waits += 1
            if self.waits < 5:
                return b""
        self.waits = 0
        if rotated_id != self.rotated_id or size < self.pos:
            self.rotated_id = rotated_id
            if rotated_id is not None:
                out += _read_from(rotated(self.path, 1), self.pos)
            self.pos = 0
        data = _read_from(self.path, self.pos)
        self.pos += len(data)
        return out + data


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _read_from(path: Path, pos: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(pos)
            return fh.read()
    except OSError:
        return b""
