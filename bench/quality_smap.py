"""Detection quality on NASA SMAP telemetry, scored per anomaly sequence as telemanom was.

    python bench/quality_smap.py [--channels P-1,S-1] [--quick] [--mode both] [--seeds 0,1,2]
                                 [--spacecraft SMAP|MSL] [--json OUT]

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

The archive (`<data>/smap/smap.tar.gz`) holds `labeled_anomalies.csv` and the `train/` and
`test/` arrays under any top folder (`smap/` here, `SMAP/` or `data/` as published); with
`--spacecraft MSL` the same code scores the other spacecraft of the labels file, whose
channels carry 54 command columns instead of 24: the configurations' command features are
repeated to fit (published, MSL: precision 92.6 %, recall 69.4 %).
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from quality_report import (
    REPO,
    cached,
    common_arguments,
    console,
    finite,
    input_key,
    require,
    run_jobs,
    table,
    write_json,
)

from detector.engine import EngineOptions, Status
from trainer.config import TrainConfig, load_train_config
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
#: Channels of `--quick` (SMAP's): a spread of point and contextual anomalies.
QUICK = ("P-1", "S-1", "E-1", "E-2", "A-1", "D-1", "T-1", "G-1")
#: Telemanom's published results per spacecraft, with the labeled sequences they are over.
PUBLISHED = {
    "SMAP": {"precision": 0.855, "recall": 0.855, "f1": 0.855, "sequences": 69},
    "MSL": {"precision": 0.926, "recall": 0.694, "f1": 0.793, "sequences": 36},
}


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
    parser.add_argument("--channels", help="comma-separated channel ids (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument(
        "--spacecraft",
        choices=sorted(PUBLISHED),
        default="SMAP",
        help="whose channels of labeled_anomalies.csv to score (default: SMAP)",
    )
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

    folder = _extract(require(args.data / "smap" / "smap.tar.gz", "SMAP archive"), args.work)
    labels_path, root = _layout(folder)
    labels = _labels(labels_path, args.spacecraft)
    if not labels:
        raise SystemExit(f"no {args.spacecraft} channel in {labels_path.name}")
    wanted = args.channels.split(",") if args.channels else QUICK if args.quick else None
    if wanted is not None:
        labels = [label for label in labels if label.channel in wanted]
        if not labels:
            raise SystemExit(f"no labeled channel among {wanted}")
    channels = sorted({label.channel for label in labels})
    events = folder / "events"
    options = EngineOptions(cooldown_events=args.cooldown)
    modes = ["per_channel", "shared"] if args.mode == "both" else [args.mode]

    document: dict = {
        "spacecraft": args.spacecraft,
        "published": PUBLISHED[args.spacecraft],
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
    for task, outcome in zip(tasks, run_jobs(_train_and_replay, tasks, args.jobs), strict=True):
        outcomes.setdefault((task.mode, task.seed), []).append(outcome)
    curves = {}
    for mode in modes:
        by_seed = {seed: _summary(outcomes[mode, seed]) for seed in args.seeds}
        headline = outcomes[mode, args.seeds[0]]
        document[mode] = by_seed[args.seeds[0]]
        truth = np.concatenate([outcome.truth for outcome in headline])
        curves[mode] = precision_recall_curve(truth, np.concatenate([o.scores for o in headline]))
        _print(f"{args.spacecraft} {mode}", document[mode], document["published"])
        if len(args.seeds) > 1:
            document[mode]["seeds"] = {str(seed): s["total"] for seed, s in by_seed.items()}
            document[mode]["seed_mean"] = _seed_mean(list(document[mode]["seeds"].values()))
            _print_seeds(f"{args.spacecraft} {mode}", document[mode])
    # The first mode run is the headline ("total", "channels"), as the schema asks.
    document["mode"] = modes[0]
    document["total"] = document[modes[0]]["total"]
    document["channels"] = document[modes[0]]["channels"]
    write_json(args.json, document)
    if args.plots:
        _plot(args.plots, document, modes, curves, args.spacecraft)


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
    """The folder `archive` is extracted into, named by the archive (`input_key`)."""
    work.mkdir(parents=True, exist_ok=True)

    def extract(folder: Path) -> None:
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")

    return cached(work / f"archive-{input_key(archive)}", extract)


def _layout(folder: Path) -> tuple[Path, Path]:
    """labeled_anomalies.csv and the folder of `train/` and `test/`, whatever the archive's
    top folder is called."""
    labels = sorted(folder.rglob("labeled_anomalies.csv"))
    data = sorted(path.parent for path in folder.rglob("train") if (path.parent / "test").is_dir())
    if len(labels) != 1 or len(data) != 1:
        raise SystemExit(
            "the archive must hold one labeled_anomalies.csv and one folder with train/ and "
            f"test/; it holds {len(labels)} and {len(data)}"
        )
    return labels[0], data[0]


def _labels(path: Path, spacecraft: str) -> list[Label]:
    seen: dict[str, int] = {}
    labels = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["spacecraft"] != spacecraft:
                continue
            channel = row["chan_id"]
            seen[channel] = seen.get(channel, 0) + 1
            name = channel if seen[channel] == 1 else f"{channel}#{seen[channel]}"
            sequences = [(int(a), int(b)) for a, b in ast.literal_eval(row["anomaly_sequences"])]
            labels.append(Label(name, channel, sequences))
    return labels


def _commands(values: np.ndarray) -> list[str]:
    """Names of the command columns of a channel's array: every column after the value."""
    return [f"cmd_{i}" for i in range(1, values.shape[1])]


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
            **{name: pa.array(values[:, i + 1]) for i, name in enumerate(_commands(values))},
            "anomaly": pa.array(anomaly),
        }
        tables.append(pa.table(columns))
    return pa.concat_tables(tables)


def _write(
    root: Path, folder: Path, name: str, channels: list[str], labels: list[Label]
) -> tuple[Path, Path]:
    """The train and test event files of `channels`, written once per extracted archive."""
    folder.mkdir(parents=True, exist_ok=True)

    def part_file(part: str) -> Path:
        def write(path: Path) -> None:
            pq.write_table(_event_table(root, part, channels, labels), path)

        return cached(folder / f"{name}-{part}.parquet", write)

    return part_file("train"), part_file("test")


def _shaped(config: TrainConfig, commands: list[str]) -> TrainConfig:
    """`config` with one command feature per command column of the data, each as the
    configuration's first: SMAP's channels have 24, MSL's 54."""
    features = config.data.features
    if [f.name for f in features if f.name.startswith("cmd_")] == commands:
        return config
    template = next(f for f in features if f.name.startswith("cmd_"))
    kept = [f for f in features if not f.name.startswith("cmd_")]
    shaped = kept + [template.model_copy(update={"name": name}) for name in commands]
    data = config.data.model_copy(update={"features": shaped})
    return config.model_copy(update={"data": data})


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


def _train_and_replay(task: Task) -> Outcome:
    group = task.group
    name = group[0] if task.mode == "per_channel" else _shared_name(group)
    train_path, test_path = _write(task.root, task.events, name, group, task.labels)
    run = task.mode if task.seed is None else f"{task.mode}-seed-{task.seed}"
    model = task.work / "models" / run / name / "model.onnx"
    console.print(f"[bold]{run}[/] {name}: training")
    commands = [c for c in pq.read_schema(train_path).names if c.startswith("cmd_")]
    config = _shaped(load_train_config(task.config), commands)
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


def _shared_name(group: list[str]) -> str:
    """The shared model's name: its channels', so that two sets never share event files."""
    return f"shared-{len(group)}-{hashlib.sha256(','.join(group).encode()).hexdigest()[:8]}"


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


def _print(title: str, summary: dict, published: dict) -> None:
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
            f"{title}: per channel",
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
            f"{title}: total (train {summary['train_seconds']:.0f} s, "
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
                (
                    "telemanom (published)",
                    published["precision"],
                    published["recall"],
                    published["f1"],
                    "—",
                    published["sequences"],
                    "—",
                    "—",
                    "—",
                ),
            ],
        )
    )


def _print_seeds(title: str, summary: dict) -> None:
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
            f"{title}: by training seed",
            ["", "precision", "recall", "F1", "point F1", "caught", "FP"],
            rows,
        )
    )


def _plot(folder: Path, document: dict, modes: list[str], curves: dict, spacecraft: str) -> None:
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
    axis.set_title(f"{spacecraft}: sequence-level F1 per channel")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / f"{spacecraft.lower()}_f1_per_channel_{suffix}.png", dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5, 4))
    for mode in modes:
        precision, recall, _ = curves[mode]
        axis.plot(recall, precision, label=mode.replace("_", " "))
    axis.set_xlabel("recall (point-wise)")
    axis.set_ylabel("precision (point-wise)")
    axis.set_title(f"{spacecraft}: point-wise precision-recall")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / f"{spacecraft.lower()}_precision_recall_{suffix}.png", dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
