"""`trainer retrain`: train a challenger on recent events and promote it only if it is not worse.

Exit status: 0 the challenger was promoted, 3 the champion was kept (both successful runs),
2 bad arguments, configuration or data, 1 any other failure (Kafka, training, promotion).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.commands.evaluate import json_safe

if TYPE_CHECKING:
    from detector.config import KafkaSettings
    from trainer.config import TrainConfig
    from trainer.retrain import Collected, Holdout

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
LABELS_TOPIC = "topic:"
#: The names of `trainer.retrain.METRICS` and its `DEFAULT_MAX_REJECTED`.
METRIC_NAMES = ("auprc", "auroc", "f1", "point_adjusted_f1", "precision", "range_f1", "recall")
DEFAULT_MAX_REJECTED = 0.05


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "retrain",
        help="train a challenger on recent events; promote it only if it is not worse",
        description=(
            "Collect events from files or a bounded time range of a topic, hold out the most "
            "recent slice, train a challenger on the rest, score the challenger and the "
            "champion on the held-out slice with the detector's engine, and replace the model "
            "in service atomically (keeping the previous one) only if the challenger is not "
            "worse by more than --margin. Exit status: 0 promoted, 3 champion kept, 2 bad "
            "arguments, configuration or data, 1 other failure."
        ),
    )
    parser.add_argument("--config", type=Path, required=True, help="training TOML file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data",
        type=Path,
        nargs="+",
        action="extend",
        metavar="FILE",
        help="CSV, Parquet or JSON-lines files of events",
    )
    source.add_argument(
        "--from-kafka", metavar="TOPIC", help="read the events from this topic (no group joined)"
    )
    parser.add_argument(
        "--bootstrap-servers",
        help="Kafka brokers (default: SEQSENTINEL_KAFKA__BOOTSTRAP_SERVERS; the other "
        "SEQSENTINEL_KAFKA__* settings, security included, apply as for the detector)",
    )
    parser.add_argument(
        "--since",
        type=duration,
        metavar="DURATION",
        help="read messages from this long ago, e.g. 14d or 36h (default: all retained)",
    )
    parser.add_argument(
        "--labels",
        metavar="FILE|topic:NAME",
        help="labels joined to the events by --label-id-column (events not listed: negative)",
    )
    parser.add_argument("--label-id-column", metavar="COLUMN", help="event id shared with labels")
    parser.add_argument(
        "--champion", type=Path, required=True, help="the model in service (may not exist yet)"
    )
    parser.add_argument(
        "--promote-to", type=Path, required=True, help="where a winning challenger is put"
    )
    parser.add_argument(
        "--metric",
        choices=METRIC_NAMES,
        help="what the models are judged on (default: auprc to classify, range_f1 to forecast)",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="promote unless the challenger is worse than this by the metric (default: 0)",
    )
    parser.add_argument(
        "--holdout",
        type=holdout,
        metavar="FRACTION|DURATION",
        help="most recent slice held out for judging: a share of events or a span (default 0.2)",
    )
    parser.add_argument(
        "--max-rejected",
        type=float,
        default=DEFAULT_MAX_REJECTED,
        help=f"largest share of unusable records tolerated (default {DEFAULT_MAX_REJECTED})",
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="folder for the report, the data used and the challenger "
        "(default: retrain-reports/<UTC time> beside --promote-to)",
    )
    parser.add_argument("--epochs", type=int, help="override training.epochs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def duration(text: str) -> float:
    """Seconds from `90s`, `15m`, `36h`, `14d` or `2w`."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 36h or 14d")
    return float(match[1]) * UNITS[match[2]]


def holdout(text: str) -> Holdout:
    """A share of the events (0 < x < 1) or a duration."""
    from trainer.retrain import Holdout

    try:
        fraction = float(text)
    except ValueError:
        return Holdout(fraction=None, seconds=duration(text))
    if not 0 < fraction < 1:
        raise argparse.ArgumentTypeError("a holdout fraction must be between 0 and 1")
    return Holdout(fraction=fraction)


def run(args: argparse.Namespace) -> int:
    # Imported when the command runs, not when it is registered: see detector/commands/options.py.
    from kafka.errors import KafkaError

    from detector.config import ConfigError as SettingsError
    from detector.contract.model_file import ModelContractError
    from trainer.calibrate import CalibrationError
    from trainer.config import ConfigError, load_train_config
    from trainer.data import DataError
    from trainer.export import ExportError
    from trainer.kafka_source import SourceError
    from trainer.promotion import PromotionError
    from trainer.retrain import (
        BAD_INPUT,
        FAILED,
        Holdout,
        Request,
        RetrainError,
        report_markdown,
        retrain,
    )

    report_dir = args.report or _default_report_dir(args.promote_to)
    try:
        config = load_train_config(args.config)
        request = Request(
            config=config,
            champion=args.champion,
            promote_to=args.promote_to,
            report_dir=report_dir,
            metric=args.metric,
            margin=args.margin,
            holdout=args.holdout or Holdout(),
            max_rejected=args.max_rejected,
            epochs=args.epochs,
            progress=not args.no_progress,
        )
        outcome = retrain(request, _collect(args, config))
    except ModelContractError as error:
        print(f"trainer retrain: the champion is refused: {error}", file=sys.stderr)
        return BAD_INPUT
    except (RetrainError, ConfigError, SettingsError, DataError, CalibrationError) as error:
        print(f"trainer retrain: {error}", file=sys.stderr)
        return BAD_INPUT
    except (SourceError, KafkaError, ExportError, PromotionError, OSError) as error:
        print(f"trainer retrain: {type(error).__name__}: {error}", file=sys.stderr)
        return FAILED
    markdown = report_markdown(outcome.report)
    (report_dir / "report.json").write_text(
        json.dumps(json_safe(outcome.report), indent=2, default=str) + "\n"
    )
    (report_dir / "report.md").write_text(markdown)
    print(markdown)
    print(f"report: {report_dir}")
    return outcome.exit_status


def _default_report_dir(promote_to: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return promote_to.parent / "retrain-reports" / stamp


def _collect(args: argparse.Namespace, config: TrainConfig) -> Collected:
    """The events, from files or the topic, with the labels joined when they are separate."""
    from trainer.kafka_source import read_range
    from trainer.retrain import (
        Collected,
        RetrainError,
        collect_files,
        join_labels,
        records_of_messages,
    )

    since = None if args.since is None else time.time() - args.since
    if args.data:
        collected = collect_files(args.data)
    else:
        span, messages = read_range(_kafka(args), args.from_kafka, since)
        records, rejected = records_of_messages(messages, config.data.key)
        collected = Collected(records, rejected, {"kafka": span.to_dict()})
    if args.labels is None:
        return collected
    label = config.data.label
    if label is None or args.label_id_column is None:
        raise RetrainError("--labels needs --label-id-column and data.label (the labels' column)")
    if args.labels.startswith(LABELS_TOPIC):
        topic = args.labels.removeprefix(LABELS_TOPIC)
        _, messages = read_range(_kafka(args), topic, since)
        labels, _ = records_of_messages(messages, args.label_id_column)
    else:
        labels = collect_files([Path(args.labels)]).records
    records = join_labels(collected.records, labels, args.label_id_column, label)
    return Collected(records, collected.rejected, collected.source | {"labels": args.labels})


def _kafka(args: argparse.Namespace) -> KafkaSettings:
    """The detector's Kafka settings (environment), for this run's own client."""
    from detector.config import load_settings

    kafka = {"client_id": "seqsentinel-retrain"}
    if args.bootstrap_servers:
        kafka["bootstrap_servers"] = args.bootstrap_servers
    return load_settings(kafka=kafka).kafka
