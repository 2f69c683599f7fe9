"""Key state survives a restart of `detector run`: its successor restores each partition from
the state topic (or, without a snapshot, replays the retained input as state only) and raises
the very alerts, with the very ids, of one uninterrupted replay."""

from __future__ import annotations

from functools import partial

import pytest
from daemon_support import (
    DaemonProcess,
    encoded,
    fully_committed,
    group_offsets,
    read_topic,
    replay_alert_ids,
    running,
    send_events,
    sensor_events,
    wait_for,
)
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata
from kafka_support import client_config

from detector.engine.core import EngineOptions
from detector.engine.scorer import Scorer
from detector.files.replay import replay_records


@pytest.mark.kafka
def test_a_restarted_daemon_continues_every_key_exactly(
    kafka_bootstrap, kafka_topic_factory, sensor_model, tmp_path
):
    """Stopped after half the stream and started again: the successor restores each
    partition's keys from the state topic, so the alerts of the second half carry the ids
    (sequence numbers included) of an uninterrupted run, and none is raised twice."""
    topic = kafka_topic_factory(partitions=2, prefix="restart")
    good = encoded(sensor_events(6, 60, seed=7, faults=3))
    expected = replay_alert_ids(sensor_model, good)
    settings = {"PROCESSING__SNAPSHOT_INTERVAL_S": "0.5"}
    halves = good[:170], good[170:]
    for number, half in enumerate(halves):
        send_events(kafka_bootstrap, topic, half)
        daemon = DaemonProcess(kafka_bootstrap, topic, sensor_model, tmp_path, settings)
        with running(daemon):
            daemon.wait_ready()
            committed = partial(fully_committed, kafka_bootstrap, daemon.group, topic)
            wait_for(committed, 60, "the commit")
            metrics = daemon.metrics()
            assert daemon.stop() == 0, daemon.tail()
        restored = [e for e in daemon.log_events() if e["event"] == "key state restored"]
        assert {e["snapshot"] for e in restored} == ({"absent"} if number == 0 else {"ok"})
        assert metrics[("seqsentinel_restoring_partitions", ())] == 0
    assert metrics[("seqsentinel_restore_replayed_records_total", ())] == 0  # all in snapshots
    assert metrics[("seqsentinel_active_keys", ())] == 6
    ids = [m.json()["alert_id"] for m in read_topic(kafka_bootstrap, daemon.alerts_topic)]
    assert expected and sorted(ids) == sorted(expected)
    state = read_topic(kafka_bootstrap, f"{daemon.group}-state")
    assert {m.key for m in state} >= {f"{topic}/0".encode(), f"{topic}/1".encode()}


@pytest.mark.kafka
def test_without_a_snapshot_the_retained_input_is_replayed_as_state_only(
    kafka_bootstrap, kafka_topic_factory, sensor_model, tmp_path
):
    """A group that committed offsets but left no snapshot (a state topic lost, or a model
    with another layout): the partition is replayed from its beginning up to the commit with
    no alert published, and what follows is scored as if the daemon had never stopped."""
    topic = kafka_topic_factory(partitions=1, prefix="cold")
    good = encoded(sensor_events(6, 60, seed=7, faults=3))
    first = 200
    send_events(kafka_bootstrap, topic, good[:first])
    daemon = DaemonProcess(kafka_bootstrap, topic, sensor_model, tmp_path)
    commit_group(kafka_bootstrap, daemon.group, TopicPartition(topic, 0), first)
    scorer = Scorer.load(sensor_model, providers=["CPUExecutionProvider"])
    alerts = replay_records(good, scorer, EngineOptions()).alerts
    expected = sorted(a.alert_id for a in alerts if a.source.row >= first)
    assert expected and len(expected) < len(alerts)  # some alerts are in the replayed part
    with running(daemon):
        daemon.wait_ready()
        send_events(kafka_bootstrap, topic, good[first:])
        committed = partial(fully_committed, kafka_bootstrap, daemon.group, topic)
        wait_for(committed, 60, "the commit")
        metrics = daemon.metrics()
        assert daemon.stop() == 0, daemon.tail()
    assert group_offsets(kafka_bootstrap, daemon.group, topic)[0] == {0: len(good)}
    assert metrics[("seqsentinel_restore_replayed_records_total", ())] == first
    assert metrics[("seqsentinel_restore_seconds_count", (("snapshot", "absent"),))] == 1
    events = [e["event"] for e in daemon.log_events()]
    assert events.index("key state restored") < events.index("ready")
    ids = [m.json()["alert_id"] for m in read_topic(kafka_bootstrap, daemon.alerts_topic)]
    assert sorted(ids) == expected


def commit_group(bootstrap: str, group: str, partition: TopicPartition, offset: int) -> None:
    consumer = KafkaConsumer(**client_config(bootstrap), group_id=group, enable_auto_commit=False)
    try:
        consumer.assign([partition])
        consumer.commit({partition: OffsetAndMetadata(offset, "", -1)})
    finally:
        consumer.close()
