"""Detection quality on NASA SMAP telemetry, scored per anomaly sequence as telemanom was.

    python bench/quality_smap.py [--channels P-1,S-1] [--quick] [--mode both] [--seeds 0,1,2]
                                 [--spacecraft SMAP|MSL] [--early 1000] [--json OUT]
                                 [--scores OUT.npz]

Each channel's train part trains a forecast model with the trainer (`bench/configs/smap.toml`:
one model per channel, or one shared by all channels); each channel's test part is replayed
through the detector's engine, whose alert episodes (thresholds as the manifest says,
`--cooldown` events to close), each from its alert's onset, are the predicted anomalous
sequences. A labeled sequence is caught when an episode overlaps it; an episode that
overlaps no label is one false positive. Point-wise F1 compares each scored event with its
label, without point adjustment. Published (telemanom, SMAP): precision and recall 85.5 %.
One run's figure depends on its training seed by a few points of F1; `--seeds` trains and
replays every model once per seed and reports each seed's totals and their mean, the fair
estimate.

The archive (`<data>/smap/smap.tar.gz`) holds `labeled_anomalies.csv` and the `train/` and
`test/` arrays under any top folder (`smap/` here, `SMAP/` or `data/` as published); with
`--spacecraft MSL` the same code scores the other spacecraft of the labels file, whose
channels carry 54 command columns instead of 24: the configurations' command features are
repeated to fit (published, MSL: precision 92.6 %, recall 69.4 %).

`--early N` (SMAP-early, issue 20's protocol: N = 1000) starts each channel's test stream N
events before its first labeled sequence, labels shifted with it, so that every fault
arrives early in a key's life, the new-device case; a channel whose first label starts
before N keeps its whole test part. Its test event files and models are named apart from
the full run's.

`--scores OUT.npz` dumps, for offline threshold studies, each channel's smoothed scores,
thresholds and labels of the test stream and of the training file (its validation part
marked), and the smoothing α, per seed, as `{seed}/{channel}/<array>`: the arrays are
listed in `bench/quality_report.py`'s docstring; P-2's labels are the union of its rows.
With `--mode both` the first mode's models are dumped.
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
    MOSTLY_IN_ALERT,
    REPO,
    cached,
    common_arguments,
    console,
    field_means,
    finite,
    input_key,
    judge,
    key_stream,
    require,
    run_jobs,
    score_dump,
    seeds_table,
    sequence_rates,
    table,
    training_arguments,
    write_json,
    write_scores,
)

from detector.engine.core import EngineOptions
from trainer.config import TrainConfig, load_train_config
from trainer.evaluate import Evaluation, evaluate
from trainer.metrics import (
    Counts,
    RangeCounts,
    precision_recall_curve,
    separable_ranges,
    summed,
)
from trainer.pipeline import train

CONFIG = REPO / "bench" / "configs" / "smap.toml"
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
    #: Rows of the test stream, which starts at row `start` of the channel's test part.
    sequences: list[tuple[int, int]]
    start: int = 0


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
    run()


def run(argv: list[str] | None = None) -> dict:
    """Train, replay and report as the command line `argv` says; the results document."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser, "smap")
    training_arguments(parser)
    parser.add_argument("--channels", help="comma-separated channel ids (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument(
        "--spacecraft",
        choices=sorted(PUBLISHED),
        default="SMAP",
        help="whose channels of labeled_anomalies.csv to score (default: SMAP)",
    )
    parser.add_argument("--mode", choices=["per_channel", "shared", "both"], default="both")
    parser.add_argument(
        "--early",
        type=int,
        help="start each channel's test stream this many events before its first labeled "
        "sequence (SMAP-early: 1000)",
    )
    parser.add_argument("--config", type=Path, default=CONFIG, help="training configuration")
    args = parser.parse_args(argv)

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
    if args.early is not None:
        labels = _early(labels, args.early)
    channels = sorted({label.channel for label in labels})
    events = folder / "events"
    options = EngineOptions(cooldown_events=args.cooldown)
    modes = ["per_channel", "shared"] if args.mode == "both" else [args.mode]

    title = args.spacecraft if args.early is None else f"{args.spacecraft}-early-{args.early}"
    document: dict = {
        "spacecraft": args.spacecraft,
        "published": PUBLISHED[args.spacecraft],
        "channels_evaluated": len(labels),
        "cooldown_events": args.cooldown,
        "early": args.early,
    }
    tasks = [
        Task(
            mode,
            args.config,
            group,
            root,
            events,
            labels,
            options,
            args.work,
            args.epochs,
            seed,
            args.early,
            args.scores is not None and mode == modes[0],
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
        _print(f"{title} {mode}", document[mode], document["published"])
        if len(args.seeds) > 1:
            seeds = {str(seed): s["total"] for seed, s in by_seed.items()}
            document[mode]["seeds"] = seeds
            document[mode]["seed_mean"] = field_means(list(seeds.values()))
            console.print(seeds_table(f"{title} {mode}", seeds, document[mode]["seed_mean"]))
    # The first mode run is the headline ("total", "channels"), as the schema asks.
    document["mode"] = modes[0]
    document["total"] = document[modes[0]]["total"]
    document["channels"] = document[modes[0]]["channels"]
    write_json(args.json, document)
    write_scores(args.scores, [o.dumps for group in outcomes.values() for o in group])
    if args.plots:
        _plot(args.plots, document, modes, curves, title)
    return document


def _early(labels: list[Label], before: int) -> list[Label]:
    """`labels` of test streams that start `before` events before each channel's first
    labeled sequence (at the test part's start when it is closer), shifted with them."""
    first: dict[str, int] = {}
    for label in labels:
        start = min(begin for begin, _ in label.sequences)
        first[label.channel] = min(start, first.get(label.channel, start))
    shifted = []
    for label in labels:
        start = max(0, first[label.channel] - before)
        sequences = [(begin - start, end - start) for begin, end in label.sequences]
        shifted.append(Label(label.name, label.channel, sequences, start))
    return shifted


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
        ours = [label for label in labels if label.channel == channel]
        if part == "test":
            values = values[ours[0].start :]
        anomaly = np.zeros(len(values), np.int8)
        if part == "test":
            for label in ours:
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
    root: Path, folder: Path, name: str, channels: list[str], labels: list[Label], test: str
) -> tuple[Path, Path]:
    """The train and test event files of `channels`, written once per extracted archive;
    `test` names the test stream (`test`, or `test-early-N` for SMAP-early's)."""
    folder.mkdir(parents=True, exist_ok=True)

    def part_file(part: str, stream: str) -> Path:
        def write(path: Path) -> None:
            pq.write_table(_event_table(root, part, channels, labels), path)

        return cached(folder / f"{name}-{stream}.parquet", write)

    return part_file("train", "train"), part_file("test", test)


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
    #: SMAP-early's events before each channel's first label (None: the whole test part).
    early: int | None
    #: Replay the training file too, for the arrays of `--scores`.
    dump: bool


@dataclass(frozen=True)
class Outcome:
    results: list[ChannelResult]
    scores: np.ndarray  # scored test events
    truth: np.ndarray
    train_seconds: float
    score_seconds: float
    #: The `--scores` arrays of the task's channels (empty unless the task dumps).
    dumps: dict[str, np.ndarray]


def _train_and_replay(task: Task) -> Outcome:
    group = task.group
    name = group[0] if task.mode == "per_channel" else _shared_name(group)
    test = "test" if task.early is None else f"test-early-{task.early}"
    train_path, test_path = _write(task.root, task.events, name, group, task.labels, test)
    run = task.mode if task.early is None else f"{task.mode}-early-{task.early}"
    run = run if task.seed is None else f"{run}-seed-{task.seed}"
    commands = [c for c in pq.read_schema(train_path).names if c.startswith("cmd_")]
    config = _shaped(load_train_config(task.config), commands)
    if task.seed is not None:
        config = config.model_copy(
            update={"training": config.training.model_copy(update={"seed": task.seed})}
        )
    # The model depends on the training file and configuration alone: the test streams of
    # SMAP, SMAP-early and SMAP-new are scored by the same one, trained once.
    trained = f"{task.mode}-{_digest(config.model_dump_json(), str(task.epochs))}"
    model = task.work / "models" / trained / name / "model.onnx"
    console.print(f"[bold]{run}[/] {name}: training")
    clock = time.perf_counter()
    cached(
        model.parent,
        lambda folder: train(
            config, [train_path], folder / model.name, epochs=task.epochs, progress=False
        ),
    )
    train_seconds = time.perf_counter() - clock
    evaluation = evaluate(model, test_path, options=task.options)
    cooldown = task.options.cooldown_events
    scored = evaluation.scored
    dumps = {}
    if task.dump:
        training = evaluate(model, train_path, options=task.options)
        dumps = score_dump(config.training.seed, group, evaluation, training, config)
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
        dumps,
    )


def _shared_name(group: list[str]) -> str:
    """The shared model's name: its channels', so that two sets never share event files."""
    return f"shared-{len(group)}-{_digest(*group)}"


def _digest(*parts: str) -> str:
    return hashlib.sha256(",".join(parts).encode()).hexdigest()[:8]


def _channel_result(evaluation: Evaluation, label: Label, cooldown: int) -> ChannelResult:
    """Sequence and point counts of one label row of a channel from its replayed events."""
    stream = key_stream(evaluation, label.channel)
    truth = np.zeros(stream.scores.size, bool)
    for start, end in label.sequences:
        truth[start : end + 1] = True
    judged = judge(evaluation, stream, truth, cooldown)
    adaptive = evaluation.manifest.scoring.adaptive
    separable = separable_ranges(
        truth, stream.scores, adaptive.history if adaptive else truth.size, cooldown
    )
    return ChannelResult(
        label.name,
        judged.ranges,
        judged.points,
        judged.alerts,
        judged.normal_in_episode,
        int(separable.sum()),
    )


def _summary(outcomes: list[Outcome]) -> dict:
    results = [result for outcome in outcomes for result in outcome.results]
    ranges = summed(RangeCounts, (r.ranges for r in results))
    separable = sum(r.separable for r in results)
    return {
        "total": {
            **sequence_rates(ranges, summed(Counts, (r.points for r in results))),
            #: A channel in alert for most of its normal events "catches" every label.
            "channels_mostly_in_alert": sum(r.normal_in_episode > MOSTLY_IN_ALERT for r in results),
            "separable_sequences": separable,
            #: The F1 of catching every separable sequence and raising no false alert: what
            #: thresholding alone can reach with these models' scores.
            "separable_f1_bound": 2 * separable / (ranges.labeled + separable)
            if ranges.labeled
            else 0.0,
        },
        "channels": {
            r.name: {
                **sequence_rates(r.ranges, r.points),
                "precision": finite(r.ranges.precision) if r.ranges.predicted else None,
                "alerts": r.alerts,
                "normal_in_episode": r.normal_in_episode,
                "separable_sequences": r.separable,
            }
            for r in results
        },
        "train_seconds": sum(outcome.train_seconds for outcome in outcomes),
        "score_seconds": sum(outcome.score_seconds for outcome in outcomes),
    }


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
