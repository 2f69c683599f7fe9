"""Faults around a running daemon: members joining and leaving its group mid-stream, and a
flood of unique keys far beyond `state.max_keys`.

A broker outage mid-stream is `test_daemon.py::test_broker_outage_mid_stream_loses_no_alert`;
SIGKILLs at random moments are `test_exactly_once.py`.
"""

from __future__ import annotations

import threading
import time
from functools import partial
from pathlib import Path

import pytest
from daemon_support import (
    KEY,
    START,
    TIME,
    DaemonProcess,
    encoded,
    fully_committed,
    read_topic,
    replay_alert_ids,
    running,
    send,
    send_events,
    sensor_events,
    wait_for,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

FLOOD_KEYS = 120_000
MAX_KEYS = 1_000
#: What 100,000 keys kept would add at the least (about 300 bytes of state, key and index
#: each) is three times this; a bounded arena adds nothing once full.
RSS_GROWTH_LIMIT = 10 * 1024 * 1024


def test_members_joining_and_leaving_mid_stream_raise_exactly_the_uninterrupted_alerts(
    kafka_bootstrap, kafka_topic_factory, sensor_model, tmp_path, kafka_client
):
    """Two members share four partitions, a third joins, the first leaves: every partition
    that moves takes its keys' state with it (snapshot at revocation, restore at assignment),
    so the union of the alerts is that of one uninterrupted run."""
    topic = kafka_topic_factory(partitions=4, prefix="churn")
    events = encoded(sensor_events(8, 60, seed=11, faults=4))
    expected = replay_alert_ids(sensor_model, events)
    chunks = [events[i : i + 24] for i in range(0, len(events), 24)]

    def stream() -> None:
        for chunk in chunks:
            send_events(kafka_bootstrap, topic, chunk)
            time.sleep(0.7)

    start = partial(DaemonProcess, kafka_bootstrap, topic, sensor_model, tmp_path)
    members = [start(client=kafka_client) for _ in range(3)]
    first, second, third = members
    sender = threading.Thread(target=stream)
    with running(first), running(second):
        first.wait_ready()
        second.wait_ready()
        sender.start()
        time.sleep(4)
        with running(third):
            third.wait_ready()
            assert first.stop() == 0, first.tail()
            sender.join()
            committed = partial(fully_committed, kafka_bootstrap, first.group, topic)
            wait_for(committed, 60, "the commit of every record")
            replayed = sum(
                d.metrics()[("seqsentinel_restore_replayed_records_total", ())]
                for d in (second, third)
            )
            assert third.stop() == 0, third.tail()
        assert second.stop() == 0, second.tail()
    restores = [e for m in members for e in m.log_events() if e["event"] == "key state restored"]
    assert {e["snapshot"] for e in restores} >= {"ok"}  # partitions moved with their state
    assert replayed == 0  # each revocation saved the state at the committed offset
    ids = [m.json()["alert_id"] for m in read_topic(kafka_bootstrap, first.alerts_topic)]
    assert expected and set(ids) == expected


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_flood_of_unique_keys_is_evicted_and_memory_stays_bounded(
    kafka_bootstrap, kafka_topic_factory, sensor_model, tmp_path
):
    topic = kafka_topic_factory(partitions=1, prefix="flood")
    keys = [f"flood-{i:07d}" for i in range(FLOOD_KEYS)]
    flood = encoded(
        {KEY: key, TIME: START + i, "temperature": 20.0 + i % 7, "vibration": 5.0}
        for i, key in enumerate(keys)
    )
    keys = [key.encode() for key in keys]
    settings = {"STATE__MAX_KEYS": str(MAX_KEYS), "BATCHING__MAX_BATCH": "1000"}
    daemon = DaemonProcess(kafka_bootstrap, topic, sensor_model, tmp_path, settings)
    warm = 20_000
    with running(daemon):
        daemon.wait_ready()
        send(kafka_bootstrap, topic, flood[:warm], keys[:warm])
        committed = partial(fully_committed, kafka_bootstrap, daemon.group, topic)
        wait_for(committed, 60, "the first keys")
        before = rss_bytes(daemon.process.pid)
        send(kafka_bootstrap, topic, flood[warm:], keys[warm:])
        wait_for(committed, 120, "the flood")
        after = rss_bytes(daemon.process.pid)
        metrics = daemon.metrics()
        assert daemon.stop() == 0, daemon.tail()
    assert after - before < RSS_GROWTH_LIMIT, (before, after)
    assert metrics[("seqsentinel_active_keys", ())] == MAX_KEYS
    assert metrics[("seqsentinel_evicted_keys_total", (("reason", "lru"),))] == (
        FLOOD_KEYS - MAX_KEYS
    )
    warming = metrics[("seqsentinel_records_total", (("outcome", "warming_up"),))]
    assert warming == FLOOD_KEYS  # every key was new: one warming-up event each
