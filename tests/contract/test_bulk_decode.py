"""The engine's bulk decoding gives exactly what `FeatureCodec.decode` gives, or declines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from model_factory import KEY, TIME, load_random, make_manifest

from detector.contract import bulk_decode
from detector.contract.bulk_decode import BulkDecoder
from detector.contract.features import FeatureCodec, RecordError, parse_json_record
from detector.contract.manifest import Columns, NumericFeature, TimeDeltaFeature
from detector.engine.core import Engine, EngineOptions
from detector.engine.records import InputRecord

NAMES = ("amount", "items")
LIMIT = 65536


def numeric_manifest(time_unit: str = "s", **changes):
    features = [
        NumericFeature(name="amount", mean=50.0, std=20.0),
        NumericFeature(name="items", mean=2.0, std=1.5, missing="mean"),
        TimeDeltaFeature(mean=1.0, std=0.5),
    ]
    manifest = make_manifest(features=features, **changes)
    columns = manifest.columns.model_copy(update={"time_unit": time_unit})
    return manifest.model_copy(update={"columns": columns})


def one_by_one(codec: FeatureCodec, records: list[InputRecord]):
    """(keys in order of first appearance, key ids, times, raw) the codec's way."""
    ids: dict[str, int] = {}
    decoded = [
        codec.decode(
            parse_json_record(r.payload, LIMIT) if isinstance(r.payload, bytes) else r.payload,
            r.key,
        )
        for r in records
    ]
    key_ids = [ids.setdefault(event.key, len(ids)) for event in decoded]
    times = np.array([event.time for event in decoded])
    return list(ids), key_ids, times, np.array([event.values for event in decoded])


def records_of(documents: list[dict], kafka_keys: bool = False) -> list[InputRecord]:
    return [
        InputRecord(orjson.dumps(d), f"k-{d.get(KEY)}" if kafka_keys else None) for d in documents
    ]


@pytest.mark.parametrize("time_unit", ["s", "ms"])
@pytest.mark.parametrize("kafka_keys", [False, True])
def test_a_plain_batch_decodes_as_the_codec_does(time_unit: str, kafka_keys: bool) -> None:
    codec = FeatureCodec(numeric_manifest(time_unit))
    rng = np.random.default_rng(3)
    documents = [
        {KEY: f"acct-{k}", TIME: t, "amount": a, "items": int(i)}
        for k, t, a, i in zip(
            rng.integers(0, 20, 300).tolist(),
            (1_700_000_000 + rng.uniform(0, 1e5, 300)).tolist(),
            rng.normal(50, 20, 300).tolist(),
            rng.integers(0, 9, 300).tolist(),
            strict=True,
        )
    ]
    if time_unit == "ms":
        for document in documents:
            document[TIME] = int(document[TIME] * 1000)
    records = records_of(documents, kafka_keys)
    plain = BulkDecoder(codec).decode(records, LIMIT)
    assert plain is not None
    keys, key_ids, times, raw = one_by_one(codec, records)
    assert plain.keys == keys
    assert plain.key_ids.tolist() == key_ids
    np.testing.assert_array_equal(plain.times, times)
    np.testing.assert_array_equal(plain.raw, raw)


ODD_VALUES = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.just([1.0]),
)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {KEY: st.sampled_from(["a", "b", "", 7]), TIME: ODD_VALUES, "amount": ODD_VALUES},
            optional={"items": ODD_VALUES},
        ),
        min_size=1,
        max_size=6,
    )
)
def test_any_batch_is_decoded_as_the_codec_does_or_declined(documents: list[dict]) -> None:
    codec = FeatureCodec(numeric_manifest())
    records = [InputRecord(orjson.dumps(d, option=orjson.OPT_NON_STR_KEYS)) for d in documents]
    plain = BulkDecoder(codec).decode(records, LIMIT)
    try:
        expected = one_by_one(codec, records)
    except RecordError:
        assert plain is None  # a batch with a dead letter goes record by record
        return
    if plain is not None:
        keys, key_ids, times, raw = expected
        assert (plain.keys, plain.key_ids.tolist()) == (keys, key_ids)
        np.testing.assert_array_equal(plain.times, times)
        np.testing.assert_array_equal(plain.raw, raw)


def test_declines_what_only_the_codec_can_decode() -> None:
    codec = FeatureCodec(numeric_manifest())
    good = {KEY: "a", TIME: 1_700_000_000, "amount": 1.5, "items": 2}
    for odd in (
        {"items": None},  # the codec fills in the mean
        {TIME: "2024-01-01T00:00:00Z"},
        {KEY: 12},
        {"amount": True},
    ):
        assert BulkDecoder(codec).decode(records_of([good, good | odd]), LIMIT) is None
    assert BulkDecoder(codec).decode([InputRecord(b"{not json")], LIMIT) is None
    assert BulkDecoder(codec).decode([InputRecord(good | {"amount": 10**400})], LIMIT) is None
    assert BulkDecoder(codec).decode(records_of([good]), 10) is None  # over max_record_bytes
    categorical = FeatureCodec(make_manifest())
    for odd in ({"merchant": None}, {"merchant": True}, {"merchant": 1.5}, {"merchant": ["x"]}):
        assert BulkDecoder(categorical).decode(records_of([good | odd]), LIMIT) is None


def labelled_codec() -> FeatureCodec:
    """The categorical manifest, whose records also carry a label column."""
    return FeatureCodec(make_manifest(columns=Columns(key=KEY, time=TIME, label="fraud")))


@pytest.mark.parametrize("kafka_keys", [False, True])
@pytest.mark.parametrize("fraud", [{}, {"fraud": True}, {"fraud": 1}, {"fraud": None}])
def test_payloads_of_just_the_models_columns_are_read_as_typed_rows_without_orjson(
    monkeypatch: pytest.MonkeyPatch, kafka_keys: bool, fraud: dict
) -> None:
    codec = labelled_codec()
    documents = [
        {KEY: f"a{i % 3}", TIME: 1_700_000_000 + i, "amount": 1.5 * i, "items": i, "merchant": m}
        | fraud
        for i, m in enumerate(["fuel", "casino", "never-seen", 2, -7])
    ]
    records = records_of(documents, kafka_keys)
    expected = one_by_one(codec, records)
    monkeypatch.setattr(bulk_decode.orjson, "loads", None)  # the documents' way is not taken

    plain = BulkDecoder(codec).decode(records, LIMIT)

    assert plain is not None
    assert (plain.keys, plain.key_ids.tolist()) == (expected[0], expected[1])
    np.testing.assert_array_equal(plain.times, expected[2])
    np.testing.assert_array_equal(plain.raw, expected[3])


def test_payloads_with_more_fields_are_read_as_documents_to_the_same_values() -> None:
    codec = labelled_codec()
    good = {KEY: "a", TIME: 1_700_000_000, "amount": 1.5, "items": 2, "merchant": "fuel"}
    records = records_of([good, good | {TIME: 1_700_000_001, "note": "more than the model"}])
    plain = BulkDecoder(codec).decode(records, LIMIT)
    assert plain is not None
    np.testing.assert_array_equal(plain.raw, one_by_one(codec, records)[3])


@pytest.mark.parametrize(
    "payload",
    [
        b'{"account":"\xff","ts":1700000000,"amount":1,"items":2,"merchant":"fuel"}',
        b'{"account":"a\xc0\xaf","ts":1700000000,"amount":1,"items":2,"merchant":"fuel"}',
        b'{"account":"\\ud800","ts":1700000000,"amount":1,"items":2,"merchant":"fuel"}',
        b'{"account":"a","ts":1700000000,"amount":1,"items":2,"merchant":"fuel","fraud":1e400}',
        b'{"account":"a","ts":1700000000,"amount":1,"items":2,"merchant":"fuel","x":1e400}',
        b'{"account":"a","ts":1700000000,"amount":1,"items":2,"merchant":"fuel","x":"\xff"}',
        b'{"account":"a","ts":1700000000,"amount":1,"items":2,"merchant":1e30}',
        b'{"account":"a","ts":1700000000,"amount":1,"items":2,"merchant":"fuel"} {}',
        b'{"account":"a","ts":1700000000,"amount":1,"items":2,"merchant":"fuel","x":'
        + b"[" * 5000
        + b"]" * 5000
        + b"}",
    ],
    ids=[
        "invalid UTF-8",
        "overlong UTF-8",
        "lone surrogate",
        "label out of range",
        "other field out of range",
        "other field invalid UTF-8",
        "categorical number",
        "two documents",
        "nested too deep",
    ],
)
def test_a_payload_the_codec_refuses_is_declined_whichever_way_it_is_read(
    payload: bytes,
) -> None:
    codec = labelled_codec()
    good = {KEY: "a", TIME: 1_700_000_000, "amount": 1.5, "items": 2, "merchant": "fuel"}
    records = [InputRecord(orjson.dumps(good)), InputRecord(payload)]
    with pytest.raises(RecordError):
        one_by_one(codec, records)
    assert BulkDecoder(codec).decode(records, LIMIT) is None


LABELS = st.one_of(
    st.sampled_from(["fuel", "grocery", "travel", "casino", "unheard-of", ""]),
    st.integers(min_value=-3, max_value=3),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(LABELS, min_size=1, max_size=6))
def test_categorical_labels_are_coded_as_the_codec_codes_them_or_declined(labels: list) -> None:
    codec = FeatureCodec(make_manifest())
    documents = [
        {KEY: "a", TIME: 1_700_000_000 + i, "amount": 1.5, "items": 2, "merchant": label}
        for i, label in enumerate(labels)
    ]
    records = records_of(documents)
    plain = BulkDecoder(codec).decode(records, LIMIT)
    try:
        expected = one_by_one(codec, records)
    except RecordError:
        assert plain is None
        return
    assert plain is not None or None in labels  # only a missing label needs the codec's policy
    if plain is not None:
        np.testing.assert_array_equal(plain.raw, expected[3])


@pytest.mark.parametrize("export_mode", ["window", "stateful"])
@pytest.mark.parametrize("make", [numeric_manifest, make_manifest], ids=["numeric", "categorical"])
def test_the_engine_scores_the_same_with_and_without_bulk_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, export_mode: str, make
) -> None:
    manifest = make(export_mode=export_mode, window=4)
    scorer = load_random(tmp_path / "model.onnx", manifest)
    rng = np.random.default_rng(5)
    merchants = ["fuel", "travel", "never-seen", 3]
    documents = [
        {
            KEY: f"acct-{k}",
            TIME: 1_700_000_000 + i,
            "amount": float(a),
            "items": 1,
            "merchant": merchants[m],
        }
        for i, (k, a, m) in enumerate(
            zip(
                rng.integers(0, 7, 200),
                rng.normal(50, 30, 200),
                rng.integers(0, 4, 200),
                strict=True,
            )
        )
    ]
    records = records_of(documents)

    def scored() -> list:
        engine = Engine(scorer, EngineOptions(max_batch=64, threshold=0.5))
        result = engine.process(records)
        return [result.keys.tolist(), result.times.tolist(), result.scores.tolist()]

    assert BulkDecoder(scorer.codec).decode(records, LIMIT) is not None  # the fast path is taken
    fast = scored()
    monkeypatch.setattr(BulkDecoder, "decode", lambda *_: None)
    assert scored() == fast
    assert not np.isnan(fast[2]).any()
