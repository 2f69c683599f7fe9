"""The `trainer` command line: a thin dispatcher over `trainer.commands`."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from trainer import __version__

#: Sub-command modules, in the order `--help` lists them.
COMMAND_MODULES: tuple[str, ...] = ()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainer",
        description="Train seqsentinel's LSTM on historical sequences and export one ONNX model.",
    )
    parser.add_argument("--version", action="version", version=f"seqsentinel {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(f"trainer.commands.{module_name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    return int(args.handler(args))
