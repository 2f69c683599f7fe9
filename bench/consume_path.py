"""CPU per record of the daemon's input path with each Kafka client, stage by stage.

    python bench/consume_path.py [--events N] [--keys K] [--rounds R] [--json OUT]
                                 [--bootstrap-servers H:P]

One topic of N JSON events (8 features over K keys, 4 partitions) is read from the start by a
fresh consumer group per measurement, through three stages of the same path:

- `library`: the client library's own consume loop, the records left untouched;
- `records`: the daemon's `GroupConsumer.poll`, which turns each poll into engine records
  (runs of `PolledRecord`s, one per message: payload, key, partition, offset);
- `decoded`: and the engine's bulk decoder on each poll (`BulkDecoder`: JSON to the raw
  feature matrix, keys to ids), as `Engine.process` starts.

CPU time is the process's, so librdkafka's own threads count; the collector is settled as
the daemon settles it (`detector.ops.heap`). The rounds are interleaved
(client by client, stage by stage) and the median of each is reported, so a change of load
on the machine falls on every figure alike.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from kafka_rig import Cluster, local_broker
from rich.console import Console
from rich.table import Table
from seeded_models import bench_manifest
from throughput import make_events

from detector.config import Settings, load_settings
from detector.contract.bulk_decode import BulkDecoder
from detector.contract.features import FeatureCodec
from detector.engine.records import PolledRecord
from detector.ops import heap
from detector.stream.source import GroupConsumer, RebalanceListener

PARTITIONS = 4
STAGES = ("library", "records", "decoded")
CLIENTS = ("kafka-python", "confluent")
#: Records per poll, as the daemon's default `batching.max_batch`.
BATCH = 4096
POLL_MS = 200
MAX_BYTES = 1 << 20


class _Ignoring:
    """A `RebalanceListener` with nothing to settle: the group is this process alone."""

    def revoked(self, partitions: set) -> dict:
        return {}

    def revocation_committed(self, partitions: set, error: object) -> None:
        pass

    def assigned(self, assignment: set) -> None:
        pass

    def lost(self, partitions: set) -> None:
        pass


def library_counter(client: str, settings: Settings) -> tuple[Callable[[], int], Callable]:
    """The library's consume call, counting what it returns; and how to close it."""
    topic = settings.topics.input
    if client == "confluent":
        from confluent_kafka import Consumer

        from detector.stream.confluent import consumer_config

        consumer = Consumer(consumer_config(settings))
        consumer.subscribe([topic])
        return lambda: len(consumer.consume(BATCH, POLL_MS / 1000)), consumer.close
    from detector.stream.clients import make_consumer

    kafka_consumer = make_consumer(settings)
    kafka_consumer.subscribe([topic])

    def count() -> int:
        polled = kafka_consumer.poll(timeout_ms=POLL_MS, max_records=BATCH)
        return sum(map(len, polled.values()))

    return count, kafka_consumer.close


def group_consumer(client: str, settings: Settings) -> GroupConsumer:
    listener: RebalanceListener = _Ignoring()
    if client == "confluent":
        from detector.stream.confluent import ConfluentConsumer, consumer_config

        consumer: GroupConsumer = ConfluentConsumer(consumer_config(settings), keyed=True)
    else:
        from detector.stream.clients import make_consumer
        from detector.stream.kafka_python import KafkaPythonConsumer

        consumer = KafkaPythonConsumer(make_consumer(settings), True, 10_000)
    consumer.subscribe(settings.topics.input, listener)
    return consumer


def stage_counter(
    client: str, stage: str, settings: Settings, codec: FeatureCodec
) -> tuple[Callable[[], int], Callable]:
    if stage == "library":
        return library_counter(client, settings)
    consumer = group_consumer(client, settings)
    bulk = BulkDecoder(codec)

    def count() -> int:
        records: list[PolledRecord] = [
            record for _, run in consumer.poll(POLL_MS, BATCH) for record in run
        ]
        if stage == "decoded" and records:
            assert bulk.decode(records, MAX_BYTES) is not None
        return len(records)

    return count, lambda: consumer.close(5_000)


def measure(
    client: str, stage: str, settings: Settings, codec: FeatureCodec, events: int
) -> tuple[float, float]:
    """(CPU µs per record, records per second) to read `events` records from the start."""
    count, close = stage_counter(client, stage, settings, codec)
    try:
        read = count()
        while read == 0:  # joining the group and the first fetch are not the path
            read = count()
        cpu, wall = time.process_time(), time.perf_counter()
        while read < events:
            read += count()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        close()
    return cpu / read * 1e6, read / wall


def run(bootstrap: str, args: argparse.Namespace) -> dict[str, dict[str, dict[str, float]]]:
    cluster = Cluster(bootstrap)
    try:
        topic = cluster.create_topic(cluster.name("consume-path"), PARTITIONS)
        data = make_events(args.events, args.keys, seed=0)
        cluster.produce(topic, data.values, data.keys)
        codec = FeatureCodec(bench_manifest("stateful"))
        heap.settle()  # as `detector run` does once it has loaded
        samples: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for round_number in range(args.rounds):
            for client in CLIENTS:
                for stage in STAGES:
                    group = cluster.name(f"{client}-{stage}-{round_number}")
                    settings = load_settings(
                        kafka={"bootstrap_servers": bootstrap, "group_id": group},
                        topics={"input": topic},
                    )
                    sample = measure(client, stage, settings, codec, args.events)
                    samples.setdefault((client, stage), []).append(sample)
    finally:
        cluster.close()
    return {
        client: {
            stage: {
                "cpu_us_per_record": statistics.median(s[0] for s in samples[client, stage]),
                "records_per_s": statistics.median(s[1] for s in samples[client, stage]),
            }
            for stage in STAGES
        }
        for client in CLIENTS
    }


def report(results: dict[str, dict[str, dict[str, float]]]) -> None:
    table = Table(title="The input path, per record (median of the rounds)")
    table.add_column("client")
    for stage in STAGES:
        table.add_column(f"{stage} µs", justify="right")
        table.add_column(f"{stage} rec/s", justify="right")
    for client, stages in results.items():
        cells = []
        for stage in STAGES:
            figures = stages[stage]
            cells += [f"{figures['cpu_us_per_record']:.2f}", f"{figures['records_per_s']:,.0f}"]
        table.add_row(client, *cells)
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000, help="records in the topic")
    parser.add_argument("--keys", type=int, default=10_000, help="distinct message keys")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--bootstrap-servers", help="a running broker; by default one is started and stopped"
    )
    args = parser.parse_args()
    if args.bootstrap_servers:
        results = run(args.bootstrap_servers, args)
    else:
        with tempfile.TemporaryDirectory() as folder, local_broker(Path(folder)) as bootstrap:
            results = run(bootstrap, args)
    report(results)
    if args.json:
        args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
