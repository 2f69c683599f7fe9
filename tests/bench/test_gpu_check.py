"""bench/gpu_check.py on a machine without a GPU: a clear message and success, at once.

Its GPU path (CUDA provider against the CPU, mixed-precision training, `detector replay`
on CUDA) needs an NVIDIA GPU and is run by hand where one is; docs/benchmarks.md has the
latest results.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))

from gpu_check import gpu_present  # noqa: E402


@pytest.mark.skipif(gpu_present(), reason="this machine has a GPU: the full check applies")
def test_without_a_gpu_it_says_so_and_succeeds_without_loading_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(SCRIPT)], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert done.stdout == "no GPU: skipped (no NVIDIA driver on this machine)\n"
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines()}
    assert "numpy" in imported and "torch" not in imported and "onnxruntime" not in imported
