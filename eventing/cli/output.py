"""How `sluice` prints data: one `-o/--output table|json|csv` for every data command.

Every command that prints rows goes through `emit`, so the three formats mean the same
everywhere: `table` is for people (rich tables on a terminal; plain aligned text with no
escape codes when stdout is a pipe or a file), `json` is one JSON array of objects, `csv`
has a header row. Values render as Trino's CLI renders them (`true`/`false`, `NULL` in
tables), not as Python's `True`/`None`. Messages for people go to stderr through `note`,
so stdout stays data a script can read.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any

FORMATS = ("table", "json", "csv")


def output_flag(parser: argparse.ArgumentParser, default: str = "table") -> None:
    """`-o/--output`, the same on every command that prints data."""
    parser.add_argument("-o", "--output", choices=FORMATS, default=default,
                        help=f"output format (default {default}): table for people, "
                             "json (an array of objects) or csv (with a header) for scripts")


def is_terminal(stream: IO[str] | None = None) -> bool:
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def cell(value: Any) -> str:
    """A value as text, rendered as Trino's CLI renders it."""
    if value is None:
        return "NULL"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str, ensure_ascii=False)
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    return str(value)


def _csv_cell(value: Any) -> str:
    return "" if value is None else cell(value)


def _json_value(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    return value


def render(columns: Sequence[str], rows: Iterable[Sequence[Any]], fmt: str, *,
           stream: IO[str] | None = None, numeric: Sequence[bool] | None = None,
           title: str | None = None) -> str:
    """`rows` as text in `fmt` (see the module docstring); a TTY `stream` gets a rich table."""
    rows = [list(r) for r in rows]
    if fmt == "json":
        return json.dumps([{c: _json_value(v) for c, v in zip(columns, r, strict=False)}
                           for r in rows], default=str, ensure_ascii=False, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[_csv_cell(v) for v in r] for r in rows])
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise ValueError(f"output format must be one of {', '.join(FORMATS)}")
    numeric = list(numeric or [])
    if is_terminal(stream):
        return _rich_table(columns, rows, numeric, title)
    return plain_table(columns, rows, numeric)


def plain_table(columns: Sequence[str], rows: Sequence[Sequence[Any]],
                numeric: Sequence[bool] = ()) -> str:
    """Aligned columns with a header rule, no escape codes: safe for pipes and files."""
    cells = [[cell(v) for v in r] for r in rows]
    widths = [len(c) for c in columns]
    for r in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=False)]

    def line(values: Sequence[str], header: bool = False) -> str:
        out = []
        for i, (v, w) in enumerate(zip(values, widths, strict=False)):
            right = not header and i < len(numeric) and numeric[i]
            out.append(v.rjust(w) if right else v.ljust(w))
        return "  ".join(out).rstrip()

    lines = [line(columns, header=True), "  ".join("-" * w for w in widths)]
    lines += [line(r) for r in cells]
    return "\n".join(lines)


def _rich_table(columns: Sequence[str], rows: Sequence[Sequence[Any]],
                numeric: Sequence[bool], title: str | None) -> str:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, title=title, show_edge=False, pad_edge=False)
    for i, name in enumerate(columns):
        right = i < len(numeric) and numeric[i]
        table.add_column(name, justify="right" if right else "left", overflow="fold")
    for r in rows:
        table.add_row(*[cell(v) for v in r])
    console = Console(file=io.StringIO(), force_terminal=True, width=_width())
    console.print(table)
    return console.file.getvalue().rstrip("\n")  # type: ignore[attr-defined]


def _width() -> int:
    import shutil

    return shutil.get_terminal_size((120, 24)).columns


def emit(columns: Sequence[str], rows: Iterable[Sequence[Any]], fmt: str, *,
         numeric: Sequence[bool] | None = None, title: str | None = None,
         footer: str | None = None) -> None:
    """Print `rows` to stdout in `fmt`; `footer` (e.g. a row count) goes to stderr."""
    print(render(columns, rows, fmt, stream=sys.stdout, numeric=numeric, title=title))
    if footer:
        note(footer)


def records(items: Sequence[Mapping[str, Any]], columns: Sequence[str], fmt: str) -> None:
    """`emit` for a list of dicts (json keeps every key; table and csv the `columns`)."""
    if fmt == "json":
        print(json.dumps(list(items), default=str, ensure_ascii=False, indent=2))
        return
    emit(columns, [[i.get(c) for c in columns] for i in items], fmt)


def note(message: str) -> None:
    """A message for the person at the terminal (stderr), never mixed into data."""
    print(message, file=sys.stderr)


class RichProgress:
    """A rich progress bar on a terminal's stderr, the same call as `publish.Progress`:
    `progress(done)` after each batch, `progress(done, final=True)` at the end."""

    def __init__(self, total: int, what: str = "events") -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                             console=Console(file=sys.stderr), transient=False)
        self._task = self._bar.add_task(what, total=total or None, rate="")
        self._started = time.monotonic()
        self._bar.start()

    def __call__(self, done: int, *, final: bool = False) -> None:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        self._bar.update(self._task, completed=done, rate=f"{done / elapsed:,.0f} ev/s")
        if final:
            self._bar.stop()


def progress(total: int, what: str = "events") -> Any:
    """A progress display for `total` items on stderr: rich on a terminal, else the
    plain one-line counter (`eventing.ingest.publish.Progress`)."""
    if is_terminal(sys.stderr):
        return RichProgress(total, what)
    from eventing.ingest.publish import Progress

    return Progress(total, sys.stderr)
