"""`trainer synth`: write a labeled synthetic data set and a ready training config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detector.commands.options import at_least

#: The data sets of `trainer.synth.GENERATORS`.
KINDS = ("sensors", "transactions")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write a labeled synthetic data set (train.csv, test.csv, train.toml)",
        description=(
            "Generate a seeded synthetic data set: 'sensors' (device readings with injected "
            "faults, for a forecast model) or 'transactions' (card payments with fraud "
            "episodes, for a classifier). The test part is later in time than the training part."
        ),
    )
    parser.add_argument("kind", choices=KINDS, help="which data set")
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--keys", type=at_least(1), help="devices or customers (default: 50/500)")
    parser.add_argument("--days", type=float, help="days of history (default: 14/60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Imported when the command runs, not when it is registered: see detector/commands/options.py.
    from trainer.synth import GENERATORS

    sizes = {name: value for name, value in (("keys", args.keys), ("days", args.days)) if value}
    try:
        dataset = GENERATORS[args.kind](seed=args.seed, **sizes)
    except ValueError as error:
        print(f"trainer synth: {error}", file=sys.stderr)
        return 2
    for path in dataset.write(args.out):
        print(path)
    for part, table in (("train", dataset.train), ("test", dataset.test)):
        print(f"{part}: {table.num_rows} events")
    return 0
