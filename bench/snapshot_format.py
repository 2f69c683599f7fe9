"""Key-state snapshot encodings compared: Arrow IPC with zstd, what the detector writes
(`detector.state.snapshots.encode_fields`), against Arrow IPC with lz4 and the zlib blob of
numpy buffers that snapshots were before (which the detector still reads).

    python bench/snapshot_format.py [--events 200000] [--keys 10000] [--repeat 5]

The arena is the one `bench/engine.py` measures snapshots on: the stateful benchmark model
(LSTM hidden 64 x 2 layers) with adaptive per-key thresholds (history 512), after `--events`
events spread over `--keys` keys. Each format encodes the exported fields of every key and
is decoded back by `decode_fields` (checked equal); the table shows the best of `--repeat`
runs, on one thread each.
"""

from __future__ import annotations

import argparse
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
from engine import ADAPTIVE, export, make_events, run
from rich.console import Console
from rich.table import Table

from detector.engine.scorer import CPU, Scorer
from detector.state.snapshots import decode_fields, encode_fields

Fields = dict[str, np.ndarray]
_LENGTH = struct.Struct("<I")


def encode_zlib(fields: Fields) -> bytes:
    """The format before Arrow: the keys as UTF-8 with their lengths, the arrays' buffers
    behind a JSON layout, all zlib-compressed at level 1."""
    keys = [key.encode() for key in fields["keys"].tolist()]
    arrays = {name: array for name, array in fields.items() if name != "keys"}
    arrays["key_lengths"] = np.fromiter(map(len, keys), np.int32, len(keys))
    layout = [[name, array.dtype.str, list(array.shape)] for name, array in arrays.items()]
    header, key_blob = orjson.dumps(layout), b"".join(keys)
    parts = [_LENGTH.pack(len(key_blob)), _LENGTH.pack(len(header)), header, key_blob]
    parts += [np.ascontiguousarray(array).tobytes() for array in arrays.values()]
    return zlib.compress(b"".join(parts), 1)


def best_seconds(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    pa.set_cpu_count(1)  # as zlib: one thread (the detector encodes on one of its own)
    with tempfile.TemporaryDirectory() as folder:
        scorer = Scorer.load(export(Path(folder), "stateful", ADAPTIVE), [CPU])
        arena = run(scorer, make_events(args.events, args.keys), 4096).arena
    fields = arena.export(np.flatnonzero(arena.used))
    raw = sum(array.nbytes for name, array in fields.items() if name != "keys")
    formats = {
        "Arrow IPC, zstd (current)": encode_fields,
        "Arrow IPC, lz4": partial(encode_fields, compression="lz4"),
        "zlib level 1 (before)": encode_zlib,
    }
    table = Table(title=f"snapshot of {len(fields['keys']):,} keys, {raw / 2**20:.1f} MiB raw")
    for column in ("format", "size MiB", "x smaller", "encode ms", "decode ms"):
        table.add_column(column, justify="right")
    for name, encode in formats.items():
        blob = encode(fields)
        back = decode_fields(blob)
        for field, array in fields.items():
            np.testing.assert_array_equal(back[field], array, err_msg=f"{name}: {field}")
        encode_s = best_seconds(lambda e=encode: e(fields), args.repeat)
        decode_s = best_seconds(lambda b=blob: decode_fields(b), args.repeat)
        table.add_row(
            name,
            f"{len(blob) / 2**20:.2f}",
            f"{raw / len(blob):.1f}",
            f"{encode_s * 1000:.0f}",
            f"{decode_s * 1000:.0f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
