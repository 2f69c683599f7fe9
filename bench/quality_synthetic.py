"""Detection quality on the 15 synthetic series (three base shapes × five anomaly kinds),
scored per labeled range as SMAP is, and per point, reported per kind and per base shape.

    python bench/quality_synthetic.py [--series horizontal_dip,seasonal_spike] [--seeds 0,1,2]
                                      [--mode per_series|shared] [--jobs 2] [--json OUT]
                                      [--plots DIR] [--scores OUT.npz]

Each series is one key. Its first 30 % is the training file (the trainer's split takes its
validation from it) and the remaining 70 % the test stream, replayed through the detector's
engine (`trainer.evaluate.evaluate`); one model per series (`--mode shared`: one for all).
`bench/configs/synthetic.toml` holds only the data's shape: everything else is the trainer's
defaults, the one recipe. A labeled range is caught when an alert episode (from its
alert's onset, `--cooldown` events to close) overlaps it; an episode that overlaps no
label is one false positive. Point-wise figures compare each scored event's alerting with
its label. Label runs differ by kind (a `trend` anomaly is labeled point by point, a `dip`
over long stretches), so each kind is reported apart: its series' counts pooled. The mean
is over the five kinds, each weighing alike; `--seeds` averages it over training seeds.

`--scores OUT.npz` dumps, for offline threshold studies, each series' smoothed scores,
thresholds and labels of the test stream and of the training file (its validation part
marked), and the smoothing α, per seed, as `{seed}/{series}/<array>`: the arrays are
listed in `bench/quality_report.py`'s docstring.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.parquet as pq
from quality_report import (
    MOSTLY_IN_ALERT,
    REPO,
    cached,
    common_arguments,
    console,
    field_means,
    input_key,
    judge,
    key_stream,
    rates_table,
    require,
    run_jobs,
    score_dump,
    seeds_table,
    sequence_rates,
    training_arguments,
    write_json,
    write_scores,
)

from detector.engine.core import EngineOptions
from trainer.config import load_train_config
from trainer.evaluate import evaluate
from trainer.metrics import Counts, RangeCounts, summed
from trainer.pipeline import train

CONFIG = REPO / "bench" / "configs" / "synthetic.toml"
KINDS = ("dip", "level", "shock", "spike", "trend")
#: Share of each series, from its start, that the model learns from.
TRAIN_SHARE = 0.3


@dataclass(frozen=True)
class Series:
    """One file of `synthetic/`: `<shape>_<kind>_anomaly.csv.gz`, its value column named
    after the shape."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name.removesuffix("_anomaly.csv.gz")

    @property
    def kind(self) -> str:
        return self.name.rsplit("_", 1)[1]

    @property
    def shape(self) -> str:
        return self.name.rsplit("_", 1)[0]


@dataclass(frozen=True)
class SeriesResult:
    name: str
    ranges: RangeCounts
    points: Counts
    alerts: int
    normal_in_episode: float
    #: The test stream in time order, for the plots: values, labels, predicted sequences.
    values: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray


def main() -> None:
    run()


def run(argv: list[str] | None = None) -> dict:
    """Train, replay and report as the command line `argv` says; the results document."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser, "synthetic")
    training_arguments(parser)
    parser.add_argument(
        "--series", help="comma-separated series, e.g. horizontal_dip (default: all 15)"
    )
    parser.add_argument("--mode", choices=["per_series", "shared"], default="per_series")
    parser.add_argument("--config", type=Path, default=CONFIG, help="training configuration")
    args = parser.parse_args(argv)

    series = _series(require(args.data / "synthetic", "synthetic series"), args.series)
    groups = [[s] for s in series] if args.mode == "per_series" else [series]
    options = EngineOptions(cooldown_events=args.cooldown)
    tasks = [
        Task(group, args.config, args.work, options, args.epochs, seed, args.scores is not None)
        for seed in args.seeds
        for group in groups
    ]
    outcomes: dict[int | None, list[Outcome]] = {}
    for task, outcome in zip(tasks, run_jobs(_train_and_replay, tasks, args.jobs), strict=True):
        outcomes.setdefault(task.seed, []).append(outcome)
    by_seed = {
        seed: _summary([r for o in outcomes[seed] for r in o.results], series)
        for seed in args.seeds
    }
    document: dict = {
        "mode": args.mode,
        "train_share": TRAIN_SHARE,
        "cooldown_events": args.cooldown,
        **by_seed[args.seeds[0]],
    }
    _print(document)
    if len(args.seeds) > 1:
        seeds = {str(seed): summary["mean"] for seed, summary in by_seed.items()}
        document["seeds"] = seeds
        document["seed_mean"] = field_means(list(seeds.values()))
        console.print(seeds_table("synthetic, mean of kinds", seeds, document["seed_mean"]))
    write_json(args.json, document)
    write_scores(args.scores, [o.dumps for group in outcomes.values() for o in group])
    if args.plots:
        headline = [r for o in outcomes[args.seeds[0]] for r in o.results]
        _plot(args.plots, document, headline, series)
    return document


def _series(folder: Path, wanted: str | None) -> list[Series]:
    found = [Series(path) for path in sorted(folder.glob("*_anomaly.csv.gz"))]
    if wanted is not None:
        names = wanted.split(",")
        unknown = sorted(set(names) - {s.name for s in found})
        if unknown:
            raise SystemExit(f"no series {unknown} in {folder}")
        found = [s for s in found if s.name in names]
    if not found:
        raise SystemExit(f"no <shape>_<kind>_anomaly.csv.gz in {folder}")
    return found


def _event_table(series: Series) -> pa.Table:
    """The series as events of one key: `series`, `timestamp`, `value`, `anomaly`."""
    raw = pyarrow.csv.read_csv(series.path)
    return pa.table(
        {
            "series": pa.array([series.name] * raw.num_rows),
            "timestamp": pc.cast(raw.column("timestamp"), pa.float64()),
            "value": raw.column(series.shape),
            "anomaly": pc.cast(raw.column("anomaly"), pa.int8()),
        }
    )


def _parts(table: pa.Table) -> dict[str, pa.Table]:
    """The first `TRAIN_SHARE` of a series to learn from, and the rest to score."""
    cut = int(table.num_rows * TRAIN_SHARE)
    return {"train": table.slice(0, cut), "test": table.slice(cut)}


def _write(folder: Path, group: list[Series]) -> tuple[Path, Path]:
    """The train and test event files of `group`, named by its series' files (`input_key`)."""
    folder.mkdir(parents=True, exist_ok=True)
    identity = ",".join(f"{s.name}:{input_key(s.path)}" for s in group)
    name = hashlib.sha256(identity.encode()).hexdigest()[:16]
    name = f"{group[0].name}-{name}" if len(group) == 1 else f"shared-{len(group)}-{name}"

    def part_file(part: str) -> Path:
        def write(path: Path) -> None:
            tables = [_parts(_event_table(s))[part] for s in group]
            pq.write_table(pa.concat_tables(tables), path)

        return cached(folder / f"{name}-{part}.parquet", write)

    return part_file("train"), part_file("test")


@dataclass(frozen=True)
class Task:
    """One model to train and replay: a series' own, or the shared one of all series."""

    group: list[Series]
    config: Path
    work: Path
    options: EngineOptions
    epochs: int | None
    #: Overrides the configured training seed (None: the configuration's).
    seed: int | None
    #: Replay the training file too, for the arrays of `--scores`.
    dump: bool


@dataclass(frozen=True)
class Outcome:
    results: list[SeriesResult]
    #: The `--scores` arrays of the task's series (empty unless the task dumps).
    dumps: dict[str, np.ndarray]


def _train_and_replay(task: Task) -> Outcome:
    train_path, test_path = _write(task.work / "events", task.group)
    name = task.group[0].name if len(task.group) == 1 else "shared"
    run = "default-seed" if task.seed is None else f"seed-{task.seed}"
    model = task.work / "models" / run / name / "model.onnx"
    console.print(f"[bold]{run}[/] {name}: training")
    config = load_train_config(task.config)
    if task.seed is not None:
        config = config.model_copy(
            update={"training": config.training.model_copy(update={"seed": task.seed})}
        )
    train(config, [train_path], model, epochs=task.epochs, progress=False)
    evaluation = evaluate(model, test_path, options=task.options)
    keys = [s.name for s in task.group]
    dumps = {}
    if task.dump:
        training = evaluate(model, train_path, options=task.options)
        dumps = score_dump(config.training.seed, keys, evaluation, training, config)
    values = pq.read_table(test_path, columns=["series", "timestamp", "value"])
    results = []
    for key in keys:
        stream = key_stream(evaluation, key)
        truth = stream.labels > 0
        judged = judge(evaluation, stream, truth, task.options.cooldown_events)
        ours = values.filter(pc.equal(values.column("series"), key)).sort_by("timestamp")
        results.append(
            SeriesResult(
                key,
                judged.ranges,
                judged.points,
                judged.alerts,
                judged.normal_in_episode,
                ours.column("value").to_numpy(),
                truth,
                judged.predicted,
            )
        )
    return Outcome(results, dumps)


def _summary(results: list[SeriesResult], series: list[Series]) -> dict:
    """Per series, per kind and per base shape (their series' counts pooled), the mean of
    the kinds and the pooled total."""
    by_name = {s.name: s for s in series}

    def pooled(members: list[SeriesResult]) -> dict:
        return sequence_rates(
            summed(RangeCounts, (r.ranges for r in members)),
            summed(Counts, (r.points for r in members)),
        )

    def grouped(attribute: str) -> dict[str, dict]:
        values = sorted({getattr(by_name[r.name], attribute) for r in results})
        return {
            value: pooled([r for r in results if getattr(by_name[r.name], attribute) == value])
            for value in values
        }

    kinds = grouped("kind")
    return {
        "mean": field_means(list(kinds.values())),
        "total": pooled(results),
        "kinds": kinds,
        "shapes": grouped("shape"),
        "series": {
            r.name: {**pooled([r]), "alerts": r.alerts, "normal_in_episode": r.normal_in_episode}
            for r in results
        },
        #: A series in alert for most of its normal events "catches" every label: its
        #: sequence figures say nothing of the detector.
        "series_mostly_in_alert": sorted(
            r.name for r in results if r.normal_in_episode > MOSTLY_IN_ALERT
        ),
    }


def _print(document: dict) -> None:
    console.print(rates_table("synthetic: per series", "series", document["series"]))
    console.print(rates_table("synthetic: per base shape", "shape", document["shapes"]))
    rows = document["kinds"] | {"mean of kinds": document["mean"], "pooled": document["total"]}
    console.print(rates_table("synthetic: per anomaly kind", "kind", rows))
    if document["series_mostly_in_alert"]:
        console.print(
            f"[red]in alert for most of their normal events: "
            f"{', '.join(document['series_mostly_in_alert'])}; their ranges are caught by "
            "one episode, not by detection"
        )


def _plot(folder: Path, document: dict, results: list[SeriesResult], series: list[Series]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    by_name = {s.name: s for s in series}
    shapes = sorted({by_name[r.name].shape for r in results})
    kinds = [kind for kind in KINDS if kind in document["kinds"]]
    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(shapes)
    for index, shape in enumerate(shapes):
        f1 = [document["series"].get(f"{shape}_{kind}", {}).get("f1", 0.0) for kind in kinds]
        axis.bar(np.arange(len(kinds)) + index * width, f1, width, label=shape)
    axis.set_xticks(np.arange(len(kinds)) + width * (len(shapes) - 1) / 2, kinds)
    axis.set_ylabel("range F1")
    axis.set_title("synthetic: range F1 per anomaly kind")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "synthetic_f1_per_kind.png", dpi=110)
    plt.close(figure)
    for kind in kinds:
        _plot_kind(folder, kind, [r for r in results if by_name[r.name].kind == kind])


def _plot_kind(folder: Path, kind: str, results: list[SeriesResult]) -> None:
    """Each series of `kind`: its test values, labeled ranges and predicted sequences."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 1, figsize=(14, 2.6 * len(results)), squeeze=False)
    for axis, result in zip(axes[:, 0], results, strict=True):
        index = np.arange(result.values.size)
        axis.plot(index, result.values, lw=0.6, color="black")
        low, high = np.nanmin(result.values), np.nanmax(result.values)
        axis.fill_between(index, low, high, where=result.labels, color="tab:red", alpha=0.3)
        axis.fill_between(
            index, low, high, where=result.predicted, color="tab:blue", alpha=0.2, step="mid"
        )
        axis.set_title(f"{result.name}: labeled (red), alert episodes (blue)", fontsize=9)
    axes[-1, 0].set_xlabel("test event")
    figure.tight_layout()
    figure.savefig(folder / f"synthetic_{kind}.png", dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
