"""`trainer inspect`: the detector's `inspect-model`, under the name trainer users look for.

One implementation serves both, so the trainer shows exactly what the detector will accept.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="verify a model file and print its manifest",
        description=(
            "Load the model file as the detector does (manifest, schema version, graph hash, "
            "inputs and outputs) and print the manifest. Exits 2 if the file would be refused."
        ),
    )
    parser.add_argument("model", type=Path, help="model file (.onnx)")
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Imported when the command runs, not when it is registered: see detector/commands/options.py.
    from detector.commands import inspect_model

    return inspect_model.run(args)
