"""`detector tail-alerts`: print the alerts of a topic as they arrive, one readable line each.

A look at what the daemon publishes (the demo uses it), outside any consumer group so that it
never moves a group's offsets.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import orjson

from detector.config import add_config_argument, load_settings_or_exit

#: Attributions shown per alert.
TOP_FEATURES = 3


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tail-alerts",
        help="print the alerts of a topic as they arrive, one line each",
        description=(
            "Follow an alerts topic (default: topics.alerts) and print one line per alert: "
            "event time, key, score against threshold, model version and the features that "
            "explain it. Reads outside any consumer group. Stops on SIGINT or SIGTERM, after "
            "--max alerts, or after --idle-timeout seconds without one."
        ),
    )
    parser.add_argument("--topic", help="alerts topic (default: topics.alerts)")
    parser.add_argument(
        "--bootstrap-servers", help="host:port[,host:port] (default: kafka.bootstrap_servers)"
    )
    parser.add_argument(
        "--from-beginning", action="store_true", help="print the alerts already in the topic too"
    )
    parser.add_argument("--max", type=int, help="stop after this many alerts")
    parser.add_argument("--idle-timeout", type=float, help="stop after this long without alerts")
    add_config_argument(parser)
    parser.set_defaults(handler=tail_alerts)


def tail_alerts(args: argparse.Namespace) -> int:
    # Imported when the command runs, not when it is registered: see detector/commands/options.py.
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    servers = {"bootstrap_servers": args.bootstrap_servers} if args.bootstrap_servers else {}
    settings = load_settings_or_exit(args.config, kafka=servers)
    topic = args.topic or settings.topics.alerts
    stopped = False

    def stop(_: int, __: FrameType | None) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        consumer = KafkaConsumer(enable_auto_commit=False, **settings.kafka.client_options())
    except KafkaError as error:
        print(f"detector tail-alerts: cannot connect: {error}", file=sys.stderr)
        return 1
    printed = 0
    try:
        while not stopped and not (partitions := consumer.partitions_for_topic(topic)):
            time.sleep(0.5)  # the daemon creates the topic when it starts
        assigned = [TopicPartition(topic, partition) for partition in sorted(partitions or ())]
        consumer.assign(assigned)
        if args.from_beginning:
            consumer.seek_to_beginning(*assigned)
        else:
            consumer.seek_to_end(*assigned)
        last = time.monotonic()
        while not stopped and (args.max is None or printed < args.max):
            for batch in consumer.poll(timeout_ms=200).values():
                for message in batch:
                    print(describe(orjson.loads(message.value)), flush=True)
                    printed += 1
                    last = time.monotonic()
            if args.idle_timeout is not None and time.monotonic() - last > args.idle_timeout:
                break
    finally:
        consumer.close()
    return 0


def describe(alert: dict[str, Any]) -> str:
    """`2024-01-01T10:00:00Z dev-7 score 12.4 >= 4.02 model ab12 temperature 0.91, ...`, with
    `since <onset>` after the key when a confirmed alert's scores rose earlier (alerts from
    before onsets existed have none)."""
    onset = alert.get("onset_time", alert["event_time"])
    since = f"since {_utc(onset)}  " if onset < alert["event_time"] else ""
    top = ", ".join(
        f"{item['feature']} {item['value']:.2f}" for item in alert["explanation"][:TOP_FEATURES]
    )
    return (
        f"{_utc(alert['event_time'])}  {alert['key']}  {since}score {alert['score']:.3g} >= "
        f"{alert['threshold']:.3g}  model {alert['model_version']}  "
        f"{alert['explanation_kind']}: {top}"
    )


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
