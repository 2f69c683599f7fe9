"""A short check for a machine with an NVIDIA GPU: does the detector's scoring and the trainer's
mixed-precision training actually use it?

    python bench/gpu_check.py [--windows 4096] [--repeats 20] [--json OUT]

1. onnxruntime's CUDA provider runs the benchmark window model (hidden 64 x 2, window 32)
   and gives the CPU's scores; `Scorer.load` with providers "auto" picks it.
2. Batched window throughput on CUDA against the CPU (windows per second).
3. A few mixed-precision (torch.amp, float16 with a GradScaler) training steps of
   `trainer.network.SequenceNet` on the GPU, with a finite, falling loss.

Exit status: 0 all passed, or no GPU here ("no GPU: skipped", in well under a second);
3 a GPU is there but onnxruntime cannot use it (no CUDA provider in this build, or its
libraries fail to load): scoring fell back to the CPU, which was checked to work;
4 a check failed (scores differ from the CPU's, or the training loss is not finite).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

EXIT_OK, EXIT_NO_CUDA_PROVIDER, EXIT_FAILED = 0, 3, 4
#: Largest difference between CUDA and CPU scores (TF32 and kernel order differ slightly).
SCORE_TOLERANCE = 1e-3
CUDA = "CUDAExecutionProvider"


def gpu_present() -> bool:
    """An NVIDIA driver answers; checked before torch or onnxruntime are even imported."""
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def random_windows(count: int, window: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((count, window, width)).astype(np.float32)
    lengths = rng.integers(1, window + 1, count).astype(np.int64)
    x[np.arange(window)[None, :] >= lengths[:, None]] = 0.0  # right padding, as the contract says
    return x, lengths


def windows_per_second(scorer: Any, x: np.ndarray, lengths: np.ndarray, repeats: int) -> float:
    scorer.score_windows(x, lengths, len(x))  # warm-up: kernels chosen, memory planned
    started = time.perf_counter()
    for _ in range(repeats):
        scorer.score_windows(x, lengths, len(x))
    return repeats * len(x) / (time.perf_counter() - started)


def amp_training(steps: int, batch: int) -> dict[str, Any]:
    """Mixed-precision training steps on the GPU: the losses and the steps per second."""
    import torch
    from seeded_models import FEATURES, WINDOW, seeded_net

    device = torch.device("cuda")
    net = seeded_net().to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cuda")
    x, lengths = random_windows(batch, WINDOW, len(FEATURES))
    x_t = torch.from_numpy(x).to(device)
    lengths_t = torch.from_numpy(lengths).to(device)
    target = (x_t[:, 0, 0] > 0).float()  # learnable: the sign of the first value
    losses = []
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            logit = net(x_t, lengths_t).raw
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit.float(), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "device": torch.cuda.get_device_name(device),
        "losses": losses,
        "steps_per_s": steps / seconds,
    }


def check(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    import onnxruntime
    from seeded_models import FEATURES, WINDOW, bench_model

    from detector.manifest import ModelContractError
    from detector.scorer import CPU, Scorer

    report: dict[str, Any] = {"onnxruntime": onnxruntime.__version__}
    report["available_providers"] = onnxruntime.get_available_providers()
    x, lengths = random_windows(args.windows, WINDOW, len(FEATURES))
    with tempfile.TemporaryDirectory() as folder:
        model = bench_model(Path(folder), "window")
        cpu = Scorer.load(model, providers=[CPU])
        try:
            auto = Scorer.load(model, providers=["auto"])  # what the daemon does by default
        except ModelContractError as error:  # the CUDA provider is there but cannot start
            report["cuda_provider_error"] = str(error)
            auto = cpu
    report["auto_providers"] = auto.providers
    cpu_scores = cpu.score_windows(x, lengths, len(x)).score
    report["cpu_windows_per_s"] = windows_per_second(cpu, x, lengths, max(1, args.repeats // 5))
    status = EXIT_OK
    if auto.providers[0] != CUDA:
        report["cuda_provider"] = "unavailable: scoring fell back to " + ", ".join(auto.providers)
        fallback = auto.score_windows(x, lengths, len(x)).score
        status = EXIT_NO_CUDA_PROVIDER if np.array_equal(fallback, cpu_scores) else EXIT_FAILED
    else:
        gpu_scores = auto.score_windows(x, lengths, len(x)).score
        report["cuda_max_score_difference"] = float(np.abs(gpu_scores - cpu_scores).max())
        report["cuda_windows_per_s"] = windows_per_second(auto, x, lengths, args.repeats)
        report["cuda_vs_cpu"] = report["cuda_windows_per_s"] / report["cpu_windows_per_s"]
        if report["cuda_max_score_difference"] > SCORE_TOLERANCE:
            status = EXIT_FAILED
    try:
        training = amp_training(args.steps, args.batch)
    except (RuntimeError, AssertionError) as error:  # torch without CUDA, or a CUDA failure
        report["amp_training"] = f"failed: {error}"
        return EXIT_FAILED, report
    report["amp_training"] = training
    losses = training["losses"]
    if not (np.isfinite(losses).all() and losses[-1] < losses[0]):
        status = EXIT_FAILED
    return status, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=4096, help="windows per scoring batch")
    parser.add_argument("--repeats", type=int, default=20, help="timed batches on the GPU")
    parser.add_argument("--steps", type=int, default=20, help="mixed-precision training steps")
    parser.add_argument("--batch", type=int, default=512, help="windows per training step")
    parser.add_argument("--json", type=Path, help="write the report to this JSON file")
    args = parser.parse_args()
    if not gpu_present():
        print("no GPU: skipped (no NVIDIA driver on this machine)")
        return EXIT_OK
    status, report = check(args)
    import orjson

    text = orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    print(text.decode())
    if args.json:
        args.json.write_bytes(text)
    verdict = {
        EXIT_OK: "GPU checks passed",
        EXIT_NO_CUDA_PROVIDER: "onnxruntime cannot use the GPU here; it fell back to the CPU",
        EXIT_FAILED: "a GPU check FAILED",
    }
    print(verdict[status], file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
