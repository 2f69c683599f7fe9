"""Hostile input through the real daemon: over ten thousand fuzzed payloads, mixed with good
records, and the daemon neither crashes nor loses count.

The fuzzer is seeded: each payload is a good record broken in one of many ways (invalid
UTF-8, truncation, deep nesting, numbers beyond a double, NaN and Infinity tokens, wrong
types, missing or empty keys, oversized records, NUL bytes, tombstones, non-objects). Good
records are sometimes odd but valid: duplicate fields (the last one counts, as in every
mainstream JSON parser), unknown fields, huge finite numbers, integer keys.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path

import orjson
import pytest
from daemon_support import (
    KEY,
    START,
    TIME,
    DaemonProcess,
    fully_committed,
    read_topic,
    running,
    send,
    sensor_events,
    wait_for,
)

from detector.engine.core import Engine, Status
from detector.engine.records import InputRecord
from detector.engine.scorer import Scorer
from detector.stream.messages import MAX_DEAD_LETTER_BYTES

DEVICES, PER_DEVICE = 20, 200
BAD = 6_500
MAX_RECORD_BYTES = 65_536
MIN_HISTORY = 4  # the sensor model's
REASONS = (
    "not_json",
    "not_object",
    "too_large",
    "wrong_type",
    "missing_key",
    "missing_feature",
    "bad_timestamp",
    "not_finite",
)


Payload = tuple[bytes | None, bytes | None]  # (Kafka key, value)


def _splice(rng: random.Random, value: bytes, junk: bytes) -> bytes:
    at = rng.randrange(len(value))
    return value[:at] + junk + value[at:]


def _field(event: dict, name: str, raw: bytes) -> bytes:
    """`event` as JSON with field `name` written as the raw bytes `raw` (any token at all)."""
    rest = orjson.dumps({k: v for k, v in event.items() if k != name})
    return b'{"' + name.encode() + b'":' + raw + b"," + rest[1:]


def breakers(rng: random.Random) -> list[Callable[[dict], Payload]]:
    """Ways to break a good event; each gives a payload the contract refuses."""

    def key(event: dict) -> bytes:
        return event[KEY].encode()

    def feature() -> str:
        return rng.choice(["temperature", "vibration"])

    def deep() -> int:  # nesting that is a wrong type, or beyond the parser's depth limit
        return rng.choice([rng.randint(2, 50), rng.randint(1025, 4000)])

    return [
        lambda e: (key(e), _splice(rng, orjson.dumps(e), bytes([rng.randint(0x80, 0xFF)]))),
        lambda e: (key(e), orjson.dumps(e)[: rng.randrange(1, len(orjson.dumps(e)))]),
        lambda e: (key(e), _field(e, feature(), b"[" * (n := deep()) + b"]" * n)),
        lambda e: (key(e), _field(e, feature(), b'{"a":' * (n := deep()) + b"1" + b"}" * n)),
        lambda e: (key(e), _field(e, feature(), rng.choice([b"1e400", b"-1e999", b"9" * 400]))),
        lambda e: (key(e), _field(e, feature(), rng.choice([b"NaN", b"Infinity", b"-Infinity"]))),
        # Finite as a double, not in the float32 the model computes in:
        lambda e: (
            key(e),
            _field(e, feature(), rng.choice([b"-1e300", b"4e38", b"1" + b"0" * 60])),
        ),
        lambda e: (key(e), _field(e, feature(), rng.choice([b'"hot"', b"true", b"{}", b"[]"]))),
        lambda e: (key(e), _field(e, feature(), b"null")),
        lambda e: (
            key(e),
            _field(e, TIME, rng.choice([b'"yesterday"', b"false", b"[]", b"1e300"])),
        ),
        lambda e: (None, orjson.dumps({k: v for k, v in e.items() if k != KEY})),
        lambda e: (rng.choice([None, b""]), _field(e, KEY, rng.choice([b'""', b"null", b"[]"]))),
        lambda e: (key(e), orjson.dumps(e | {"pad": "x" * rng.randint(MAX_RECORD_BYTES, 200_000)})),
        lambda e: (key(e), _splice(rng, orjson.dumps(e), b"\x00")),
        lambda e: (key(e), rng.choice([b"", b"null", b"42", b'"text"', b"[1, 2]", b" "])),
        lambda e: (key(e), None),  # a tombstone
    ]


def oddly_valid(rng: random.Random, event: dict) -> Payload:
    """A good event written in a way that is unusual but valid."""
    choice = rng.randrange(5)
    value = orjson.dumps(event)
    if choice == 0:  # a duplicate field: the last one counts
        value = _field(event, "temperature", b'"ignored"')[:-1] + b',"temperature":'
        value += orjson.dumps(event["temperature"]) + b"}"
    elif choice == 1:
        value = orjson.dumps(event | {"note": "ünïcødé ✓", "nested": {"a": [1, None]}})
    elif choice == 2:
        value = _field(event, "vibration", rng.choice([b"1e29", b"-3e38", b"1" + b"0" * 25]))
    elif choice == 3:  # the key from the record (an integer there) instead of the message
        return None, orjson.dumps(event | {KEY: int(event[KEY].rsplit("-", 1)[1]) + 10_000})
    return event[KEY].encode(), value


def fuzzed(seed: int) -> tuple[list[Payload], list[bool]]:
    """Good and broken payloads interleaved (each device's good events in order), and which
    are good."""
    rng = random.Random(seed)
    good = sensor_events(DEVICES, PER_DEVICE, seed=seed)
    broken_by = breakers(rng)
    payloads = [(p, True) for p in (oddly_valid(rng, e) for e in good)]
    payloads += [(rng.choice(broken_by)(rng.choice(good)), False) for _ in range(BAD)]
    positions = sorted(rng.sample(range(len(payloads)), BAD))  # where the broken ones go
    merged, good_iter, bad_iter = [], iter(payloads[: len(good)]), iter(payloads[len(good) :])
    taken = set(positions)
    for i in range(len(payloads)):
        merged.append(next(bad_iter) if i in taken else next(good_iter))
    return [p for p, _ in merged], [ok for _, ok in merged]


@pytest.mark.parametrize("value", [4e38, -1e300, 1e29, -3e38])
def test_huge_numbers_are_judged_alike_in_plain_batches_and_record_by_record(
    sensor_model: Path, value: float
) -> None:
    """A batch of plain numeric records takes the engine's bulk path; one odd record in it
    sends it record by record. Either way a number beyond float32 is a dead letter."""
    scorer = Scorer.load(sensor_model, providers=["CPUExecutionProvider"])
    events = [{KEY: "d", TIME: START + i, "temperature": 20.0, "vibration": 5.0} for i in range(6)]
    events[4]["temperature"] = value
    plain = [InputRecord(orjson.dumps(e)) for e in events]
    mixed = [*plain, InputRecord(b"{not json")]
    outcomes = [Engine(scorer).process(batch) for batch in (plain, mixed)]
    beyond = abs(value) > 3.4028234e38
    for result in outcomes:
        reasons = [d.reason for d in result.dead_letters if d.reason != "not_json"]
        assert reasons == (["not_finite"] if beyond else [])
        assert result.statuses[4] == (Status.DEAD_LETTER if beyond else Status.SCORED)


@pytest.mark.slow
def test_fuzzed_payloads_are_dead_letters_and_the_good_ones_are_scored(
    kafka_bootstrap, kafka_topic_factory, sensor_model, tmp_path, kafka_client
):
    payloads, good = fuzzed(seed=3)
    payloads.append((b"near-the-broker-limit", b'{"x": "' + b"y" * 1_000_000 + b'"}'))
    good.append(False)
    assert len(payloads) >= 10_000
    bad_values = [
        (value or b"")[:MAX_DEAD_LETTER_BYTES]
        for (_, value), ok in zip(payloads, good, strict=True)
        if not ok
    ]
    topic = kafka_topic_factory(partitions=1, prefix="hostile")
    send(kafka_bootstrap, topic, [v for _, v in payloads], [k for k, _ in payloads])
    daemon = DaemonProcess(kafka_bootstrap, topic, sensor_model, tmp_path, client=kafka_client)
    with running(daemon):
        daemon.wait_ready()
        committed = partial(fully_committed, kafka_bootstrap, daemon.group, topic)
        wait_for(committed, 120, f"every record to be committed:\n{daemon.tail()}")
        metrics = daemon.metrics()
        assert daemon.stop() == 0, daemon.tail()

    outcome = {
        name: metrics[("seqsentinel_records_total", (("outcome", name),))]
        for name in ("scored", "warming_up", "dead_letter", "skipped")
    }
    assert sum(outcome.values()) == len(payloads)
    assert outcome["dead_letter"] == len(bad_values)
    assert outcome["skipped"] == 0
    # Each device's key, and its integer-keyed twin, warms up once.
    assert DEVICES * (MIN_HISTORY - 1) <= outcome["warming_up"] <= 2 * DEVICES * (MIN_HISTORY - 1)
    assert outcome["scored"] + outcome["warming_up"] == sum(good)

    dead = read_topic(kafka_bootstrap, daemon.dead_letters_topic, len(bad_values), timeout=60)
    assert all(m.headers["reason"] and m.headers["detail"] for m in dead)
    assert collections.Counter(m.value for m in dead) == collections.Counter(bad_values)
    truncated = [m for m in dead if "truncated_from" in m.headers]
    assert [int(m.headers["truncated_from"]) for m in truncated] == [len(payloads[-1][1])]
    reasons = collections.Counter(m.headers["reason"].decode() for m in dead)
    assert set(reasons) == set(REASONS), reasons
