"""What the benchmark scripts promise about their own running: one torch thread per job,
caches that follow their input, and the SMAP archive as it is published, on small archives
made here (the real data is for the benchmarks themselves)."""

from __future__ import annotations

import csv
import json
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import quality_fraud  # noqa: E402
import quality_smap  # noqa: E402
import seeded_models  # noqa: E402
from quality_report import run_jobs  # noqa: E402

from detector.engine.scorer import Scorer  # noqa: E402


@pytest.fixture
def torch_threads() -> Iterator[int]:
    """The test may set torch's thread count; the next test gets the one it had."""
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


def _threads(_: int) -> int:
    return torch.get_num_threads()


@pytest.mark.parametrize("jobs", [1, 2])
def test_each_job_has_one_torch_thread(torch_threads: int, jobs: int) -> None:
    torch.set_num_threads(2)
    assert run_jobs(_threads, [0, 1, 2], jobs) == [1, 1, 1]


def _transactions(path: Path, customers: list[int]) -> Path:
    rows = ["TX_TIME_SECONDS,CUSTOMER_ID,TX_AMOUNT,TX_FRAUD,TX_FRAUD_SCENARIO"]
    rows += [f"{60 * i},{c},{10.0 + i},0,0" for i, c in enumerate(customers)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_the_fraud_cache_is_the_file_asked_for(tmp_path: Path) -> None:
    work = tmp_path / "work"
    first = _transactions(tmp_path / "first.csv", [1, 2])
    second = _transactions(tmp_path / "second.csv", [3, 4, 5])
    assert quality_fraud._events(first, work).column("CUSTOMER_ID").to_pylist() == ["1", "2"]
    assert quality_fraud._events(second, work).column("CUSTOMER_ID").to_pylist() == [
        "3",
        "4",
        "5",
    ]
    _transactions(first, [6, 7, 8, 9])  # the same file, changed
    assert quality_fraud._events(first, work).num_rows == 4
    assert quality_fraud._events(second, work).num_rows == 3
    assert len(list(work.glob("transactions-*.parquet"))) == 3
    assert not list(work.glob("*.partial"))


def test_a_seeded_model_is_exported_again_when_what_makes_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = seeded_models.bench_model(tmp_path, "window")
    written = path.stat().st_mtime_ns
    assert seeded_models.bench_model(tmp_path, "window") == path
    assert path.stat().st_mtime_ns == written  # reused, not exported again
    monkeypatch.setattr(seeded_models, "SEED", 1)
    other = seeded_models.bench_model(tmp_path, "window")
    assert other != path and other.exists()


#: Channels of the small archives: spacecraft, command columns, labeled test rows.
CHANNELS = {"A-1": ("SMAP", 24, [(300, 330)]), "M-1": ("MSL", 54, [(250, 270), (350, 360)])}


def _archive(path: Path, top: str) -> Path:
    """A SMAP-style archive under `top`/: labels of both spacecraft and their arrays."""
    folder = path.parent / f"{path.name}.d"
    rng = np.random.default_rng(0)
    (folder / top / "train").mkdir(parents=True)
    (folder / top / "test").mkdir()
    with (folder / top / "labeled_anomalies.csv").open("w", newline="") as out:
        labels = csv.writer(out)
        labels.writerow(["chan_id", "spacecraft", "anomaly_sequences", "class", "num_values"])
        for channel, (spacecraft, commands, sequences) in CHANNELS.items():
            labels.writerow([channel, spacecraft, json.dumps(sequences), "[point]", 400])
            for part, rows in (("train", 600), ("test", 400)):
                values = np.zeros((rows, 1 + commands))
                values[:, 0] = np.sin(np.arange(rows) / 10) + rng.normal(0, 0.05, rows)
                values[np.arange(rows), 1 + np.arange(rows) % commands] = 1.0
                np.save(folder / top / part / f"{channel}.npy", values)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder / top, arcname=top)
    return path


@pytest.mark.parametrize("top", ["smap", "SMAP"])
def test_the_archive_is_found_under_any_top_folder_and_extracted_per_archive(
    tmp_path: Path, top: str
) -> None:
    archive = _archive(tmp_path / "smap.tar.gz", top)
    folder = quality_smap._extract(archive, tmp_path / "work")
    labels, root = quality_smap._layout(folder)
    assert (labels, root) == (folder / top / "labeled_anomalies.csv", folder / top)
    assert [label.channel for label in quality_smap._labels(labels, "MSL")] == ["M-1"]
    assert quality_smap._labels(labels, "SMAP")[0].sequences == [(300, 330)]
    other = _archive(tmp_path / "other.tar.gz", top)
    assert quality_smap._extract(other, tmp_path / "work") != folder


def test_msl_channels_train_with_all_their_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torch_threads: int
) -> None:
    _archive(tmp_path / "data" / "smap" / "smap.tar.gz", "SMAP")
    work, out = tmp_path / "work", tmp_path / "msl.json"
    argv = ["quality_smap.py", "--data", str(tmp_path / "data"), "--work", str(work)]
    argv += ["--spacecraft", "MSL", "--mode", "per_channel", "--epochs", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--jobs", "1", "--json", str(out)])
    quality_smap.main()
    assert torch.get_num_threads() == 1  # --jobs 1: one torch thread, as its help says
    document = json.loads(out.read_text())
    assert document["spacecraft"] == "MSL"
    assert document["published"]["f1"] == 0.793
    assert list(document["channels"]) == ["M-1"]
    assert document["total"]["labeled_sequences"] == 2
    (model,) = work.glob("models/per_channel-*/M-1/model.onnx")
    names = [feature.name for feature in Scorer.load(model).manifest.features]
    assert names == ["value", *(f"cmd_{i}" for i in range(1, 55))]
