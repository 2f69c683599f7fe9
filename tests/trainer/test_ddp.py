"""Data-parallel training under torchrun: two CPU processes (gloo) train one loadable model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pytest

from detector.contract.model_file import load_model_file

CONFIG = """
[data]
key = "account"
time = "ts"
label = "fraud"
features = [{ name = "amount", kind = "numeric" }]

[model]
window = 8
min_history = 2
hidden = 8

[training]
epochs = 3
batch_size = 32
learning_rate = 0.02
"""


@pytest.mark.slow
def test_torchrun_two_processes_train_and_rank_zero_exports(tmp_path) -> None:
    rng = np.random.default_rng(0)
    fraud = rng.random(1200) < 0.05
    rows = [
        {
            "account": f"a{i % 12}",
            "ts": 1_700_000_000 + 60 * i,
            "amount": float(500 if fraud[i] else rng.normal(50, 5)),
            "fraud": int(fraud[i]),
        }
        for i in range(1200)
    ]
    pyarrow.csv.write_csv(pa.Table.from_pylist(rows), tmp_path / "events.csv")
    (tmp_path / "train.toml").write_text(CONFIG)
    model = tmp_path / "out" / "model.onnx"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "trainer", "train", "--config", str(tmp_path / "train.toml"),
        "--data", str(tmp_path / "events.csv"), "--out", str(model), "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    # Only rank 0 writes and reports: each file is named once.
    written = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("wrote ")]
    assert written.count(str(model)) == 1
    assert len(written) == len(set(written))

    manifest, _ = load_model_file(model)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["model_version"] == manifest.model_version
    assert len(metrics["history"]) == 3
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    assert manifest.training.metrics["validation_auroc"] > 0.9
