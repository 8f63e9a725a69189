"""`sluice`: argument parsing and printing only; every command calls into the modules.

The commands are grouped by what they are for: operating the local stack (`ops`),
running one part of the pipeline in the foreground (`parts`, what `sluice up`
supervises) and working with the pipeline (`tools`). Every command goes through one
edge (`eventing.cli.edge`): it is where flags, `SLUICE_*` environment variables and the
settings dataclasses' defaults become typed settings, and where logging, signals and
the topology are set up, so no command repeats them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from eventing.cli import ops, parts, tools
from eventing.cli.edge import CommandFailed, Edge, HelpFormatter, location_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    location_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (ops, parts, tools):
        group.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(Edge(args))
    except CommandFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
