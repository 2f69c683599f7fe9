"""`detector run`: the streaming daemon (Kafka in, alerts and dead letters out)."""

from __future__ import annotations

import argparse
import signal
from types import FrameType
from typing import Any

from detector.config import add_config_argument, load_settings_or_exit


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="consume events from Kafka, score them and publish alerts (the daemon)",
        description=(
            "Consume topics.input in the consumer group kafka.group_id, score each key's recent "
            "events with the model, publish alerts to topics.alerts and unreadable records to "
            "topics.dead_letters, and commit offsets once the broker acknowledged every output. "
            "Serves /healthz, /readyz and /metrics on http.host:http.port. SIGTERM or SIGINT: "
            "finish the batch in hand, commit, leave the group and exit 0 (1 when the shutdown "
            "budget ran out first, or when the daemon cannot start: model refused, topic "
            "missing). SIGHUP: reload the model file (it is also reloaded when it changes)."
        ),
    )
    add_config_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Imported when the command runs, not when it is registered: see detector/commands/options.py.
    from detector.ops.logs import configure_logging
    from detector.stream.daemon import Daemon

    settings = load_settings_or_exit(args.config)
    configure_logging(settings.log.format, settings.log.level)
    daemon = Daemon(settings)

    # Handlers only set flags (no logging: a handler may interrupt a write to the same stream).
    def stop(_: int, __: FrameType | None) -> None:
        daemon.request_stop()

    def reload(_: int, __: FrameType | None) -> None:
        daemon.request_reload()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    return daemon.run()
