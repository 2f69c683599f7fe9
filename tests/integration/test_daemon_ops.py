"""Operating `detector run`: readiness, refusals at start, and hot model reload.

The daemon runs as a real subprocess against the session's broker; the model watcher is
also tested on its own, in process, where its timing can be controlled.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
from daemon_support import (
    DaemonProcess,
    encoded,
    fully_committed,
    model_version,
    read_topic,
    replay_alert_ids,
    running,
    send_events,
    sensor_events,
    wait_for,
)
from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka_support import free_ports

from detector.config import ModelSettings
from detector.contract.model_file import ModelContractError, file_sha256
from detector.ops.http import LIVENESS_TIMEOUT_S, Health, OpsServer
from detector.ops.metrics import Metrics
from detector.ops.model_watch import ModelWatcher, load_scorer
from detector.stream.reader import input_records
from detector.stream.source import InHand


def replace(target: Path, source: Path | bytes) -> None:
    """Replace a file atomically, as the trainer's --promote-to does."""
    partial = target.with_name(f".{target.name}.partial")
    if isinstance(source, bytes):
        partial.write_bytes(source)
    else:
        shutil.copyfile(source, partial)
    partial.replace(target)


def log_order(daemon: DaemonProcess, *events: str) -> list[int]:
    """Index in the daemon's log of the first line with each event."""
    logged = [line["event"] for line in daemon.log_events()]
    return [logged.index(event) for event in events]


def connection_attempts(daemon: DaemonProcess) -> int:
    """How many times the daemon found Kafka unreachable so far."""
    events = [line["event"] for line in daemon.log_events()]
    return events.count("Kafka is not reachable; retrying")


@pytest.mark.kafka
def test_ready_only_once_the_model_is_loaded_and_partitions_are_assigned(
    kafka_bootstrap, kafka_topic_factory, sensor_model, tmp_path
):
    topic = kafka_topic_factory(partitions=3, prefix="ready")
    daemon = DaemonProcess(kafka_bootstrap, topic, sensor_model, tmp_path)
    seen: list[tuple[int, dict]] = []

    def answered_ready() -> bool:
        status, body = daemon.get("/readyz")
        if status:
            seen.append((status, orjson.loads(body)))
        return status == 200

    with running(daemon):
        wait_for(answered_ready, 60, "/readyz to answer 200", every=0.02)
        wait_for(lambda: "ready" in [line["event"] for line in daemon.log_events()], 10, "READY")
        assert daemon.stop() == 0
    assert {status for status, _ in seen} <= {200, 503}
    for status, document in seen:
        assert document["ready"] is (status == 200)
        if status == 503:
            assert document["reason"]
    ready = seen[-1][1]
    assert ready["partitions"] == 3
    assert ready["model_version"] == model_version(sensor_model)
    model, assigned, announced = log_order(daemon, "model loaded", "partitions assigned", "ready")
    assert model < assigned < announced


@pytest.mark.kafka
def test_not_ready_but_alive_while_the_broker_cannot_be_reached_and_no_secret_logged(
    sensor_model, tmp_path
):
    nowhere = f"127.0.0.1:{free_ports(1)[0]}"
    secret = "hunter2-do-not-log"
    sasl = {
        "KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA__SASL_MECHANISM": "PLAIN",
        "KAFKA__SASL_USERNAME": "detector",
        "KAFKA__SASL_PASSWORD": secret,
    }
    daemon = DaemonProcess(nowhere, "events", sensor_model, tmp_path, settings=sasl)
    with running(daemon):
        wait_for(lambda: daemon.get("/readyz")[0] == 503, 90, "/readyz to answer")
        wait_for(lambda: connection_attempts(daemon) >= 2, 30, "a few connection attempts")
        status, body = daemon.get("/readyz")
        assert status == 503
        assert orjson.loads(body)["reason"] == "the Kafka broker is not reachable"
        assert orjson.loads(body)["model_version"] == model_version(sensor_model)
        assert daemon.get("/healthz")[0] == 200
        # It stops cleanly even though nothing can be committed to an absent broker.
        assert daemon.stop() == 0
    starting = next(line for line in daemon.log_events() if line["event"] == "starting")
    assert starting["settings"]["kafka"]["sasl_password"] == "**********"
    assert starting["settings"]["kafka"]["sasl_username"] == "detector"
    assert secret not in daemon.log.read_text()


@pytest.mark.kafka
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing input topic", "does not exist"),
        ("output topics missing, creation off", "kafka.create_topics is off"),
        ("corrupt model", "not an ONNX model"),
    ],
)
def test_start_is_refused_with_a_clear_reason(
    kafka_bootstrap, kafka_topic_factory, sensor_model, tmp_path, case, expected
):
    topic = kafka_topic_factory(prefix="refuse")
    model, settings = sensor_model, {}
    if case == "missing input topic":
        topic = f"{topic}-absent"
    elif case == "output topics missing, creation off":
        settings = {"KAFKA__CREATE_TOPICS": "false"}
    else:
        model = tmp_path / "corrupt.onnx"
        model.write_bytes(b"\x00 this is not a model")
    daemon = DaemonProcess(kafka_bootstrap, topic, model, tmp_path, settings=settings)
    with running(daemon):
        assert daemon.wait(60) == 1
    errors = [line for line in daemon.log_events() if line["level"] == "error"]
    assert errors and expected in errors[-1]["error"], daemon.tail()


@pytest.mark.kafka
def test_sighup_swaps_in_a_new_model_and_a_corrupt_one_is_refused(
    kafka_bootstrap, kafka_topic_factory, sensor_model, other_model, tmp_path
):
    served = tmp_path / "model.onnx"
    shutil.copyfile(sensor_model, served)
    topic = kafka_topic_factory(prefix="reload")
    daemon = DaemonProcess(
        kafka_bootstrap, topic, served, tmp_path, settings={"MODEL__RELOAD_INTERVAL_S": "0"}
    )
    # Each phase brings devices never seen before, so the phase's alerts are what a fresh
    # replay with the model serving it gives.
    phases = [encoded(sensor_events(4, 40, seed=seed, faults=2)) for seed in (21, 22, 23)]

    def run_phase(events: list[bytes], model: Path) -> None:
        expected = replay_alert_ids(model, events)
        assert expected
        before = len(read_topic(kafka_bootstrap, daemon.alerts_topic, timeout=5))
        send_events(kafka_bootstrap, topic, events)
        wait_for(lambda: fully_committed(kafka_bootstrap, daemon.group, topic), 90, "commit")
        alerts = read_topic(kafka_bootstrap, daemon.alerts_topic, before + len(expected))
        new = [message.json() for message in alerts[before:]]
        assert {alert["alert_id"] for alert in new} == expected
        assert {alert["model_version"] for alert in new} == {model_version(model)}

    def reloads(result: str) -> float:
        return daemon.metrics().get(("seqsentinel_model_reloads_total", (("result", result),)), 0)

    def info_version() -> str:
        samples = daemon.metrics()
        return next(
            dict(labels)["model_version"]
            for name, labels in samples
            if name == "seqsentinel_model_info"
        )

    with running(daemon):
        daemon.wait_ready()
        run_phase(phases[0], sensor_model)

        replace(served, other_model)  # no polling (see the watcher's own test): waits for SIGHUP
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: info_version() == model_version(other_model), 90, "the new model")
        assert reloads("loaded") == 1
        run_phase(phases[1], other_model)

        replace(served, b"\x08\x07 truncated protobuf")
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: reloads("refused") == 1, 90, "the corrupt model to be refused")
        assert info_version() == model_version(other_model)
        assert daemon.ready()
        run_phase(phases[2], other_model)
        assert daemon.stop() == 0
    events = [line["event"] for line in daemon.log_events()]
    assert "new model file refused; the serving model stays" in events


def test_watcher_loads_a_changed_file_once_and_keeps_serving_on_a_bad_one(
    sensor_model, other_model, tmp_path
):
    served = tmp_path / "model.onnx"
    shutil.copyfile(sensor_model, served)
    refused: list[str] = []
    settings = ModelSettings(path=served, providers=["CPUExecutionProvider"])
    watcher = ModelWatcher(settings, model_version(sensor_model), refused.append)
    watcher.check()
    assert watcher.take() is None  # unchanged file: nothing to load
    replace(served, other_model)
    watcher.check()
    scorer = watcher.take()
    assert scorer is not None and scorer.manifest.model_version == model_version(other_model)
    watcher.check()
    assert watcher.take() is None  # loaded once, not at every check

    replace(served, b"not a model")
    watcher.check()
    assert len(refused) == 1 and "not an ONNX model" in refused[0]
    replace(served, other_model)  # touched again, same version as the serving one
    watcher.check()
    assert watcher.take() is None and len(refused) == 1


def test_a_watcher_without_an_interval_checks_only_when_asked(sensor_model, other_model, tmp_path):
    served = tmp_path / "model.onnx"
    shutil.copyfile(sensor_model, served)
    polled = ModelSettings(path=served, providers=["CPUExecutionProvider"], reload_interval_s=5)
    assert ModelWatcher(polled, model_version(sensor_model), print).interval == 5
    settings = polled.model_copy(update={"reload_interval_s": 0})
    watcher = ModelWatcher(settings, model_version(sensor_model), print)
    assert watcher.interval is None  # the watcher's thread waits for `request()` alone
    watcher.request()
    replace(served, other_model)
    watcher.check()
    assert watcher.take().manifest.model_version == model_version(other_model)


def test_allow_list_admits_only_listed_model_files(sensor_model, other_model):
    allowed = [file_sha256(sensor_model)]
    settings = ModelSettings(path=sensor_model, providers=["CPUExecutionProvider"])
    assert load_scorer(settings.model_copy(update={"allowed_sha256": allowed})).manifest
    with pytest.raises(ModelContractError, match=r"not in model\.allowed_sha256"):
        load_scorer(settings.model_copy(update={"path": other_model, "allowed_sha256": allowed}))


@pytest.mark.kafka
def test_systemd_hears_ready_watchdog_status_and_stopping(
    kafka_bootstrap, kafka_topic_factory, sensor_model, tmp_path
):
    address = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(address))
        listener.settimeout(0.2)
        topic = kafka_topic_factory(prefix="systemd")
        daemon = DaemonProcess(
            kafka_bootstrap,
            topic,
            sensor_model,
            tmp_path,
            env={"NOTIFY_SOCKET": str(address), "WATCHDOG_USEC": "1000000"},
        )
        heard: list[str] = []

        def hear(message: str, since: int = 0) -> bool:
            """Receive what comes; whether `message` was heard at position `since` or later."""
            with contextlib.suppress(TimeoutError):
                heard.extend(listener.recv(4096).decode().splitlines())
            return message in heard[since:]

        with running(daemon):
            wait_for(lambda: hear("READY=1"), 60, "READY=1")
            assert daemon.ready()
            ready_at = heard.index("READY=1")
            wait_for(lambda: hear("WATCHDOG=1", ready_at), 5, "WATCHDOG=1 (every 0.5 s)")
            assert daemon.stop() == 0
        wait_for(lambda: hear("STOPPING=1"), 5, "STOPPING=1")
    statuses = [line for line in heard if line.startswith("STATUS=")]
    assert statuses and all(f"model {model_version(sensor_model)}" in line for line in statuses)
    assert heard.index("STOPPING=1") > ready_at


def test_in_hand_keys_records_by_the_message_key_unless_a_field_names_it():
    partition = TopicPartition("events", 2)
    messages = [
        ConsumerRecord("events", 2, 0, offset, 0, 0, key, b"{}", [], None, 0, 2, 0)
        for offset, key in ((7, b"dev-1"), (8, None), (9, b"dev-\xff"))
    ]
    keyed, by_field = InHand(), InHand()
    keyed.add([(partition, input_records(partition, messages, keyed=True))])
    by_field.add([(partition, input_records(partition, messages, keyed=False))])
    assert [record.key for record in keyed.records] == ["dev-1", None, "dev-\ufffd"]
    assert [record.key for record in by_field.records] == [None, None, None]
    assert [record.source.offset for record in keyed.records] == [7, 8, 9]
    assert keyed.polled == {partition: 10}  # the next offset to commit
    keyed.drop([partition])
    assert (keyed.records, keyed.polled, keyed.runs) == ([], {}, [])


def test_probes_answer_from_the_loop_health_and_metrics_render():
    health, metrics = Health(), Metrics()
    server = OpsServer("127.0.0.1", free_ports(1)[0], health, metrics)
    server.start()

    def get(path: str) -> tuple[int, dict | bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}") as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        return status, body if path == "/metrics" else orjson.loads(body)

    try:
        assert get("/healthz")[0] == 503  # the loop has not come round yet
        health.beat()
        assert get("/healthz") == (
            200,
            {"alive": True, "seconds_since_loop": pytest.approx(0, abs=1)},
        )
        reasons = []
        for change in ("model_loaded", "broker_reachable", "partitions"):
            status, document = get("/readyz")
            assert status == 503 and document["ready"] is False
            reasons.append(document["reason"])
            setattr(health, change, 2 if change == "partitions" else True)
        assert reasons == [
            "the model is not loaded yet",
            "the Kafka broker is not reachable",
            "no partitions are assigned to this consumer",
        ]
        assert get("/readyz") == (200, {"ready": True, "model_version": None, "partitions": 2})
        health.last_loop -= LIVENESS_TIMEOUT_S + 1
        assert get("/healthz")[0] == 503
        metrics.records.labels("scored").inc(3)
        status, text = get("/metrics")
        assert status == 200 and b'seqsentinel_records_total{outcome="scored"} 3.0' in text
        assert get("/nope")[0] == 404
    finally:
        server.stop()
