"""A running detector serves each promoted model, then the rolled-back one."""

from __future__ import annotations

import pytest
from daemon_support import DaemonProcess, model_version, running, wait_for

from trainer.cli import main
from trainer.promotion import promote


@pytest.mark.kafka
def test_a_running_detector_serves_the_promoted_model_then_the_rolled_back_one(
    kafka_bootstrap, kafka_topic_factory, sensor_model, other_model, tmp_path, capsys
):
    served = tmp_path / "models" / "model.onnx"
    promote(sensor_model, served)
    daemon = DaemonProcess(
        kafka_bootstrap,
        kafka_topic_factory(prefix="promote"),
        served,
        tmp_path,
        settings={"MODEL__RELOAD_INTERVAL_S": "0.2"},
    )

    def serving() -> str | None:
        samples = daemon.metrics()
        return next(
            (
                dict(labels)["model_version"]
                for name, labels in samples
                if name == "seqsentinel_model_info"
            ),
            None,
        )

    with running(daemon):
        daemon.wait_ready()
        assert serving() == model_version(sensor_model)

        promote(other_model, served)
        wait_for(lambda: serving() == model_version(other_model), 90, "the promoted model")
        assert main(["rollback", str(served)]) == 0
        wait_for(lambda: serving() == model_version(sensor_model), 90, "the rolled-back model")
        assert daemon.ready()
        assert daemon.stop() == 0
    assert f"restored model {model_version(sensor_model)}" in capsys.readouterr().out
