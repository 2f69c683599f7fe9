"""`detector check-config`: validate the configuration and print it, secrets masked."""

from __future__ import annotations

import argparse
import json
from typing import Any

from detector.config import add_config_argument, load_settings_or_exit


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check-config",
        help="validate the configuration and print it as JSON, secrets masked",
        description=(
            "Merge the defaults, the --config TOML file and the SEQSENTINEL_* environment "
            "variables (nested with '__', e.g. SEQSENTINEL_KAFKA__BOOTSTRAP_SERVERS), validate "
            "the result and print it as JSON on stdout with every secret masked. Exits 0 when "
            "the configuration is usable, 2 with the offending fields on stderr when it is not."
        ),
    )
    add_config_argument(parser)
    parser.set_defaults(handler=check_config)


def check_config(args: argparse.Namespace) -> int:
    settings = load_settings_or_exit(args.config)
    print(json.dumps(settings.masked(), indent=2))
    return 0
