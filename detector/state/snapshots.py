"""Per-partition snapshots of key state, as records of a compacted Kafka topic.

A snapshot holds what `KeyArena.export` gives for the keys of one input partition, and the
input offset it is valid at: the state is exactly what processing every record of that
partition before the offset leaves behind. It is one Arrow IPC stream, zstd-compressed (a
tenth of the encoding time of the zlib blob it replaced, for the same size; see
`bench/snapshot_format.py`), cut into chunks below the broker's message limit, plus a small
JSON header record written last. Records are keyed so that compaction keeps exactly one
snapshot per partition:

    <input topic>/<partition>            the header: offset, chunk count, digest, fingerprint
    <input topic>/<partition>/<g>/<i>    chunk i of a snapshot of generation parity g

Successive snapshots alternate between the two parities, so a snapshot half written when
the process died never overwrites the chunks that the last complete header names. A header
whose chunks do not hash to its digest, or whose fingerprint is not the serving model's, is
ignored.

`KeyHistory` checks that the key state a process carries on continues what the last
snapshot recorded (or the restore left): a key's event count, its sequence number, never
goes back and a key is never gone unless the TTL or an eviction made it so.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat
from typing import NamedTuple

import numpy as np
import orjson
import pyarrow as pa
from kafka import TopicPartition

from detector.contract.manifest import Manifest
from detector.engine.arena import KeyArena
from detector.engine.identity import state_identity

__all__ = [
    "CHUNK_BYTES",
    "KeyHistory",
    "Snapshot",
    "SnapshotHeader",
    "StateCopy",
    "StateRecord",
    "decode_fields",
    "encode_fields",
    "fingerprint",
    "latest_snapshot",
    "snapshot_messages",
    "snapshot_records",
]

FORMAT = 1
#: Chunk size: below Kafka's default 1 MB message limit with room for the record overhead.
CHUNK_BYTES = 900 * 1024
#: zstd: the smallest and, at Arrow's default level, far faster than zlib at its fastest.
COMPRESSION = "zstd"
#: How an Arrow IPC stream begins (its continuation marker); a zlib stream never does.
_IPC_MAGIC = b"\xff\xff\xff\xff"
_LENGTH = struct.Struct("<I")


def fingerprint(manifest: Manifest) -> str:
    """The hash of `state_identity`: snapshots are exchanged only between models whose key
    state the engine keeps across a swap."""
    identity = {"format": FORMAT, **state_identity(manifest)}
    return hashlib.sha256(orjson.dumps(identity, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def encode_fields(fields: dict[str, np.ndarray], compression: str = COMPRESSION) -> bytes:
    """The arrays of `KeyArena.export` as one compressed Arrow IPC stream: a table of one row,
    each array a list of its values, with the dtypes and shapes in the schema's metadata;
    `compression` another IPC codec only to compare them."""
    columns, layout = {}, {}
    for name, array in fields.items():
        if name == "keys":
            values = pa.array(array.tolist(), pa.large_string())
        else:
            values = pa.array(np.ascontiguousarray(array).reshape(-1))
            layout[name] = [array.dtype.str, list(array.shape)]
        columns[name] = pa.LargeListArray.from_arrays(pa.array([0, len(values)]), values)
    table = pa.table(columns, metadata={"layout": orjson.dumps(layout)})
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode_fields(blob: bytes) -> dict[str, np.ndarray]:
    """The inverse of `encode_fields`, and of the zlib format before it (snapshots written by
    earlier versions stay readable); `ValueError` for a blob that is neither."""
    if not blob.startswith(_IPC_MAGIC):
        return _decode_zlib(blob)
    try:
        table = pa.ipc.open_stream(blob).read_all()
        layout = orjson.loads(table.schema.metadata[b"layout"])
        fields = {"keys": _values(table, "keys").to_numpy(zero_copy_only=False)}
        for name, (dtype, shape) in layout.items():
            values = _values(table, name).to_numpy(zero_copy_only=False)
            fields[name] = values.astype(np.dtype(dtype), copy=False).reshape(shape).copy()
    except (pa.ArrowException, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"not a state snapshot: {error}") from None
    return fields


def _values(table: pa.Table, name: str) -> pa.Array:
    return table.column(name).combine_chunks().flatten()


def _decode_zlib(blob: bytes) -> dict[str, np.ndarray]:
    """A snapshot blob of the format before Arrow: numpy buffers behind a JSON layout and the
    UTF-8 keys with their lengths, zlib-compressed."""
    try:
        data = memoryview(zlib.decompress(blob))
        (key_bytes,) = _LENGTH.unpack_from(data, 0)
        (header_bytes,) = _LENGTH.unpack_from(data, 4)
        position = 8 + header_bytes
        layout = orjson.loads(bytes(data[8:position]))
        key_blob = bytes(data[position : position + key_bytes])
        position += key_bytes
        fields: dict[str, np.ndarray] = {}
        for name, dtype, shape in layout:
            array = np.frombuffer(data, np.dtype(dtype), int(np.prod(shape)), position)
            fields[name] = array.reshape(shape).copy()
            position += array.nbytes
    except (zlib.error, struct.error, orjson.JSONDecodeError, TypeError, ValueError) as error:
        raise ValueError(f"not a state snapshot: {error}") from None
    if position != len(data):
        raise ValueError("not a state snapshot: trailing bytes")
    lengths = fields.pop("key_lengths")
    ends = np.cumsum(lengths)
    starts = ends - lengths  # also for a snapshot of no key
    keys = [key_blob[a:b].decode() for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
    fields["keys"] = np.array(keys, object)
    return fields


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    """The record that makes a snapshot current; chunks are found by parity and count."""

    offset: int
    chunks: int
    generation: int
    sha256: str
    fingerprint: str
    keys: int

    def to_bytes(self) -> bytes:
        return orjson.dumps({"format": FORMAT, **{n: getattr(self, n) for n in self.__slots__}})

    @classmethod
    def from_bytes(cls, value: bytes) -> SnapshotHeader | None:
        try:
            document = orjson.loads(value)
            if document.pop("format") != FORMAT:
                return None
            return cls(**document)
        except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
            return None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The key state of one input partition, valid at input `offset`."""

    offset: int
    fields: dict[str, np.ndarray]
    generation: int


def header_key(input_topic: str, partition: int) -> bytes:
    return f"{input_topic}/{partition}".encode()


def chunk_key(input_topic: str, partition: int, generation: int, index: int) -> bytes:
    return f"{input_topic}/{partition}/{generation % 2}/{index}".encode()


def snapshot_messages(
    input_topic: str,
    partition: int,
    offset: int,
    fields: dict[str, np.ndarray],
    fingerprint: str,
    generation: int,
) -> list[tuple[bytes, bytes]]:
    """(key, value) records of one snapshot, the header last (it must be written last)."""
    blob = encode_fields(fields)
    chunks = [blob[i : i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)] or [b""]
    header = SnapshotHeader(
        offset=offset,
        chunks=len(chunks),
        generation=generation,
        sha256=hashlib.sha256(blob).hexdigest(),
        fingerprint=fingerprint,
        keys=len(fields["keys"]),
    )
    messages = [
        (chunk_key(input_topic, partition, generation, i), chunk) for i, chunk in enumerate(chunks)
    ]
    return [*messages, (header_key(input_topic, partition), header.to_bytes())]


@dataclass(frozen=True, slots=True)
class StateCopy:
    """The key state of one input partition, copied at `offset`, and where its snapshot goes."""

    partition: TopicPartition
    offset: int
    generation: int
    fields: dict[str, np.ndarray]
    state_topic: str
    state_partition: int


class StateRecord(NamedTuple):
    """One record of a snapshot, with the state topic partition it must be written to."""

    topic: str
    partition: int
    key: bytes
    value: bytes


def snapshot_records(copies: list[StateCopy], fingerprint: str) -> list[StateRecord]:
    """The records to publish for the snapshots of `copies`, made by a model of `fingerprint`."""
    records: list[StateRecord] = []
    for copy in copies:
        tp = copy.partition
        messages = snapshot_messages(
            tp.topic, tp.partition, copy.offset, copy.fields, fingerprint, copy.generation
        )
        records += [
            StateRecord(copy.state_topic, copy.state_partition, key, value)
            for key, value in messages
        ]
    return records


def latest_snapshot(
    records: Iterable[tuple[bytes | None, bytes | None]],
    input_topic: str,
    partition: int,
    fingerprint: str,
) -> tuple[Snapshot | None, str]:
    """The partition's current snapshot among state-topic records read in order, and why
    there is none ("absent", "incompatible model", "incomplete") or "ok"."""
    wanted = header_key(input_topic, partition)
    prefix = wanted + b"/"
    latest: dict[bytes, bytes] = {}
    for key, value in records:
        if key is not None and value is not None and (key == wanted or key.startswith(prefix)):
            latest[key] = value
    header = SnapshotHeader.from_bytes(latest[wanted]) if wanted in latest else None
    if header is None:
        return None, "absent"
    if header.fingerprint != fingerprint:
        return None, "incompatible model"
    names = [chunk_key(input_topic, partition, header.generation, i) for i in range(header.chunks)]
    blob = b"".join(latest.get(name, b"") for name in names)
    if hashlib.sha256(blob).hexdigest() != header.sha256:
        return None, "incomplete"
    try:
        fields = decode_fields(blob)
    except ValueError:
        return None, "incomplete"
    return Snapshot(header.offset, fields, header.generation), "ok"


@dataclass(frozen=True, slots=True)
class KeyHistory:
    """Where each key of one partition stood at one moment: its event count (the sequence
    number of its latest event) and when it was touched (what the TTL reads), with the
    arena's evictions so far (`KeyArena.evicted`)."""

    keys: np.ndarray
    count: np.ndarray
    touched: np.ndarray
    evicted: int

    @classmethod
    def of(cls, fields: dict[str, np.ndarray], evicted: int) -> KeyHistory:
        """The history of exported fields (`KeyArena.export`, or a snapshot's)."""
        return cls(fields["keys"], fields["count"], fields["touched"], evicted)

    @classmethod
    def of_partition(cls, arena: KeyArena, partition: int) -> KeyHistory:
        """The history of the keys of `partition` in `arena` now."""
        slots = arena.slots_of([partition])
        return cls(arena.keys_of(slots), arena.count[slots], arena.touched[slots], arena.evicted)

    def lost(self, later: KeyHistory, ttl_s: float) -> list[tuple[str, int, int]]:
        """(key, count here, count `later`, 0 when gone) of the keys whose history `later`
        does not continue: fewer events though no gap past the TTL could have restarted the
        key, or gone though the TTL had not expired it yet. Nothing when keys were evicted
        in between (the least recently seen lose their state by design)."""
        if later.evicted != self.evicted:
            return []
        index = dict(zip(later.keys.tolist(), range(later.keys.size), strict=True))
        at = np.fromiter(map(index.get, self.keys.tolist(), repeat(-1)), np.intp, self.keys.size)
        found = at >= 0
        count = np.r_[later.count, 0][at]  # -1: the 0 appended
        excused = np.zeros(self.keys.size, bool)
        if ttl_s:
            clock = max(later.touched.max(initial=-np.inf), self.touched.max(initial=-np.inf))
            restarted = found & (np.r_[later.touched, 0.0][at] - self.touched > ttl_s)
            excused = restarted | (~found & (self.touched < clock - ttl_s))
        lost = np.flatnonzero((count < self.count) & ~excused)
        keys, before, after = self.keys[lost].tolist(), self.count[lost].tolist(), count[lost]
        return list(zip(keys, before, after.tolist(), strict=True))
