"""A short check for a machine with an NVIDIA GPU: do the detector's scoring and the trainer's
mixed-precision training actually use it, and do they give what the CPU gives?

    python bench/gpu_check.py [--keys 40] [--epochs 4] [--json OUT]

1. Scoring: the benchmark models (8 features, hidden 64 x 2, window 32) in window and
   stateful export, loaded as the daemon loads them (providers "auto"), on the CUDA provider
   against the CPU's: the largest score difference, and rows per second at several batch
   sizes (where the GPU overtakes the CPU).
2. Training: `trainer train`'s own pipeline on synthetic sensors, once on the GPU with mixed
   precision (float16 autocast with a gradient scaler) and once on the CPU in float32: finite,
   falling losses, the export's parity check, validation losses and seconds.
3. Evaluation: the GPU-trained model's test set replayed through the engine
   (`trainer evaluate`'s path) on the CUDA provider and on the CPU: the same scores within
   tolerance, the same alert decisions (but where a score is within that tolerance of its
   threshold), and its detection metrics beside the CPU-trained model's. Then `detector
   replay` in a process of its own, without torch, must pick CUDA and give the same scores.

Exit status: 0 all passed, or no GPU here ("no GPU: skipped", in well under a second);
3 a GPU is there but onnxruntime cannot use it (no CUDA provider in this build, or its
libraries fail to load): scoring fell back to the CPU, which was checked to work;
4 a check failed (each failure is printed).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

EXIT_OK, EXIT_NO_CUDA_PROVIDER, EXIT_FAILED = 0, 3, 4
#: Largest difference between CUDA and CPU scores, relative to max(|score|, 1): TF32 matrix
#: products and another summation order differ in the last digits only.
SCORE_TOLERANCE = 1e-3
#: A mixed-precision model may end a little worse or better than the float32 one, not far off.
VALIDATION_LOSS_RATIO = 1.25
#: Batch sizes timed per export mode: windows for `window`, one event per key for `stateful`.
BATCHES = {"window": (256, 4096, 32768), "stateful": (1024, 16384, 131072)}
#: Each timing repeats a batch until this many seconds have passed (and at least 3 times).
TIMING_SECONDS = 0.5
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def gpu_present() -> bool:
    """An NVIDIA driver answers; checked before torch or onnxruntime are even imported."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def rows_per_second(score: Callable[[], object], rows: int) -> float:
    """Rows scored per second by repeated calls of `score` on one batch of `rows`."""
    score()  # warm-up: kernels chosen, memory planned for this batch size
    runs, started = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - started < TIMING_SECONDS:
        score()
        runs += 1
    return runs * rows / (time.perf_counter() - started)


def largest_difference(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1.0), initial=0.0))


def batch_of(mode: str, rows: int, rng: np.random.Generator) -> Callable[[Any], np.ndarray]:
    """A function that scores one random batch of `rows` with a given scorer."""
    from seeded_models import FEATURES, HIDDEN, LAYERS, WINDOW

    if mode == "window":
        x = rng.standard_normal((rows, WINDOW, len(FEATURES)), dtype=np.float32)
        lengths = np.full(rows, WINDOW, np.int64)
        return lambda scorer: scorer.score_windows(x, lengths, rows).score
    x = rng.standard_normal((rows, len(FEATURES)), dtype=np.float32)
    h = np.zeros((LAYERS, rows, HIDDEN), np.float32)
    return lambda scorer: scorer.step(x, h, h, rows).score


def scoring(folder: Path, failures: list[str]) -> dict[str, Any]:
    """CUDA against CPU for both export modes of the benchmark model."""
    from seeded_models import bench_model

    from detector.engine.scorer import Scorer

    rng = np.random.default_rng(0)
    report: dict[str, Any] = {}
    for mode, batches in BATCHES.items():
        model = bench_model(folder, mode)
        cpu, auto = Scorer.load(model, [CPU]), Scorer.load(model)
        on_cuda = auto.providers[0] == CUDA
        entry: dict[str, Any] = {"providers": auto.providers, "rows_per_s": {}}
        worst = 0.0
        for rows in batches:
            run = batch_of(mode, rows, rng)
            speeds = {"cpu": rows_per_second(partial(run, cpu), rows)}
            if on_cuda:
                worst = max(worst, largest_difference(run(auto), run(cpu)))
                speeds["cuda"] = rows_per_second(partial(run, auto), rows)
                speeds["cuda_vs_cpu"] = speeds["cuda"] / speeds["cpu"]
            entry["rows_per_s"][rows] = speeds
        if on_cuda:
            entry["max_score_difference"] = worst
        if worst > SCORE_TOLERANCE:
            failures.append(f"{mode}: CUDA scores differ from the CPU's by {worst:.2e}")
        report[mode] = entry
    return report


def training(
    folder: Path, keys: int, epochs: int, cuda_used: bool, failures: list[str]
) -> dict[str, Any]:
    """The trainer's pipeline on the GPU (mixed precision) and the CPU, then both evaluated;
    `cuda_used`: whether onnxruntime's CUDA provider works here."""
    from detector.engine.scorer import CPU as CPU_PROVIDER
    from trainer.config import load_train_config
    from trainer.evaluate import evaluate
    from trainer.pipeline import train
    from trainer.synth import sensors

    train_csv, test_csv, toml = sensors(keys=keys, days=14, seed=0).write(folder / "data")
    base = load_train_config(toml)
    report: dict[str, Any] = {}
    models: dict[str, Path] = {}
    for device in ("cuda", "cpu"):
        settings = base.training.model_copy(
            update={"device": device, "amp": True, "epochs": epochs}
        )
        config = base.model_copy(update={"training": settings})
        result = train(config, [train_csv], folder / device / "model.onnx", progress=False)
        assert result is not None  # a single process is rank 0
        losses = [record.train_loss for record in result.history.epochs]
        report[device] = {
            "train_seconds": result.metrics["timings"]["train_seconds"],
            "windows_per_s": result.history.epochs[-1].windows_per_second,
            "train_losses": losses,
            "best_validation_loss": result.history.best_validation_loss,
            "parity_max_difference": result.metrics["parity_max_difference"],
        }
        if not (np.isfinite(losses).all() and losses[-1] < losses[0]):
            failures.append(f"training on {device}: losses not finite and falling: {losses}")
        models[device] = result.model_path
    ratio = report["cuda"]["best_validation_loss"] / report["cpu"]["best_validation_loss"]
    report["validation_loss_cuda_vs_cpu"] = ratio
    if not ratio <= VALIDATION_LOSS_RATIO:
        failures.append(f"mixed-precision validation loss is {ratio:.2f}x the float32 one")

    on_cuda = evaluate(models["cuda"], test_csv)
    on_cpu = evaluate(models["cuda"], test_csv, providers=[CPU_PROVIDER])
    cpu_trained = evaluate(models["cpu"], test_csv, providers=[CPU_PROVIDER])
    cuda_replay, cpu_replay = on_cuda.replay, on_cpu.replay
    scored = ~np.isnan(cpu_replay.scores)
    difference = largest_difference(cuda_replay.scores[scored], cpu_replay.scores[scored])
    # An event may cross its threshold on one provider only when its score is within the
    # tolerance of it; any other flipped decision is a failure.
    flipped = (cuda_replay.scores >= cuda_replay.thresholds) != (
        cpu_replay.scores >= cpu_replay.thresholds
    )
    margin = np.abs(cpu_replay.scores - cpu_replay.thresholds) / np.maximum(
        np.abs(cpu_replay.thresholds), 1.0
    )
    report["evaluation"] = {
        "events": cuda_replay.summary.events,
        "max_score_difference": difference,
        "alerts": {"cuda": len(cuda_replay.alerts), "cpu": len(cpu_replay.alerts)},
        "decisions_flipped": int(flipped.sum()),
        "events_per_s": {
            "cuda": cuda_replay.summary.events_per_s,
            "cpu": cpu_replay.summary.events_per_s,
        },
        "metrics": {
            "gpu_trained": _headline(on_cuda.metrics),
            "cpu_trained": _headline(cpu_trained.metrics),
        },
    }
    if difference > SCORE_TOLERANCE:
        failures.append(f"engine scores on CUDA differ from the CPU's by {difference:.2e}")
    providers, command_scores = replay_command(models["cuda"], test_csv, folder)
    report["replay_command"] = {
        "providers": providers,
        "max_score_difference": largest_difference(
            command_scores[scored], cuda_replay.scores[scored]
        ),
    }
    if cuda_used and providers[:1] != [CUDA]:
        failures.append(f"`detector replay` (no torch in its process) ran on {providers}")
    if report["replay_command"]["max_score_difference"] > SCORE_TOLERANCE:
        failures.append("`detector replay` scores differ from the in-process CUDA replay's")
    if (flipped & (margin > SCORE_TOLERANCE)).any():
        clear = int((flipped & (margin > SCORE_TOLERANCE)).sum())
        failures.append(
            f"{clear} alert decisions differ between CUDA and CPU away from the threshold"
        )
    return report


def replay_command(model: Path, data: Path, folder: Path) -> tuple[list[str], np.ndarray]:
    """`detector replay` in a process of its own, as deployed: the detector never imports
    torch, so it must find the CUDA libraries by itself. The providers its log names, and the
    scores it wrote (NaN where an event was not scored)."""
    import orjson
    import pyarrow.csv

    scores = folder / "replay-scores.csv"
    command = [sys.executable, "-m", "detector", "replay", "--model", str(model)]
    command += ["--input", str(data), "--scores", str(scores)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    logged = [orjson.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    loaded = next(entry for entry in logged if entry.get("event") == "model loaded")
    score = pyarrow.csv.read_csv(scores).column("score").to_numpy(zero_copy_only=False)
    return loaded["providers"], score.astype(np.float64)


def _headline(metrics: dict[str, Any]) -> dict[str, float]:
    ranges = metrics["ranges"]
    return {
        "auprc": metrics["auprc"],
        "range_f1": ranges["f1"],
        "alerts": metrics["counts"]["alerts"],
    }


def check(args: argparse.Namespace) -> tuple[int, dict[str, Any], list[str]]:
    import onnxruntime
    import torch

    failures: list[str] = []
    report: dict[str, Any] = {
        "onnxruntime": onnxruntime.__version__,
        "available_providers": onnxruntime.get_available_providers(),
        "torch": torch.__version__,
        "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        report["scoring"] = scoring(folder, failures)
        cuda_used = all(entry["providers"][0] == CUDA for entry in report["scoring"].values())
        if report["torch_device"] is None:
            failures.append("torch sees no CUDA device: mixed-precision training was not run")
        else:
            report["training"] = training(folder, args.keys, args.epochs, cuda_used, failures)
    if failures:
        return EXIT_FAILED, report, failures
    return (EXIT_OK if cuda_used else EXIT_NO_CUDA_PROVIDER), report, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=40, help="synthetic devices to train on")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs on each device")
    parser.add_argument("--json", type=Path, help="write the report to this JSON file")
    args = parser.parse_args()
    if not gpu_present():
        print("no GPU: skipped (no NVIDIA driver on this machine)")
        return EXIT_OK
    status, report, failures = check(args)
    import orjson

    options = orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    text = orjson.dumps(report, option=options)
    print(text.decode())
    if args.json:
        args.json.write_bytes(text)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    verdict = {
        EXIT_OK: "GPU checks passed",
        EXIT_NO_CUDA_PROVIDER: "onnxruntime cannot use the GPU here; it fell back to the CPU",
        EXIT_FAILED: "a GPU check FAILED",
    }
    print(verdict[status], file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
