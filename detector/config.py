"""The detector's configuration: one `Settings` model from defaults, a TOML file and the env.

Precedence, lowest first: defaults, the TOML file given with `--config`, `SEQSENTINEL_*`
environment variables (nested with `__`, e.g. `SEQSENTINEL_KAFKA__BOOTSTRAP_SERVERS`), then
keyword overrides. Every section forbids unknown keys so that a typo fails loudly instead of
silently leaving a default in force.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

__all__ = [
    "BatchingSettings",
    "ConfigError",
    "HttpSettings",
    "KafkaSettings",
    "LogSettings",
    "ModelSettings",
    "ProcessingSettings",
    "ScoringSettings",
    "Settings",
    "StateSettings",
    "TopicsSettings",
    "add_config_argument",
    "load_settings",
    "load_settings_or_exit",
]

Port = Annotated[int, Field(ge=1, le=65535)]
NonEmptyStr = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$", to_lower=True)]


def _non_empty_secret(value: SecretStr) -> SecretStr:
    if not value.get_secret_value():
        raise PydanticCustomError("empty_secret", "must not be empty")
    return value


Secret = Annotated[SecretStr, AfterValidator(_non_empty_secret)]
SASL_PROTOCOLS = frozenset({"SASL_PLAINTEXT", "SASL_SSL"})


class _Section(BaseModel):
    # Attribute docstrings are the fields' descriptions: docs/configuration.md is made of them.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class KafkaSettings(_Section):
    """The brokers and the clients the detector opens: consumer, producer and admin (and
    `trainer retrain --from-kafka`'s consumer) share these settings."""

    bootstrap_servers: NonEmptyStr = "127.0.0.1:9092"
    """`host:port`, or several separated by commas."""
    client: Literal["kafka-python", "confluent"] = "kafka-python"
    """The Kafka client library of the daemon: kafka-python (pure Python), or confluent,
    librdkafka through confluent-kafka (`pip install 'seqsentinel[confluent]'`), with which
    the daemon spends about 40% less CPU per event. Same guarantees and settings either way."""
    group_id: NonEmptyStr = "seqsentinel-detector"
    """Consumer group of the detectors that share the input's partitions; also names the state
    topic and the transactional id unless they are set."""
    client_id: NonEmptyStr = "seqsentinel"
    """Client id sent to the brokers, for their logs and quotas."""
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    """Where a group without committed offsets starts reading the input."""
    api_version: Annotated[str, StringConstraints(pattern=r"^\d+(\.\d+){0,2}$")] | None = None
    """Broker protocol version such as "3.9"; unset, the broker is probed at start-up."""
    key_field: NonEmptyStr | None = None
    """Record field holding the entity key; unset, the Kafka message key is the key."""
    create_topics: bool = True
    """Create missing alerts, dead-letter and state topics at start (the state topic compacted,
    with as many partitions as the input); off, a missing one stops the detector."""
    max_poll_records: PositiveInt = 5000
    """Most records one poll returns."""
    fetch_max_bytes: PositiveInt = 52_428_800
    """Most bytes one fetch from the brokers returns."""
    max_partition_fetch_bytes: PositiveInt = 1_048_576
    """Most bytes one fetch returns per partition (at least 2 MiB when restoring key state)."""
    linger_ms: NonNegativeInt = 0
    """How long the producer holds alerts and dead letters to batch them; each millisecond is
    added to an alert's latency, and alerts are too few for batching to save much."""
    commit_interval_ms: Annotated[int, Field(ge=0, le=60_000)] = 100
    """Under at_least_once, at most one offset commit per interval (0: one after every round
    acknowledged); shutdown and revocation commit at once. Each commit is a request and a write
    to the offsets topic, and a crash replays at most this much more."""
    session_timeout_ms: Annotated[int, Field(ge=1000, le=300_000)] = 10_000
    """A crashed detector's partitions move to the others after this long without a heartbeat
    (Kafka's default before 3.0; the 45 s default since then is slow for a stream of alerts)."""
    compression_type: Literal["gzip", "snappy", "lz4", "zstd"] | None = None
    """Compression of what the detector produces (alerts, dead letters, state snapshots);
    unset, none."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """How the clients talk to the brokers; a SASL protocol also needs `sasl_mechanism`,
    `sasl_username` and `sasl_password`."""
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    """SASL mechanism of the SASL protocols."""
    sasl_username: NonEmptyStr | None = None
    """SASL user name."""
    sasl_password: Secret | None = None
    """SASL password; shown masked by `detector check-config` and in logs."""
    ssl_cafile: FilePath | None = None
    """CA bundle that signed the brokers' certificates, when the system's does not."""
    ssl_certfile: FilePath | None = None
    """Client certificate, for mutual TLS."""
    ssl_keyfile: FilePath | None = None
    """Private key of the client certificate."""
    ssl_password: Secret | None = None
    """Password of an encrypted `ssl_keyfile`; shown masked."""

    @field_validator("bootstrap_servers")
    @classmethod
    def _each_server_named(cls, value: str) -> str:
        servers = [server.strip() for server in value.split(",")]
        if not all(servers):
            raise PydanticCustomError("empty_server", "a comma-separated entry is empty")
        return ",".join(servers)

    @field_validator("client")
    @classmethod
    def _client_installed(cls, value: str) -> str:
        if value == "confluent" and importlib.util.find_spec("confluent_kafka") is None:
            raise PydanticCustomError(
                "client_missing",
                "the confluent client needs the confluent-kafka package: "
                "pip install 'seqsentinel[confluent]'",
            )
        return value

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol in SASL_PROTOCOLS:
            missing = [
                name
                for name in ("sasl_mechanism", "sasl_username", "sasl_password")
                if getattr(self, name) is None
            ]
            if missing:
                raise PydanticCustomError(
                    "sasl_incomplete",
                    "security_protocol {protocol} also needs {missing}",
                    {"protocol": self.security_protocol, "missing": ", ".join(missing)},
                )
        return self

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of kafka-python shared by `KafkaConsumer` and `KafkaProducer`.

        Secrets are unwrapped here: never log the result.
        """
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.api_version is not None:
            options["api_version"] = tuple(int(part) for part in self.api_version.split("."))
        if self.security_protocol in SASL_PROTOCOLS:
            assert self.sasl_password is not None  # guaranteed by _sasl_complete
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password.get_secret_value()
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if (path := getattr(self, name)) is not None:
                options[name] = str(path)
        if self.ssl_password is not None:
            options["ssl_password"] = self.ssl_password.get_secret_value()
        return options

    def librdkafka_options(self) -> dict[str, Any]:
        """The same settings as librdkafka's configuration properties, for the confluent client.

        Secrets are unwrapped here: never log the result.
        """
        options: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol,
        }
        if self.security_protocol in SASL_PROTOCOLS:
            assert self.sasl_password is not None  # guaranteed by _sasl_complete
            options["sasl.mechanism"] = self.sasl_mechanism
            options["sasl.username"] = self.sasl_username
            options["sasl.password"] = self.sasl_password.get_secret_value()
        locations = {
            "ssl.ca.location": self.ssl_cafile,
            "ssl.certificate.location": self.ssl_certfile,
            "ssl.key.location": self.ssl_keyfile,
        }
        options.update({name: str(path) for name, path in locations.items() if path is not None})
        if self.ssl_password is not None:
            options["ssl.key.password"] = self.ssl_password.get_secret_value()
        return options


class TopicsSettings(_Section):
    """Where events are read and alerts, dead letters and key state are written."""

    input: NonEmptyStr = "events"
    """Topic of the JSON events to score; it must exist."""
    alerts: NonEmptyStr = "alerts"
    """Topic the alerts are published to, keyed like their events."""
    dead_letters: NonEmptyStr = "dead-letters"
    """Topic of the records that cannot be scored, unchanged, with the reason in headers."""
    state: NonEmptyStr | None = None
    """Compacted topic of per-key state snapshots; unset, `<kafka.group_id>-state`."""


class ModelSettings(_Section):
    """The model file and how onnxruntime runs it."""

    path: Path = Path("model.onnx")
    """The model file the trainer exported; watched for new versions."""
    providers: Annotated[list[NonEmptyStr], Field(min_length=1)] = ["auto"]
    """onnxruntime execution providers in order; "auto" means CUDA when available, else CPU."""
    intra_op_threads: NonNegativeInt = 0
    """onnxruntime threads within one node of the graph; 0 leaves the choice to it (one per
    physical core)."""
    inter_op_threads: NonNegativeInt = 0
    """onnxruntime threads across independent nodes of the graph; 0 leaves the choice to it."""
    reload_interval_s: NonNegativeFloat = 5.0
    """How often to check the model file for a new version; 0 disables watching."""
    allowed_sha256: list[Sha256] = []
    """Digests a model file must match to be loaded; empty accepts any."""


class BatchingSettings(_Section):
    """How events are grouped into the batches the engine scores at once."""

    max_batch: PositiveInt = 4096
    """Most events scored together (and rows sent to onnxruntime in one call)."""
    max_latency_ms: NonNegativeInt = 0
    """How long a partial batch may wait for more events. 0 (the default) scores what a poll
    returns at once: batches stay small while the stream is caught up and grow by themselves
    up to `max_batch` when it falls behind (records pile up while a batch is scored)."""


class StateSettings(_Section):
    """Each key's recent events (or LSTM state) kept in memory."""

    max_keys: PositiveInt = 1_000_000
    """Most keys with state; beyond it the least recently seen are evicted."""
    key_ttl_s: NonNegativeFloat = 86_400.0
    """Idle time after which a key's state is dropped, by the event time of the key's own
    input partition; 0 keeps keys forever."""


class ScoringSettings(_Section):
    """Which events are scored and when an alert opens."""

    stride: PositiveInt = 1
    """Score every n-th event of a key after its warm-up; the others only update its state."""
    threshold: Annotated[float, Field(allow_inf_nan=False)] | None = None
    """Alert threshold for every key; unset, the model's (its calibrated thresholds)."""
    cooldown_events: NonNegativeInt = 10
    """Events of a key after an alert during which it raises no other alert."""
    max_record_bytes: PositiveInt = 65_536
    """Larger payloads are dead letters with reason "too_large"."""
    late_events: Literal["dead_letter", "score"] = "dead_letter"
    """What becomes of a late event, older than its key's latest one by more than
    `late_grace_s` (a device that buffers, input that is not keyed): a dead letter with reason
    "late" that leaves the key's state as it was, or scored as it comes."""
    late_grace_s: NonNegativeFloat = 0.0
    """Events at most this many seconds older than their key's latest are scored as they come,
    like Kafka Streams' grace period; an event as old as the latest is never late."""


class ProcessingSettings(_Section):
    """Delivery guarantees, key-state snapshots and shutdown."""

    guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    """at_least_once: offsets committed after the alerts are acknowledged, a crash may repeat
    alerts (with the same alert_id); exactly_once: alerts, state and offsets in one Kafka
    transaction per batch, for consumers reading read_committed."""
    snapshot_interval_s: PositiveFloat = 60.0
    """How often each partition's key state is written to the state topic (also at revocation
    and shutdown); what a restart replays is at most this much input."""
    transactional_id: NonEmptyStr | None = None
    """exactly_once: the producer's transactional id, stable per instance (a restart with the
    same id fences its predecessor); unset, `<kafka.group_id>-<host name>`."""
    shutdown_timeout_s: Annotated[float, Field(gt=0, lt=30)] = 25.0
    """How long a stop (SIGTERM) may take to finish the batch in hand, commit and leave; must
    stay below Kubernetes' default 30 s grace period, or the pod is killed mid-commit."""


class HttpSettings(_Section):
    """The operations endpoints: /healthz, /readyz and /metrics."""

    host: NonEmptyStr = "0.0.0.0"
    """Address the endpoints listen on."""
    port: Port = 8080
    """Port the endpoints listen on."""


class LogSettings(_Section):
    """Log lines on stderr."""

    format: Literal["auto", "json", "console"] = "auto"
    """"auto" renders JSON lines unless stderr is a terminal."""
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level logged; capitals are accepted."""

    @field_validator("format", "level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        """Accept `INFO` as well: environment variables are often written in capitals."""
        return value.lower() if isinstance(value, str) else value


class Settings(BaseSettings):
    """Everything the detector daemon can be configured with."""

    model_config = SettingsConfigDict(
        env_prefix="SEQSENTINEL_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicsSettings = TopicsSettings()
    model: ModelSettings = ModelSettings()
    batching: BatchingSettings = BatchingSettings()
    state: StateSettings = StateSettings()
    scoring: ScoringSettings = ScoringSettings()
    processing: ProcessingSettings = ProcessingSettings()
    http: HttpSettings = HttpSettings()
    log: LogSettings = LogSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments, then the environment, then the TOML file; no dotenv or secrets dir."""
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    def masked(self) -> dict[str, Any]:
        """The effective configuration as JSON-able data, every secret shown as `**********`."""
        return self.model_dump(mode="json")


class ConfigError(Exception):
    """A configuration that cannot be used; its message is safe to show: it never holds values."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Defaults, overlaid by `config_file` (TOML), the environment and `overrides`, in that order.

    Raises `ConfigError`, never `ValidationError`: a validation error's text and traceback hold
    the offending inputs, secrets included.
    """
    settings_cls = Settings
    if config_file is not None:
        _check_toml(config_file)
        # A subclass per file: pydantic-settings reads the TOML path from the class configuration.
        namespace = {"__module__": __name__, "model_config": {"toml_file": config_file}}
        settings_cls = type("Settings", (Settings,), namespace)
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors(include_input=False)]
    except SettingsError as exc:
        problems = [str(exc)]
    raise ConfigError(problems)


def load_settings_or_exit(config_file: Path | None = None, **overrides: Any) -> Settings:
    """`load_settings` for commands: a bad configuration is reported on stderr, then exit 2.

    Status 2 is what argparse uses for bad arguments; logging is not set up yet at this point
    (its format is part of the configuration), hence plain stderr.
    """
    try:
        return load_settings(config_file, **overrides)
    except ConfigError as exc:
        print(f"detector: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """The `--config FILE` option every command that reads `Settings` shares."""
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML configuration file; SEQSENTINEL_* environment variables override it",
    )


def _check_toml(path: Path) -> None:
    """Fail on a missing or malformed file, which pydantic-settings would skip or traceback on."""
    try:
        with path.open("rb") as file:
            tomllib.load(file)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None


def _describe(error: ErrorDetails) -> str:
    """`kafka.sasl_mechanism: Input should be ...`, without the input itself."""
    path = ""
    for part in error["loc"]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return f"{path.lstrip('.') or 'settings'}: {error['msg']}"
