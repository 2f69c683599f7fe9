"""Detection quality on simulated card transactions, in rolling weekly folds, against boosting.

    python bench/quality_fraud.py [--folds 4] [--json OUT] [--plots DIR]

Each fold, as in the handbook of Le Borgne et al. (chapter 7): 7 days of training
transactions, a 7-day delay (their labels are not known yet), 7 days of test; the test weeks
are the last `--folds` weeks of the file. The trainer learns a classifier on the training week
(`bench/configs/fraud.toml`, its last day validating), and the delay and test weeks are
replayed through the detector's engine, so every test transaction is scored with the
customer history the engine holds at that moment. A gradient-boosting classifier
(scikit-learn's HistGradientBoostingClassifier, a benchmark-only dependency) learns from the
same week and features. Metrics on the test week: AUC-ROC, AUPRC and card precision@100
(per test day, the 100 customers with the highest score that day; the share of them with a
fraud that day; averaged over the days). Published (later months of the same simulation):
LSTM AUPRC 0.665, XGBoost AUPRC 0.687.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
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
from sklearn.ensemble import HistGradientBoostingClassifier

from detector.engine.core import Status
from trainer.config import NumericFeatureConfig, TrainConfig, load_train_config
from trainer.evaluate import evaluate
from trainer.metrics import average_precision, precision_recall_curve, roc_auc
from trainer.pipeline import train

CONFIG = REPO / "bench" / "configs" / "fraud.toml"
FILE = "transactions_2018-04_2018-06.csv.gz"
#: 2018-04-01T00:00:00Z, where TX_TIME_SECONDS starts.
START = 1_522_540_800.0
DAY = 86_400.0
WEEK = 7 * DAY
TOP_CARDS = 100
PUBLISHED = {
    "lstm": {"auc_roc": 0.876, "auprc": 0.665},
    "xgboost": {"auc_roc": 0.869, "auprc": 0.687},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_arguments(parser, "fraud")
    parser.add_argument("--folds", type=int, default=4, help="test weeks, the file's last ones")
    parser.add_argument("--epochs", type=int, help="override the configured epochs")
    parser.add_argument(
        "--jobs", type=int, default=1, help="folds trained at once (one torch thread each)"
    )
    args = parser.parse_args()

    events = _events(require(args.data / "fraud" / FILE, "card transactions"), args.work)
    config = load_train_config(CONFIG)
    features = [f.name for f in config.data.features if isinstance(f, NumericFeatureConfig)]
    times = events.column("ts").to_numpy()
    end = np.floor(times.max() / DAY) * DAY + DAY  # midnight after the last transaction
    tasks = [
        _prepare(fold, events, times, end - (args.folds - fold) * WEEK, config, features, args)
        for fold in range(args.folds)
    ]
    outcomes = run_jobs(_fold, tasks, args.jobs)
    folds = [result for result, _ in outcomes]
    curves = [curve for _, curve in outcomes]
    for result in folds:
        _print_fold(result)
    metrics = ("auc_roc", "auprc", "card_precision_at_100")
    document = {
        "mean": {m: float(np.mean([f["lstm"][m] for f in folds])) for m in metrics},
        "folds": folds,
        "baseline": {
            "model": "sklearn HistGradientBoostingClassifier",
            "mean": {m: float(np.mean([f["baseline"][m] for f in folds])) for m in metrics},
        },
        "published": PUBLISHED,
        "train_seconds": float(sum(f["lstm"]["train_seconds"] for f in folds)),
        "score_seconds": float(sum(f["lstm"]["score_seconds"] for f in folds)),
    }
    _print_mean(document)
    write_json(args.json, document)
    if args.plots:
        _plot(args.plots, folds, curves)


def _events(source: Path, work: Path) -> pa.Table:
    """`_transactions` of `source`, cached as Parquet under a name of its own."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"transactions-{input_key(source)}.parquet"
    return pq.read_table(cached(path, lambda to: pq.write_table(_transactions(source), to)))


def _transactions(source: Path) -> pa.Table:
    """The transactions with `ts` (epoch seconds) and a string key."""
    table = pyarrow.csv.read_csv(source).drop_columns(["TX_FRAUD_SCENARIO"])
    # TX_TIME_SECONDS counts from the first midnight of the simulation.
    seconds = pc.add(pc.cast(table.column("TX_TIME_SECONDS"), pa.float64()), START)
    return table.append_column("ts", seconds).set_column(
        table.schema.get_field_index("CUSTOMER_ID"),
        "CUSTOMER_ID",
        pc.cast(table.column("CUSTOMER_ID"), pa.string()),
    )


@dataclass(frozen=True)
class FoldTask:
    """One fold's files and settings, ready for a worker process."""

    fold: int
    train_start: float
    test_start: float
    train_path: Path
    replay_path: Path
    config: TrainConfig
    features: list[str]
    epochs: int | None


def _prepare(
    fold: int,
    events: pa.Table,
    times: np.ndarray,
    test_start: float,
    config: TrainConfig,
    features: list[str],
    args: argparse.Namespace,
) -> FoldTask:
    """Write the fold's training week and its delay and test weeks (to replay)."""
    train_start = test_start - 2 * WEEK
    train_end = train_start + WEEK
    folder = args.work / f"fold-{fold}"
    folder.mkdir(parents=True, exist_ok=True)
    train_path, replay_path = folder / "train.parquet", folder / "replay.parquet"
    pq.write_table(events.filter((times >= train_start) & (times < train_end)), train_path)
    pq.write_table(events.filter((times >= train_end) & (times < test_start + WEEK)), replay_path)
    # The training week's last day validates; nothing after the training week is read.
    fold_config = config.model_copy(
        update={
            "split": config.split.model_copy(
                update={"validation_from": train_end - DAY, "test_from": train_end}
            )
        }
    )
    return FoldTask(
        fold, train_start, test_start, train_path, replay_path, fold_config, features, args.epochs
    )


def _fold(task: FoldTask) -> tuple[dict, dict]:
    fold, train_start, test_start = task.fold, task.train_start, task.test_start
    train_path, replay_path, features = task.train_path, task.replay_path, task.features
    console.print(f"[bold]fold {fold}[/]: training on the week from {_day(train_start)}")
    clock = time.perf_counter()
    model = train_path.with_name("model.onnx")
    train(task.config, [train_path], model, epochs=task.epochs, progress=False)
    train_seconds = time.perf_counter() - clock
    evaluation = evaluate(model, replay_path)
    replay = evaluation.replay
    test = (replay.times >= test_start) & (replay.statuses == Status.SCORED)
    labels = evaluation.labels[test] > 0
    scores = replay.scores[test]
    days = np.floor((replay.times[test] - test_start) / DAY).astype(np.int64)
    customers = replay.keys[test]

    clock = time.perf_counter()
    train_table = pq.read_table(train_path)
    replayed = pq.read_table(replay_path)
    test_table = replayed.filter(pc.greater_equal(replayed.column("ts"), test_start))
    booster = HistGradientBoostingClassifier(random_state=0)
    booster.fit(_matrix(train_table, features), train_table.column("TX_FRAUD").to_numpy())
    baseline_scores = booster.predict_proba(_matrix(test_table, features))[:, 1]
    baseline_seconds = time.perf_counter() - clock
    baseline_labels = test_table.column("TX_FRAUD").to_numpy() > 0
    baseline_days = np.floor((test_table.column("ts").to_numpy() - test_start) / DAY)
    baseline_customers = test_table.column("CUSTOMER_ID").to_numpy(zero_copy_only=False)

    result = {
        "fold": fold,
        "train_from": _day(train_start),
        "test_from": _day(test_start),
        "test_transactions": int(test.sum()),
        "test_frauds": int(labels.sum()),
        "lstm": {
            **_metrics(labels, scores, days, customers),
            "threshold": evaluation.threshold,
            "train_seconds": train_seconds,
            "score_seconds": replay.summary.seconds,
        },
        "baseline": {
            **_metrics(
                baseline_labels, baseline_scores, baseline_days.astype(np.int64), baseline_customers
            ),
            "seconds": baseline_seconds,
        },
    }
    curve = {
        "lstm": precision_recall_curve(labels, scores)[:2],
        "baseline": precision_recall_curve(baseline_labels, baseline_scores)[:2],
    }
    return result, curve


def _matrix(events: pa.Table, features: list[str]) -> np.ndarray:
    return np.column_stack([events.column(name).to_numpy() for name in features])


def _metrics(
    labels: np.ndarray, scores: np.ndarray, days: np.ndarray, customers: np.ndarray
) -> dict[str, float | None]:
    return {
        "auc_roc": finite(roc_auc(labels, scores)),
        "auprc": finite(average_precision(labels, scores)),
        "card_precision_at_100": card_precision_at_k(labels, scores, days, customers, TOP_CARDS),
    }


def card_precision_at_k(
    labels: np.ndarray, scores: np.ndarray, days: np.ndarray, customers: np.ndarray, k: int
) -> float:
    """Per day, the k customers with the highest max score; the share with a fraud that day."""
    _, card = np.unique(customers.astype(str), return_inverse=True)
    precisions = []
    for day in np.unique(days).tolist():
        today = days == day
        cards, inverse = np.unique(card[today], return_inverse=True)
        best = np.full(cards.size, -np.inf)
        np.maximum.at(best, inverse, scores[today])
        fraud = np.zeros(cards.size, bool)
        np.logical_or.at(fraud, inverse, labels[today])
        top = np.argsort(-best, kind="stable")[:k]
        precisions.append(float(fraud[top].sum()) / k)
    return float(np.mean(precisions))


def _day(seconds: float) -> str:
    return np.datetime64(int(seconds), "s").astype("datetime64[D]").astype(str)


def _print_fold(result: dict) -> None:
    rows = [
        (
            name,
            result[model]["auc_roc"],
            result[model]["auprc"],
            result[model]["card_precision_at_100"],
        )
        for name, model in (("seqsentinel LSTM", "lstm"), ("boosting baseline", "baseline"))
    ]
    console.print(
        table(
            f"fold {result['fold']}: test week from {result['test_from']} "
            f"({result['test_transactions']} transactions, {result['test_frauds']} frauds; "
            f"LSTM trained in {result['lstm']['train_seconds']:.0f} s)",
            ["model", "AUC-ROC", "AUPRC", "card P@100"],
            rows,
        )
    )


def _print_mean(document: dict) -> None:
    mean, baseline = document["mean"], document["baseline"]["mean"]
    console.print(
        table(
            f"card fraud: mean over {len(document['folds'])} folds",
            ["model", "AUC-ROC", "AUPRC", "card P@100"],
            [
                ("seqsentinel LSTM", mean["auc_roc"], mean["auprc"], mean["card_precision_at_100"]),
                (
                    "HistGradientBoosting (same run)",
                    baseline["auc_roc"],
                    baseline["auprc"],
                    baseline["card_precision_at_100"],
                ),
                ("LSTM (published)", 0.876, 0.665, "—"),
                ("XGBoost (published)", 0.869, 0.687, "—"),
            ],
        )
    )


def _plot(folder: Path, folds: list[dict], curves: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(6, 4.5))
    for result, curve in zip(folds, curves, strict=True):
        (line,) = axis.plot(
            curve["lstm"][1], curve["lstm"][0], label=f"LSTM, test from {result['test_from']}"
        )
        axis.plot(
            curve["baseline"][1], curve["baseline"][0], "--", color=line.get_color(), alpha=0.6
        )
    axis.set_xlabel("recall")
    axis.set_ylabel("precision")
    axis.set_title("Card fraud: precision-recall per fold (dashed: boosting)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(folder / "fraud_precision_recall.png", dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
