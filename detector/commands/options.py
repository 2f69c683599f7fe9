"""Options that several commands share, defined without importing what the commands run.

Every `detector` and `trainer` call registers every sub-command, `--help` and `--version`
included, so registering may import only the standard library and light modules: each
handler imports the heavy ones (onnxruntime, pyarrow, torch, Kafka) when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

#: The file formats `detector.files.readers.read_records` reads (its `FileFormat`), for `--format`.
FILE_FORMATS = ("csv", "jsonl", "parquet")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type`: an integer no smaller than `minimum`."""

    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return integer


def add_format_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--format", choices=FILE_FORMATS, help=help_text)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """`--threads`: the daemon's `model.intra_op_threads`, for the commands that score files."""
    parser.add_argument(
        "--threads",
        type=at_least(0),
        default=0,
        metavar="N",
        help="onnxruntime intra-op threads, as model.intra_op_threads in the daemon's "
        "configuration (default 0: onnxruntime chooses, one per physical core)",
    )
