"""`sluice`: build, run and watch event pipelines of CloudEvents functions on Kafka.

The commands are grouped by what they are for: operating the local stack (`ops`),
developing functions (`develop`: new, invoke, tail, dead letters, replay, schemas),
working with the pipeline (`tools`) and the internal parts `sluice up` supervises
(`parts`, hidden from the command list). Every command goes through one edge
(`eventing.cli.edge`): it is where flags, `SLUICE_*` environment variables and the
settings dataclasses' defaults become typed settings, and where logging, signals and
the topology are set up, so no command repeats them. Data is printed through
`eventing.cli.output` (`-o table|json|csv` everywhere).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from eventing.cli import develop, ops, parts, tools
from eventing.cli.edge import CommandFailed, Edge, HelpFormatter, location_flags

DESCRIPTION = ("Sluice: publish CloudEvents, run functions on Kafka with Knative's\n"
               "delivery rules, and query the results with Trino SQL.")

# (title, module): the order `sluice --help` lists them in.
GROUPS = (
    ("Develop functions", develop),
    ("Work with events and tables", tools),
    ("Run the local stack", ops),
    ("Internal parts (`sluice up` starts them; run one by hand to debug it)", parts),
)

EXIT_CODES = """exit codes:
  0    success
  1    the operation failed: a part refused or did not answer (gateway, broker,
       registry, query engine), a schema is incompatible, a stack part failed
  2    bad usage or input: a flag, a missing file, a line of a file, SQL that does not parse
  3    `sluice status`: a part is not healthy (or there is no stack in the state folder)
  130  interrupted (Ctrl-C)
  141  stdout was closed early (`sluice ... | head`): stops quietly"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sluice")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description=DESCRIPTION,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"sluice {_version()}")
    location_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help=argparse.SUPPRESS)
    listing = []
    for title, group in GROUPS:
        before = set(sub.choices)
        group.add_commands(sub)
        names = [n for n in sub.choices if n not in before]
        lines = [f"  {n:<13} {getattr(sub.choices[n], 'summary', '')}" for n in names]
        if group is parts:
            lines = ["  " + ", ".join(names)]
        listing.append(f"{title}:\n" + "\n".join(lines))
    parser.epilog = ("`sluice COMMAND --help` shows a command's flags and an example.\n\n"
                     + "\n\n".join(listing) + "\n\n" + EXIT_CODES)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(Edge(args))
        sys.stdout.flush()
        return code
    except CommandFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): say nothing, and keep Python from printing a
        # second BrokenPipeError while it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
