"""The `trainer` command line: a thin dispatcher over `trainer.commands`."""

from __future__ import annotations

from collections.abc import Sequence

from detector.cli import build_parser, dispatch

#: Sub-command modules of `trainer.commands`, in the order `--help` lists them.
COMMAND_MODULES: tuple[str, ...] = ("synth", "train", "inspect", "evaluate", "retrain", "rollback")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(
        "trainer",
        "Train seqsentinel's LSTM on historical sequences and export one ONNX model.",
        "trainer.commands",
        COMMAND_MODULES,
    )
    return dispatch(parser, argv)
