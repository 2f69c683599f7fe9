"""`detector inspect-model`: what a model file holds and how this machine would run it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect-model",
        help="show a model's manifest and the execution providers that would run it",
        description="Verify a model file and show its manifest.",
    )
    parser.add_argument("model", type=Path, help="model file (.onnx)")
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from detector.commands.manifest_tables import features, overview
    from detector.commands.output import stdout_console
    from detector.contract.model_file import ModelContractError, load_model_file
    from detector.engine.scorer import resolve_providers

    try:
        manifest, _ = load_model_file(args.model)
    except ModelContractError as error:
        Console(stderr=True).print(f"[red]refused model:[/red] {error}")
        return 2
    providers = resolve_providers()
    if args.json:
        document = {
            "model_version": manifest.model_version,
            "providers": providers,
            "manifest": json.loads(manifest.to_json()),
        }
        print(json.dumps(document, indent=2))
        return 0
    console = stdout_console()
    console.print(overview(manifest, providers))
    console.print(features(manifest))
    return 0
