"""The detector's configuration: one `Settings` model from defaults, a TOML file and the env.

Precedence, lowest first: defaults, the TOML file given with `--config`, `SEQSENTINEL_*`
environment variables (nested with `__`, e.g. `SEQSENTINEL_KAFKA__BOOTSTRAP_SERVERS`), then
keyword overrides. Every section forbids unknown keys so that a typo fails loudly instead of
silently leaving a default in force.
"""

from __future__ import annotations

import argparse
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
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    bootstrap_servers: NonEmptyStr = "127.0.0.1:9092"
    """`host:port`, or several separated by commas."""
    group_id: NonEmptyStr = "seqsentinel-detector"
    client_id: NonEmptyStr = "seqsentinel"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    api_version: Annotated[str, StringConstraints(pattern=r"^\d+(\.\d+){0,2}$")] | None = None
    """Broker protocol version such as "3.9"; None probes the broker at start-up."""
    key_field: NonEmptyStr | None = None
    """Record field holding the entity key; None uses the Kafka message key."""
    create_topics: bool = True
    max_poll_records: PositiveInt = 5000
    fetch_max_bytes: PositiveInt = 52_428_800
    max_partition_fetch_bytes: PositiveInt = 1_048_576
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
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: NonEmptyStr | None = None
    sasl_password: Secret | None = None
    ssl_cafile: FilePath | None = None
    ssl_certfile: FilePath | None = None
    ssl_keyfile: FilePath | None = None
    ssl_password: Secret | None = None

    @field_validator("bootstrap_servers")
    @classmethod
    def _each_server_named(cls, value: str) -> str:
        servers = [server.strip() for server in value.split(",")]
        if not all(servers):
            raise PydanticCustomError("empty_server", "a comma-separated entry is empty")
        return ",".join(servers)

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


class TopicsSettings(_Section):
    input: NonEmptyStr = "events"
    alerts: NonEmptyStr = "alerts"
    dead_letters: NonEmptyStr = "dead-letters"
    state: NonEmptyStr | None = None
    """Compacted topic of per-key state snapshots; None derives it from the group id."""


class ModelSettings(_Section):
    path: Path = Path("model.onnx")
    providers: Annotated[list[NonEmptyStr], Field(min_length=1)] = ["auto"]
    """onnxruntime execution providers in order; "auto" means CUDA when available, else CPU."""
    intra_op_threads: NonNegativeInt = 0
    """0 leaves the choice to onnxruntime."""
    inter_op_threads: NonNegativeInt = 0
    reload_interval_s: NonNegativeFloat = 5.0
    """How often to check the model file for a new version; 0 disables watching."""
    allowed_sha256: list[Sha256] = []
    """Digests a model file must match to be loaded; empty accepts any."""


class BatchingSettings(_Section):
    max_batch: PositiveInt = 4096
    max_latency_ms: NonNegativeInt = 0
    """How long a partial batch may wait for more events. 0 (the default) scores what a poll
    returns at once: batches stay small while the stream is caught up and grow by themselves
    up to `max_batch` when it falls behind (records pile up while a batch is scored)."""


class StateSettings(_Section):
    max_keys: PositiveInt = 1_000_000
    key_ttl_s: NonNegativeFloat = 86_400.0
    """Idle time after which a key's state is dropped; 0 keeps keys forever."""


class ScoringSettings(_Section):
    stride: PositiveInt = 1
    threshold: Annotated[float, Field(allow_inf_nan=False)] | None = None
    """Overrides the threshold stored with the model."""
    cooldown_events: NonNegativeInt = 10
    """Events of a key after an alert during which it raises no other alert."""
    max_record_bytes: PositiveInt = 65_536
    late_events: Literal["dead_letter", "score"] = "dead_letter"
    """What becomes of a late event, older than its key's latest one by more than
    `late_grace_s` (a device that buffers, input that is not keyed): a dead letter with reason
    "late" that leaves the key's state as it was, or scored as it comes."""
    late_grace_s: NonNegativeFloat = 0.0
    """Events at most this many seconds older than their key's latest are scored as they come,
    like Kafka Streams' grace period; an event as old as the latest is never late."""


class ProcessingSettings(_Section):
    guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    snapshot_interval_s: PositiveFloat = 60.0
    """How often each partition's key state is written to the state topic (also at revocation
    and shutdown); what a restart replays is at most this much input."""
    transactional_id: NonEmptyStr | None = None
    """exactly_once: the producer's transactional id, stable per instance (a restart with the
    same id fences its predecessor); None derives it from the group id and the host name."""
    shutdown_timeout_s: Annotated[float, Field(gt=0, lt=30)] = 25.0
    """Must stay below Kubernetes' default 30 s grace period, or the pod is killed mid-commit."""


class HttpSettings(_Section):
    host: NonEmptyStr = "0.0.0.0"
    port: Port = 8080


class LogSettings(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    """"auto" renders JSON lines unless stderr is a terminal."""
    level: Literal["debug", "info", "warning", "error"] = "info"

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
