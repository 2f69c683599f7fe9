"""Promotion and rollback of the model in service: atomic and lossless, each a new file for
the watcher (a running detector serving them: tests/integration/test_promotion_on_kafka.py)."""

from __future__ import annotations

import os

import pytest
from daemon_support import model_version

from detector.config import ModelSettings
from detector.contract.model_file import ModelContractError
from detector.ops.model_watch import ModelWatcher, fingerprint
from trainer.cli import main
from trainer.promotion import PromotionError, previous_path, promote, rollback


def test_promotions_keep_the_previous_model_and_rollback_restores_its_exact_bytes(
    sensor_model, other_model, tmp_path
):
    target = tmp_path / "models" / "model.onnx"
    first, second = sensor_model.read_bytes(), other_model.read_bytes()

    promoted = promote(sensor_model, target)
    assert (target.read_bytes(), promoted.previous) == (first, None)
    assert not previous_path(target).exists()
    target.chmod(0o644)

    promoted = promote(other_model, target)
    assert promoted.model_version == model_version(other_model)
    assert promoted.previous == previous_path(target) == target.with_name("model.onnx.previous")
    assert (target.read_bytes(), promoted.previous.read_bytes()) == (second, first)
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)  # readers keep their access
    assert sorted(path.name for path in target.parent.iterdir()) == [
        ".model.onnx.lock",
        "model.onnx",
        "model.onnx.previous",
    ]

    restored = rollback(target)
    assert restored.model_version == model_version(sensor_model)
    assert (target.read_bytes(), previous_path(target).read_bytes()) == (first, second)
    rollback(target)  # a rollback can be undone
    assert (target.read_bytes(), previous_path(target).read_bytes()) == (second, first)


def test_each_promotion_and_rollback_is_a_new_file_the_watcher_loads(
    sensor_model, other_model, tmp_path
):
    target = tmp_path / "model.onnx"
    promote(sensor_model, target)
    settings = ModelSettings(path=target, providers=["CPUExecutionProvider"])
    watcher = ModelWatcher(settings, model_version(sensor_model), on_refused=pytest.fail)

    before = fingerprint(target)
    promote(other_model, target)
    assert fingerprint(target)[0] != before[0]  # a rename: a new inode
    watcher.check()
    assert watcher.take().manifest.model_version == model_version(other_model)

    rollback(target)
    watcher.check()
    assert watcher.take().manifest.model_version == model_version(sensor_model)


def test_a_refused_candidate_or_a_missing_previous_leaves_the_model_in_service(
    sensor_model, tmp_path, capsys
):
    target = tmp_path / "model.onnx"
    promote(sensor_model, target)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(sensor_model.read_bytes()[:-100])

    with pytest.raises(ModelContractError):
        promote(corrupt, target)
    with pytest.raises(PromotionError, match="no previous model"):
        rollback(target)
    assert main(["rollback", str(target)]) == 2
    assert "no previous model" in capsys.readouterr().err
    assert target.read_bytes() == sensor_model.read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        ".model.onnx.lock",
        "corrupt.onnx",
        "model.onnx",
    ]


def test_a_write_that_fails_leaves_the_model_in_service_and_no_partial_file(
    sensor_model, other_model, tmp_path, monkeypatch
):
    target = tmp_path / "model.onnx"
    promote(sensor_model, target)

    def disk_full(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        promote(other_model, target)

    assert target.read_bytes() == sensor_model.read_bytes()
    assert not list(tmp_path.glob("*.partial"))
