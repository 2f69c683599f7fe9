"""`trainer rollback`: put the model displaced by the last promotion back into service."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rollback",
        help="restore the previous model of a path that `trainer retrain` promoted to",
        description=(
            "Replace MODEL atomically with MODEL.previous, which `trainer retrain` keeps when "
            "it promotes; the model rolled back becomes MODEL.previous, so running this again "
            "undoes it. A running detector reloads the file within model.reload_interval_s. "
            "Exits 2 when there is no usable previous model."
        ),
    )
    parser.add_argument("model", type=Path, help="the model file in service (.onnx)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Imported when the command runs, not when it is registered: see detector/commands/options.py.
    from detector.contract.model_file import ModelContractError
    from trainer.promotion import PromotionError, rollback

    try:
        restored = rollback(args.model)
    except (PromotionError, ModelContractError) as error:
        print(f"trainer rollback: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"trainer rollback: {error}", file=sys.stderr)
        return 1
    print(f"restored model {restored.model_version} at {restored.target}")
    if restored.previous is not None:
        print(f"the model it replaced is kept as {restored.previous}")
    return 0
