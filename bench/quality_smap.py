"""Detection quality on NASA SMAP telemetry, scored per anomaly sequence as telemanom was.

    python bench/quality_smap.py [--channels P-1,S-1] [--quick] [--mode both] [--seeds 0,1,2]
                                 [--json OUT]

Each channel's train part trains a forecast model with the trainer (`bench/configs/smap.toml`,
one model per channel; `smap_shared.toml`, one model for all channels with per-channel
thresholds); each channel's test part is replayed through the detector's engine, whose alert
episodes (thresholds as the manifest says, `--cooldown` events to close), each from its
alert's onset, are the predicted anomalous sequences. A labeled sequence is caught when an
episode overlaps it; an episode that overlaps no label is one false positive. Point-wise F1
compares each scored event with its label, without point adjustment. Published (telemanom,
SMAP): precision and recall 85.5 %. One run's figure depends on its training seed by a
few points of F1; `--seeds` trains and replays every model once per seed and reports each
seed's totals and their mean, the fair estimate.
"""

from __future__ import annotations

import argparse
import ast
import csv
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from quality_report import REPO, common_arguments, console, finite, require, table, write_json

from detector.engine import EngineOptions, Status
from trainer.config import load_train_config
from trainer.evaluate import Evaluation, evaluate
from trainer.metrics import (
    Counts,
    RangeCounts,
    episode_flags,
    point_counts,
    precision_recall_curve,
    range_counts,
    runs,
    separable_ranges,
)
from trainer.pipeline import train

CONFIGS = {
    "per_channel": REPO / "bench" / "configs" / "smap.toml",
    "shared": REPO / "bench" / "configs" / "smap_shared.toml",
}
COMMANDS = [f"cmd_{i}" for i in range(1, 25)]
#: Channels of `--quick`: a spread of point and contextual anomalies.
QUICK = ("P-1", "S-1", "E-1", "E-2", "A-1", "D-1", "T-1", "G-1")
PUBLISHED = {"precision": 0.855, "recall": 0.855, "f1": 0.855}


@dataclass(frozen=True)
class Label:
    """One row of labeled_anomalies.csv (P-2 has two rows; each counts, as in telemanom)."""

    name: str
    channel: str
    sequences: list[tuple[int, int]]


@dataclass(frozen=True)
class ChannelResult:
    name: str
    ranges: RangeCounts
    points: Counts
    alerts: int
    #: Share of the channel's normal test events inside an alert episode.
    normal_in_episode: float
    #: Labeled sequences whose peak smoothed score (within the cooldown after them) exceeds
    #: every score of the `history` events before them (`trainer.metrics.separable_ranges`).
    separable: int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser, "smap")
    parser.add_argument("--channels", help="comma-separated channel ids (default: all 55)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--mode", choices=["per_channel", "shared", "both"], default="both")
    parser.add_argument("--cooldown", type=int, default=100, help="engine cooldown_events")
    parser.add_argument("--epochs", type=int, help="override the configured epochs")
    parser.add_argument(
        "--seeds",
        type=_seed_list,
        default=[None],
        help="comma-separated training seeds, each a full run; the first is the headline "
        "(default: the configuration's)",
    )
    for mode, path in CONFIGS.items():
        parser.add_argument(
            f"--{mode.replace('_', '-')}-config",
            type=Path,
            default=path,
            help=f"training configuration of the {mode.replace('_', ' ')} model(s)",
        )
    parser.add_argument(
        "--jobs", type=int, default=1, help="models trained at once (one torch thread each)"
    )
    args = parser.parse_args()

    root = _extract(require(args.data / "smap" / "smap.tar.gz", "SMAP archive"), args.work)
    labels = _labels(root / "labeled_anomalies.csv")
    wanted = args.channels.split(",") if args.channels else QUICK if args.quick else None
    if wanted is not None:
        labels = [label for label in labels if label.channel in wanted]
        if not labels:
            raise SystemExit(f"no labeled channel among {wanted}")
    channels = sorted({label.channel for label in labels})
    events = args.work / "events"
    options = EngineOptions(cooldown_events=args.cooldown)
    modes = ["per_channel", "shared"] if args.mode == "both" else [args.mode]

    document: dict = {
        "published": PUBLISHED,
        "channels_evaluated": len(labels),
        "cooldown_events": args.cooldown,
    }
    tasks = [
        Task(
            mode,
            getattr(args, f"{mode}_config"),
            group,
            root,
            events,
            labels,
            options,
            args.work,
            args.epochs,
            seed,
        )
        for mode in modes
        for seed in args.seeds
        for group in ([channels] if mode == "shared" else [[c] for c in channels])
    ]
    outcomes: dict[tuple[str, int | None], list[Outcome]] = {}
    for task, outcome in zip(tasks, _run(tasks, args.jobs), strict=True):
        outcomes.setdefault((task.mode, task.seed), []).append(outcome)
    curves = {}
    for mode in modes:
        by_seed = {seed: _summary(outcomes[mode, seed]) for seed in args.seeds}
        headline = outcomes[mode, args.seeds[0]]
        document[mode] = by_seed[args.seeds[0]]
        truth = np.concatenate([outcome.truth for outcome in headline])
        curves[mode] = precision_recall_curve(truth, np.concatenate([o.scores for o in headline]))
        _print(mode, document[mode])
        if len(args.seeds) > 1:
            document[mode]["seeds"] = {str(seed): s["total"] for seed, s in by_seed.items()}
            document[mode]["seed_mean"] = _seed_mean(list(document[mode]["seeds"].values()))
            _print_seeds(mode, document[mode])
    # The first mode run is the headline ("total", "channels"), as the schema asks.
    document["mode"] = modes[0]
    document["total"] = document[modes[0]]["total"]
    document["channels"] = document[modes[0]]["channels"]
    write_json(args.json, document)
    if args.plots:
        _plot(args.plots, document, modes, curves)


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if len(set(seeds)) < len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is repeated: {text!r}")
    return seeds


def _extract(archive: Path, work: Path) -> Path:
    root = work / "smap"
    if not (root / "labeled_anomalies.csv").exists():
        work.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
    return root


def _labels(path: Path) -> list[Label]:
    seen: dict[str, int] = {}
    labels = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["spacecraft"] != "SMAP":
                continue
            channel = row["chan_id"]
            seen[channel] = seen.get(channel, 0) + 1
            name = channel if seen[channel] == 1 else f"{channel}#{seen[channel]}"
            sequences = [(int(a), int(b)) for a, b in ast.literal_eval(row["anomaly_sequences"])]
            labels.append(Label(name, channel, sequences))
    return labels


def _event_table(root: Path, part: str, channels: list[str], labels: list[Label]) -> pa.Table:
    """The events of `part` (train or test) of `channels`, one row per telemetry row."""
    tables = []
    for channel in channels:
        values = np.load(root / part / f"{channel}.npy")
        anomaly = np.zeros(len(values), np.int8)
        if part == "test":
            for label in labels:
                if label.channel == channel:
                    for start, end in label.sequences:
                        anomaly[start : end + 1] = 1
        columns = {
            "chan": pa.array([channel] * len(values)),
            "t": pa.array(np.arange(len(values), dtype=np.float64)),
            "value": pa.array(values[:, 0]),
            **{name: pa.array(values[:, i + 1]) for i, name in enumerate(COMMANDS)},
            "anomaly": pa.array(anomaly),
        }
        tables.append(pa.table(columns))
    return pa.concat_tables(tables)


def _write(root: Path, folder: Path, name: str, channels: list[str], labels: list[Label]):
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part in ("train", "test"):
        path = folder / f"{name}-{part}.parquet"
        if not path.exists():
            pq.write_table(_event_table(root, part, channels, labels), path)
        paths[part] = path
    return paths["train"], paths["test"]


@dataclass(frozen=True)
class Task:
    """One model to train and replay: a channel's own, or the shared one of all channels."""

    mode: str
    config: Path
    group: list[str]
    root: Path
    events: Path
    labels: list[Label]
    options: EngineOptions
    work: Path
    epochs: int | None
    #: Overrides the configured training seed (None: the configuration's).
    seed: int | None


@dataclass(frozen=True)
class Outcome:
    results: list[ChannelResult]
    scores: np.ndarray  # scored test events
    truth: np.ndarray
    train_seconds: float
    score_seconds: float


def _run(tasks: list[Task], jobs: int) -> list[Outcome]:
    """Each task's outcome, in order; `jobs` > 1 runs them in worker processes."""
    if jobs <= 1:
        return [_train_and_replay(task) for task in tasks]
    with ProcessPoolExecutor(jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(pool.map(_train_and_replay, tasks))


def _train_and_replay(task: Task) -> Outcome:
    group = task.group
    name = group[0] if task.mode == "per_channel" else f"shared-{len(group)}"
    train_path, test_path = _write(task.root, task.events, name, group, task.labels)
    run = task.mode if task.seed is None else f"{task.mode}-seed-{task.seed}"
    model = task.work / "models" / run / name / "model.onnx"
    console.print(f"[bold]{run}[/] {name}: training")
    config = load_train_config(task.config)
    if task.seed is not None:
        config = config.model_copy(
            update={"training": config.training.model_copy(update={"seed": task.seed})}
        )
    clock = time.perf_counter()
    train(
        config,
        [train_path],
        model,
        epochs=task.epochs,
        progress=False,
    )
    train_seconds = time.perf_counter() - clock
    evaluation = evaluate(model, test_path, options=task.options)
    cooldown = task.options.cooldown_events
    scored = evaluation.scored
    return Outcome(
        [
            _channel_result(evaluation, label, cooldown)
            for label in task.labels
            if label.channel in group
        ],
        evaluation.replay.scores[scored],
        evaluation.labels[scored] > 0,
        train_seconds,
        evaluation.replay.summary.seconds,
    )


def _channel_result(evaluation: Evaluation, label: Label, cooldown: int) -> ChannelResult:
    """Sequence and point counts of one channel from its replayed events (in row order)."""
    replay = evaluation.replay
    rows = np.flatnonzero(replay.keys == label.channel)
    rows = rows[np.argsort(replay.times[rows], kind="stable")]
    scored = replay.statuses[rows] == Status.SCORED
    above = scored & (replay.scores[rows] >= replay.thresholds[rows])
    confirm = evaluation.manifest.scoring.confirm
    episodes = episode_flags(above, None, cooldown, confirm)
    # Predicted sequences: each episode from its alert's onset (the first confirming score).
    predicted = episode_flags(above, None, cooldown, confirm, from_onset=True)
    truth = np.zeros(rows.size, bool)
    for start, end in label.sequences:
        truth[start : end + 1] = True
    onsets = sorted(alert.onset_time for alert in replay.alerts if alert.key == label.channel)
    expected = replay.times[rows][runs(episodes)[:, 0] - (confirm - 1)]
    adaptive = evaluation.manifest.scoring.adaptive
    separable = separable_ranges(
        truth, replay.scores[rows], adaptive.history if adaptive else rows.size, cooldown
    )
    if not np.array_equal(onsets, expected):
        console.print(
            f"[red]{label.name}: {len(onsets)} engine alerts, {len(expected)} episodes, "
            "or their onsets differ"
        )
    return ChannelResult(
        label.name,
        range_counts(truth, predicted),
        point_counts(truth[scored], above[scored]),
        len(onsets),
        float(predicted[~truth].mean()) if (~truth).any() else 0.0,
        int(separable.sum()),
    )


def _summary(outcomes: list[Outcome]) -> dict:
    results = [result for outcome in outcomes for result in outcome.results]
    ranges = RangeCounts(
        *(sum(getattr(r.ranges, f) for r in results) for f in RangeCounts.__dataclass_fields__)
    )
    points = Counts(
        *(sum(getattr(r.points, f) for r in results) for f in Counts.__dataclass_fields__)
    )
    separable = sum(r.separable for r in results)
    return {
        "total": {
            "precision": ranges.precision,
            "recall": ranges.recall,
            "f1": ranges.f1,
            "pointwise_f1": points.f1,
            "labeled_sequences": ranges.labeled,
            "detected_sequences": ranges.detected,
            "predicted_sequences": ranges.predicted,
            "false_positive_sequences": ranges.predicted - ranges.predicted_on_label,
            #: A channel in alert for most of its normal events "catches" every label.
            "channels_mostly_in_alert": sum(r.normal_in_episode > 0.5 for r in results),
            "separable_sequences": separable,
            #: The F1 of catching every separable sequence and raising no false alert: what
            #: thresholding alone can reach with these models' scores.
            "separable_f1_bound": 2 * separable / (ranges.labeled + separable)
            if ranges.labeled
            else 0.0,
        },
        "channels": {
            r.name: {
                "precision": finite(r.ranges.precision) if r.ranges.predicted else None,
                "recall": r.ranges.recall,
                "f1": r.ranges.f1,
                "pointwise_f1": r.points.f1,
                "labeled_sequences": r.ranges.labeled,
                "detected_sequences": r.ranges.detected,
                "false_positive_sequences": r.ranges.predicted - r.ranges.predicted_on_label,
                "alerts": r.alerts,
                "normal_in_episode": r.normal_in_episode,
                "separable_sequences": r.separable,
            }
            for r in results
        },
        "train_seconds": sum(outcome.train_seconds for outcome in outcomes),
        "score_seconds": sum(outcome.score_seconds for outcome in outcomes),
    }


#: Totals averaged over seeds (the sequence counts too, so that the mean of 56 and 57 reads 56.5).
SEED_MEAN_FIELDS = (
    "precision",
    "recall",
    "f1",
    "pointwise_f1",
    "detected_sequences",
    "false_positive_sequences",
)


def _seed_mean(totals: list[dict]) -> dict:
    return {field: float(np.mean([total[field] for total in totals])) for field in SEED_MEAN_FIELDS}


def _print(mode: str, summary: dict) -> None:
    rows = [
        (
            name,
            c["labeled_sequences"],
            c["detected_sequences"],
            c["false_positive_sequences"],
            c["precision"] if c["precision"] is not None else float("nan"),
            c["recall"],
            c["f1"],
            c["pointwise_f1"],
            c["normal_in_episode"],
            c["separable_sequences"],
        )
        for name, c in summary["channels"].items()
    ]
    console.print(
        table(
            f"SMAP {mode}: per channel",
            [
                "channel",
                "labeled",
                "caught",
                "FP",
                "precision",
                "recall",
                "F1",
                "point F1",
                "normal in alert",
                "separable",
            ],
            rows,
        )
    )
    total = summary["total"]
    console.print(
        f"separable sequences: {total['separable_sequences']} of {total['labeled_sequences']} "
        f"(F1 at most {total['separable_f1_bound']:.3f} by thresholding these scores)"
    )
    console.print(
        table(
            f"SMAP {mode}: total (train {summary['train_seconds']:.0f} s, "
            f"score {summary['score_seconds']:.0f} s)",
            ["", "precision", "recall", "F1", "point F1", "sequences", "caught", "FP", "in alert"],
            [
                (
                    "seqsentinel",
                    total["precision"],
                    total["recall"],
                    total["f1"],
                    total["pointwise_f1"],
                    total["labeled_sequences"],
                    total["detected_sequences"],
                    total["false_positive_sequences"],
                    total["channels_mostly_in_alert"],
                ),
                ("telemanom (published)", 0.855, 0.855, 0.855, "—", 69, "—", "—", "—"),
            ],
        )
    )


def _print_seeds(mode: str, summary: dict) -> None:
    rates, counts = SEED_MEAN_FIELDS[:4], SEED_MEAN_FIELDS[4:]

    def row(name: str, total: dict) -> tuple:
        return (
            name,
            *(float(total[field]) for field in rates),
            *(f"{round(total[field], 1):g}" for field in counts),
        )

    rows = [row(f"seed {seed}", total) for seed, total in summary["seeds"].items()]
    rows.append(row("mean", summary["seed_mean"]))
    console.print(
        table(
            f"SMAP {mode}: by training seed",
            ["", "precision", "recall", "F1", "point F1", "caught", "FP"],
            rows,
        )
    )


def _plot(folder: Path, document: dict, modes: list[str], curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    suffix = "_".join(modes)
    names = list(document[modes[0]]["channels"])
    figure, axis = plt.subplots(figsize=(14, 4))
    width = 0.8 / len(modes)
    for index, mode in enumerate(modes):
        f1 = [document[mode]["channels"][name]["f1"] for name in names]
        axis.bar(np.arange(len(names)) + index * width, f1, width, label=mode.replace("_", " "))
    axis.set_xticks(np.arange(len(names)) + width * (len(modes) - 1) / 2, names, rotation=90)
    axis.set_ylabel("sequence F1")
    axis.set_title("SMAP: sequence-level F1 per channel")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / f"smap_f1_per_channel_{suffix}.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5, 4))
    for mode in modes:
        precision, recall, _ = curves[mode]
        axis.plot(recall, precision, label=mode.replace("_", " "))
    axis.set_xlabel("recall (point-wise)")
    axis.set_ylabel("precision (point-wise)")
    axis.set_title("SMAP: point-wise precision-recall")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / f"smap_precision_recall_{suffix}.png", dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
