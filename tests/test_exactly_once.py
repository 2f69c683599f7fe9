"""Delivery guarantees under SIGKILL: the daemon is killed at random moments ten times while a
stream arrives, and started again each time.

exactly_once: a read_committed consumer of the alerts topic sees every alert of an
uninterrupted run exactly once. at_least_once: none is missing (repeats carry the same id).
Both: no alert that an uninterrupted run would not raise, since the key state is restored.
"""

from __future__ import annotations

import collections
import random
import threading
import time
from functools import partial
from pathlib import Path

import pytest
from daemon_support import (
    DaemonProcess,
    encoded,
    fully_committed,
    read_topic,
    replay_alert_ids,
    running,
    send_events,
    sensor_events,
    wait_for,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

KILLS = 10
#: Small batches and frequent snapshots: many transactions and snapshots to be killed in.
SETTINGS = {
    "BATCHING__MAX_BATCH": "16",
    "PROCESSING__SNAPSHOT_INTERVAL_S": "0.5",
    "KAFKA__SESSION_TIMEOUT_MS": "6000",  # the broker's minimum: a killed member leaves soon
}


def killed_repeatedly(
    bootstrap: str, topic: str, model: Path, folder: Path, settings: dict[str, str], seed: int
) -> tuple[list[str], set[str]]:
    """Stream faulty sensor events into `topic` while daemons are SIGKILLed at random
    moments (starting, restoring, or in the middle of batches); then one more daemon runs
    until everything is committed. The alert ids published, and those of a replay."""
    events = encoded(sensor_events(6, 60, seed=7, faults=3))
    rng = random.Random(seed)

    def stream() -> None:
        for start in range(0, len(events), 8):
            send_events(bootstrap, topic, events[start : start + 8])
            time.sleep(0.6)

    sender = threading.Thread(target=stream)
    sender.start()
    kills = []
    for _ in range(KILLS):
        with running(DaemonProcess(bootstrap, topic, model, folder, settings)) as daemon:
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0.5, 3.0))
            else:
                daemon.wait_ready()
                time.sleep(rng.uniform(0.0, 1.5))
            daemon.kill()  # SIGKILL
            kills.append(daemon.process.returncode)
    sender.join()
    assert kills == [-9] * KILLS
    with running(DaemonProcess(bootstrap, topic, model, folder, settings)) as daemon:
        daemon.wait_ready()
        committed = partial(fully_committed, bootstrap, daemon.group, topic)
        wait_for(committed, 90, f"the last daemon to commit everything:\n{daemon.tail()}")
        assert daemon.stop() == 0, daemon.tail()
    restored = [e for e in daemon.log_events() if e["event"] == "key state restored"]
    assert restored and all(e["snapshot"] == "ok" for e in restored), restored
    messages = read_topic(bootstrap, daemon.alerts_topic, isolation_level="read_committed")
    return [m.json()["alert_id"] for m in messages], replay_alert_ids(model, events)


def test_exactly_once_alerts_survive_ten_sigkills(
    kafka_bootstrap, kafka_topic_factory, sensor_model, tmp_path
):
    topic = kafka_topic_factory(partitions=2, prefix="eos")
    settings = SETTINGS | {
        "PROCESSING__GUARANTEE": "exactly_once",
        "PROCESSING__TRANSACTIONAL_ID": f"{topic}-instance-0",
    }
    ids, expected = killed_repeatedly(
        kafka_bootstrap, topic, sensor_model, tmp_path, settings, seed=1
    )
    assert expected
    assert collections.Counter(ids) == {alert_id: 1 for alert_id in expected}


def test_at_least_once_alerts_survive_ten_sigkills(
    kafka_bootstrap, kafka_topic_factory, sensor_model, tmp_path
):
    topic = kafka_topic_factory(partitions=2, prefix="alo")
    ids, expected = killed_repeatedly(
        kafka_bootstrap, topic, sensor_model, tmp_path, SETTINGS, seed=2
    )
    assert expected
    assert set(ids) == expected  # none missing, and none a restarted key would not raise
    # Repeats are at most the batch in flight at each kill (published, not yet committed).
    assert len(ids) - len(expected) <= KILLS * int(SETTINGS["BATCHING__MAX_BATCH"])


def test_a_zombie_with_the_same_transactional_id_is_fenced(
    kafka_bootstrap, kafka_topic_factory, sensor_model, tmp_path
):
    """A second instance started with the first one's transactional id (a restart while the
    old process still runs) fences the first: its next transaction is refused, it stops, and
    the alerts are still read exactly once."""
    topic = kafka_topic_factory(partitions=2, prefix="zombie")
    events = encoded(sensor_events(6, 60, seed=7, faults=3))
    settings = SETTINGS | {
        "PROCESSING__GUARANTEE": "exactly_once",
        "PROCESSING__TRANSACTIONAL_ID": f"{topic}-instance-0",
    }
    zombie = DaemonProcess(kafka_bootstrap, topic, sensor_model, tmp_path, settings)
    successor = DaemonProcess(kafka_bootstrap, topic, sensor_model, tmp_path, settings)
    with running(zombie):
        zombie.wait_ready()
        send_events(kafka_bootstrap, topic, events[:150])
        with running(successor):
            send_events(kafka_bootstrap, topic, events[150:])
            assert zombie.wait(60) == 1, zombie.tail()
            successor.wait_ready()
            committed = partial(fully_committed, kafka_bootstrap, successor.group, topic)
            wait_for(committed, 60, f"the successor to commit everything:\n{successor.tail()}")
            assert successor.stop() == 0, successor.tail()
    logged = [e["event"] for e in zombie.log_events()]
    assert "another instance took over this transactional id; stopping" in logged
    messages = read_topic(kafka_bootstrap, successor.alerts_topic, isolation_level="read_committed")
    expected = replay_alert_ids(sensor_model, events)
    assert collections.Counter(m.json()["alert_id"] for m in messages) == dict.fromkeys(expected, 1)
