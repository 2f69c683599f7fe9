"""The `detector` command line: a thin dispatcher over `detector.commands`."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from detector import __version__

#: Sub-command modules of `detector.commands`, in the order `--help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "check_config",
    "replay",
    "inspect_model",
    "run",
    "produce",
    "tail_alerts",
)


def build_parser(
    prog: str, description: str, package: str, modules: Sequence[str]
) -> argparse.ArgumentParser:
    """A parser whose sub-commands are registered by the modules `package.<module>`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"seqsentinel {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in modules:
        importlib.import_module(f"{package}.{module_name}").register(subparsers)
    return parser


def dispatch(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse `argv` and run the chosen sub-command's handler; its result is the exit status."""
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    return int(args.handler(args))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(
        "detector",
        "Score per-key event streams with an LSTM and publish anomaly alerts.",
        "detector.commands",
        COMMAND_MODULES,
    )
    return dispatch(parser, argv)
