"""One retraining run: train a challenger on recent events, judge it and the model in service
(the champion) on the same most recent slice, and promote the challenger only if it is not worse.

Both models are scored by `trainer.evaluate`, i.e. by the detector's own streaming engine, on
one held-out file, so the comparison is the one a deployment would see. Everything a run used
(the training events, the held-out events, the challenger, metrics) is written to its report
folder, so that a decision can be checked and reproduced later.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from detector.contract.features import FeatureCodec, RecordError, parse_json_record
from detector.contract.manifest import Manifest
from detector.contract.model_file import file_sha256, load_model_file
from detector.files.readers import read_records
from detector.files.writers import write_json_lines
from trainer.config import TrainConfig
from trainer.data import _label as training_label
from trainer.evaluate import evaluate
from trainer.kafka_source import TopicMessage
from trainer.promotion import Promotion, promote

__all__ = [
    "BAD_INPUT",
    "FAILED",
    "KEPT",
    "METRICS",
    "PROMOTED",
    "Collected",
    "Holdout",
    "Outcome",
    "Request",
    "RetrainError",
    "collect_files",
    "join_labels",
    "records_of_messages",
    "report_markdown",
    "retrain",
]

#: Exit statuses, so that a scheduler can tell a kept champion from a failure.
PROMOTED, FAILED, BAD_INPUT, KEPT = 0, 1, 2, 3

#: Metrics a challenger can be judged on (higher is better), read from `trainer.evaluate`.
METRICS: dict[str, Callable[[Mapping[str, Any]], float]] = {
    "auprc": lambda m: m["auprc"],
    "auroc": lambda m: m["auroc"],
    "f1": lambda m: m["point"]["f1"],
    "precision": lambda m: m["point"]["precision"],
    "recall": lambda m: m["point"]["recall"],
    "range_f1": lambda m: m["ranges"]["f1"],
    "point_adjusted_f1": lambda m: m["point_adjusted"]["f1"],
}
#: The metric used when none is given: what the project's acceptance criteria use per task.
DEFAULT_METRICS = {"classify": "auprc", "forecast": "range_f1"}
#: Refuse to train when more than this share of the collected records is unusable.
DEFAULT_MAX_REJECTED = 0.05
#: Records larger than this are refused as nonsense (the detector has its own, smaller limit).
MAX_RECORD_BYTES = 16 * 1024 * 1024


class RetrainError(ValueError):
    """Arguments, configuration or data a run cannot use (exit status 2)."""


@dataclass(frozen=True)
class Holdout:
    """The most recent slice kept for judging: a share of the events, or a time span."""

    fraction: float | None = 0.2
    seconds: float | None = None

    def cutoff(self, times: np.ndarray) -> float:
        """The first held-out event time, for `times` sorted in ascending order."""
        if self.seconds is not None:
            return float(times[-1]) - self.seconds
        assert self.fraction is not None
        return float(times[min(int(len(times) * (1 - self.fraction)), len(times) - 1)])

    def describe(self) -> str:
        if self.seconds is not None:
            return f"the last {self.seconds:g} s"
        return f"the last {self.fraction:.0%} of the events"


@dataclass(frozen=True)
class Collected:
    """Records gathered for a run, those refused while reading, and where they came from."""

    records: list[dict]
    rejected: dict[str, int]
    source: dict[str, Any]


@dataclass(frozen=True)
class Request:
    """What one run is asked to do."""

    config: TrainConfig
    champion: Path
    promote_to: Path
    report_dir: Path
    metric: str | None = None
    margin: float = 0.0
    holdout: Holdout = field(default_factory=Holdout)
    max_rejected: float = DEFAULT_MAX_REJECTED
    epochs: int | None = None
    progress: bool = False

    @property
    def metric_name(self) -> str:
        return self.metric or DEFAULT_METRICS[self.config.model.task]


@dataclass(frozen=True)
class Outcome:
    promoted: bool
    report: dict[str, Any]

    @property
    def exit_status(self) -> int:
        return PROMOTED if self.promoted else KEPT


@dataclass(frozen=True)
class _Prepared:
    train_path: Path
    holdout_path: Path
    summary: dict[str, Any]


def collect_files(paths: Iterable[Path]) -> Collected:
    """The records of CSV, Parquet or JSON-lines files, in file order."""
    records: list[dict] = []
    rejected: dict[str, int] = {}
    names = []
    for path in paths:
        try:
            rows = read_records(path)
        except (OSError, ValueError, pa.ArrowException) as error:
            raise RetrainError(f"{path}: cannot read: {error}") from None
        for row in rows:
            record = row if isinstance(row, dict) else _parse(row, rejected)
            if record is not None:
                records.append(record)
        names.append(str(path))
    return Collected(records, rejected, {"files": names})


def records_of_messages(
    messages: Iterable[TopicMessage], key_column: str
) -> tuple[list[dict], dict[str, int]]:
    """The JSON records of Kafka messages, and how many were refused for which reason.

    A record without `key_column` takes the message key: the detector keys records by the
    message key unless told to use a field.
    """
    records: list[dict] = []
    rejected: dict[str, int] = {}
    for message in messages:
        record = _parse(message.value or b"", rejected)
        if record is None:
            continue
        if message.key is not None and key_column not in record:
            record[key_column] = message.key.decode(errors="replace")
        records.append(record)
    return records, rejected


def _parse(payload: bytes, rejected: dict[str, int]) -> dict | None:
    """One JSON record, or None with its refusal counted in `rejected`."""
    try:
        return parse_json_record(payload, MAX_RECORD_BYTES)
    except RecordError as error:
        rejected[error.reason] = rejected.get(error.reason, 0) + 1
        return None


def join_labels(
    records: list[dict], labels: Iterable[Mapping], id_column: str, label_column: str
) -> list[dict]:
    """`records` with `label_column` taken from the labels that share their `id_column`.

    Labels usually list the confirmed positives (fraud reports), so an event they do not
    mention is a negative; a later label of the same id overrides an earlier one.
    """
    known = {
        str(label[id_column]): label.get(label_column)
        for label in labels
        if label.get(id_column) is not None
    }
    return [record | {label_column: known.get(str(record.get(id_column)), 0)} for record in records]


def check_config(config: TrainConfig) -> TrainConfig:
    """The configuration a run trains with, or `RetrainError` for one it cannot use.

    The run writes its training events as JSON lines, so the format is chosen by suffix.
    """
    if config.data.label is None:
        raise RetrainError(
            "retraining judges models on labeled events: set data.label "
            "(or join labels with --labels and --label-id-column)"
        )
    if config.split.cutoffs is not None:
        raise RetrainError(
            "split.validation_from and split.test_from are fixed times, which a recurring run "
            "outgrows: split by fractions instead"
        )
    return config.model_copy(update={"data": config.data.model_copy(update={"format": "auto"})})


def retrain(request: Request, collected: Collected) -> Outcome:
    """Check the data, train the challenger, judge both models, promote or keep; the report.

    Raises `RetrainError` (bad data or configuration), `ModelContractError` (a champion the
    detector would refuse), and the trainer's own errors.
    """
    # Imported here: only the training step needs torch.
    from trainer.pipeline import train

    started = datetime.now(UTC)
    config = check_config(request.config)
    metric = request.metric_name
    champion = _champion(request.champion)
    folder = request.report_dir
    folder.mkdir(parents=True, exist_ok=True)
    window = max(config.model.window, champion.window if champion else 0)
    prepared = _prepare(request, config, collected, window)

    clock = time.perf_counter()
    challenger_path = folder / "challenger.onnx"
    train(
        config,
        [prepared.train_path],
        challenger_path,
        epochs=request.epochs,
        progress=request.progress,
    )
    train_seconds = time.perf_counter() - clock

    clock = time.perf_counter()
    label = config.data.label
    challenger = _judge(challenger_path, prepared.holdout_path, label, metric)
    if not math.isfinite(challenger["value"]):
        raise RetrainError(f"the challenger has no {metric} on the held-out events")
    judged = (
        None if champion is None else _judge(request.champion, prepared.holdout_path, label, metric)
    )
    evaluate_seconds = time.perf_counter() - clock

    promoted, reason = _decide(challenger["value"], judged, metric, request.margin)
    promotion: Promotion | None = None
    if promoted:
        promotion = promote(challenger_path, request.promote_to)
    report = {
        "decision": "promoted" if promoted else "kept",
        "exit_status": PROMOTED if promoted else KEPT,
        "reason": reason,
        "metric": metric,
        "margin": request.margin,
        "champion": judged,
        "challenger": challenger,
        "promoted_to": None if promotion is None else str(promotion.target),
        "previous": None
        if promotion is None or promotion.previous is None
        else str(promotion.previous),
        "data": prepared.summary | {"source": collected.source},
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "timings": {"train_seconds": train_seconds, "evaluate_seconds": evaluate_seconds},
    }
    return Outcome(promoted, report)


def _champion(path: Path) -> Manifest | None:
    """The champion's manifest; None when there is none yet (the first deployment)."""
    if not Path(path).exists():
        return None
    return load_model_file(path)[0]


def _prepare(request: Request, config: TrainConfig, collected: Collected, window: int) -> _Prepared:
    """Keep the usable records in time order, hold out the latest, write both parts."""
    codec = FeatureCodec(config.draft_manifest({}))
    label = config.data.label
    assert label is not None  # check_config
    rejected = dict(collected.rejected)
    records: list[dict] = []
    keys: list[str] = []
    times: list[float] = []
    labels: list[float] = []
    for record in collected.records:
        try:
            decoded = codec.decode(record)
            value = training_label(record.get(label), label)
        except RecordError as error:
            rejected[error.reason] = rejected.get(error.reason, 0) + 1
            continue
        records.append(record)
        keys.append(decoded.key)
        times.append(decoded.time)
        labels.append(value)
    refused = sum(rejected.values())
    total = len(records) + refused
    if not records:
        raise RetrainError(f"none of the {total} records collected is usable: {rejected}")
    if refused / total > request.max_rejected:
        raise RetrainError(
            f"{refused} of {total} records are unusable ({rejected}), more than the "
            f"{request.max_rejected:.1%} allowed (--max-rejected)"
        )
    order = np.argsort(np.asarray(times), kind="stable")
    sorted_times = np.asarray(times)[order]
    sorted_keys = np.asarray(keys, dtype=object)[order]
    sorted_labels = np.asarray(labels)[order]
    cutoff = request.holdout.cutoff(sorted_times)
    split = int(np.searchsorted(sorted_times, cutoff, side="left"))
    _check_parts(split, sorted_labels, config, request.holdout)

    folder = request.report_dir
    train_path = folder / "train.jsonl"
    holdout_path = folder / "holdout.jsonl"
    write_json_lines(train_path, (records[i] for i in order[:split]))
    # Each key's latest training events go first, unlabeled: the engine sees the history a
    # running detector would have, and only the held-out events count in the metrics.
    context = order[:split][_last_per_key(sorted_keys[:split], window)]
    unlabeled = ({k: v for k, v in records[i].items() if k != label} for i in context)
    write_json_lines(holdout_path, [*unlabeled, *(records[i] for i in order[split:])])
    summary = {
        "records": total,
        "rejected": rejected,
        "holdout": request.holdout.describe(),
        "cutoff": _iso(cutoff),
        "train_part": _part(sorted_times[:split], sorted_keys[:split], sorted_labels[:split]),
        "holdout_part": _part(sorted_times[split:], sorted_keys[split:], sorted_labels[split:]),
        "context_events": len(context),
        "files": {"train": train_path.name, "holdout": holdout_path.name},
    }
    return _Prepared(train_path, holdout_path, summary)


def _check_parts(split: int, labels: np.ndarray, config: TrainConfig, holdout: Holdout) -> None:
    if split == 0:
        raise RetrainError(f"holding out {holdout.describe()} leaves nothing to train on")
    if split == len(labels):
        raise RetrainError(f"{holdout.describe()} holds no events to judge the models on")
    held = labels[split:] > 0
    if held.all() or not held.any():
        raise RetrainError(
            f"the held-out events ({holdout.describe()}) need positive and negative labels "
            "for the models to be compared; hold out more"
        )
    if config.model.task == "classify" and not (labels[:split] > 0).any():
        raise RetrainError("the training events hold no positive label to learn from")


def _last_per_key(keys: np.ndarray, count: int) -> np.ndarray:
    """Indices, ascending, of the last `count` entries of each key (`keys` in time order)."""
    if not len(keys):
        return np.zeros(0, np.intp)
    order = np.lexsort((np.arange(len(keys)), keys.astype(str)))
    grouped = keys[order]
    boundary = grouped[1:] != grouped[:-1]
    group = np.r_[0, np.cumsum(boundary)]
    group_end = np.flatnonzero(np.r_[boundary, True])
    from_end = group_end[group] - np.arange(len(keys))
    return np.sort(order[from_end < count])


def _part(times: np.ndarray, keys: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    return {
        "events": len(times),
        "keys": len(set(keys.tolist())),
        "positives": int((labels > 0).sum()),
        "from": _iso(float(times[0])),
        "to": _iso(float(times[-1])),
    }


def _judge(model: Path, holdout: Path, label: str | None, metric: str) -> dict[str, Any]:
    """A model's metrics on the held-out events, scored by the detector's engine."""
    evaluation = evaluate(model, holdout, label=label)
    metrics = evaluation.metrics
    return {
        "path": str(model),
        "model_version": evaluation.manifest.model_version,
        "sha256": file_sha256(Path(model)),
        "value": float(METRICS[metric](metrics)),
        "metrics": metrics,
    }


def _decide(
    challenger: float, champion: dict[str, Any] | None, metric: str, margin: float
) -> tuple[bool, str]:
    """Promote unless the challenger is worse than the champion by more than `margin`."""
    if champion is None:
        return True, "no champion yet (first deployment): the challenger passed the data checks"
    value = champion["value"]
    if not math.isfinite(value):
        return True, f"the champion has no {metric} on the held-out events"
    if challenger >= value - margin:
        return True, f"challenger {metric} {challenger:.4f} >= champion {value:.4f} - {margin:g}"
    return False, f"challenger {metric} {challenger:.4f} < champion {value:.4f} - {margin:g}"


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def report_markdown(report: Mapping[str, Any]) -> str:
    """The report for people: decision first, then both models and the data."""
    data = report["data"]
    metric = report["metric"]
    lines = [
        f"# Retraining: {report['decision']}",
        "",
        f"{report['reason']}.",
        "",
        f"Judged on `{metric}` (margin {report['margin']:g}) over {data['holdout']}, "
        f"from {data['cutoff']}, scored by the detector's engine.",
        "",
        "| model | version | sha256 | " + metric + " | AUPRC | F1 | range F1 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for role in ("champion", "challenger"):
        judged = report[role]
        if judged is None:
            lines.append(f"| {role} | none | | | | | |")
            continue
        m = judged["metrics"]
        lines.append(
            f"| {role} | {judged['model_version']} | {judged['sha256'][:16]}… | "
            f"{_number(judged['value'])} | {_number(m['auprc'])} | "
            f"{_number(m['point']['f1'])} | {_number(m['ranges']['f1'])} |"
        )
    lines += [
        "",
        "| data | events | keys | positives | from | to |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for name in ("train_part", "holdout_part"):
        part = data[name]
        lines.append(
            f"| {name.replace('_', ' ')} | {part['events']} | {part['keys']} | "
            f"{part['positives']} | {part['from']} | {part['to']} |"
        )
    lines += [
        "",
        f"Records collected: {data['records']}, unusable: {data['rejected'] or 'none'}; "
        f"source: {data['source']}.",
    ]
    if report["promoted_to"]:
        kept = (
            f"; the model it replaced is kept as `{report['previous']}` "
            f"(`trainer rollback {report['promoted_to']}` restores it)"
            if report["previous"]
            else ""
        )
        lines.append(f"Promoted to `{report['promoted_to']}`{kept}.")
    files = data["files"]
    lines += [
        "",
        f"Reproduce: `trainer train --config CONFIG --data {files['train']} --out MODEL`, "
        f"then `trainer evaluate --model MODEL --data {files['holdout']} --out FOLDER`.",
    ]
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"
