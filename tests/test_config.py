"""Settings: sources and precedence, refusals that name the field, secrets kept out of output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from detector.cli import main
from detector.config import ConfigError, KafkaSettings, Settings, load_settings
from detector.stream.daemon import engine_options

PASSWORD = "s3cr3t-Pa55word"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the SEQSENTINEL_* variables they set themselves."""
    for name in list(os.environ):
        if name.upper().startswith("SEQSENTINEL_"):
            monkeypatch.delenv(name)


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "detector.toml"
    path.write_text(text)
    return path


def check_config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `detector check-config` in-process: (exit status, stdout, stderr)."""
    try:
        status = main(["check-config", *argv])
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err


SASL_ENV = {
    "SEQSENTINEL_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
    "SEQSENTINEL_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
    "SEQSENTINEL_KAFKA__SASL_USERNAME": "detector",
    "SEQSENTINEL_KAFKA__SASL_PASSWORD": PASSWORD,
}


def test_defaults() -> None:
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == "127.0.0.1:9092"
    assert settings.kafka.group_id == "seqsentinel-detector"
    assert settings.topics.input == "events"
    assert settings.model.providers == ["auto"]
    assert settings.processing.shutdown_timeout_s == 25.0
    assert settings.http.port == 8080
    assert settings.log.format == "auto"


def test_environment_with_nested_delimiter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEQSENTINEL_KAFKA__BOOTSTRAP_SERVERS", "k1:9092, k2:9093")
    monkeypatch.setenv("SEQSENTINEL_TOPICS__INPUT", "payments")
    monkeypatch.setenv("SEQSENTINEL_MODEL__PATH", "models/fraud.onnx")
    monkeypatch.setenv("SEQSENTINEL_MODEL__PROVIDERS", '["CPUExecutionProvider"]')
    monkeypatch.setenv("SEQSENTINEL_HTTP__PORT", "9100")
    monkeypatch.setenv("SEQSENTINEL_LOG__LEVEL", "DEBUG")
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == "k1:9092,k2:9093"
    assert settings.topics.input == "payments"
    assert settings.model.path == Path("models/fraud.onnx")
    assert settings.model.providers == ["CPUExecutionProvider"]
    assert settings.http.port == 9100
    assert settings.log.level == "debug"


def test_latency_settings_default_to_no_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches are scored as polled and alerts sent at once unless told otherwise."""
    settings = load_settings()
    assert (settings.batching.max_latency_ms, settings.kafka.linger_ms) == (0, 0)
    monkeypatch.setenv("SEQSENTINEL_BATCHING__MAX_LATENCY_MS", "20")
    monkeypatch.setenv("SEQSENTINEL_KAFKA__LINGER_MS", "5")
    settings = load_settings()
    assert (settings.batching.max_latency_ms, settings.kafka.linger_ms) == (20, 5)


def test_late_events_are_dead_letters_by_default_and_reach_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = engine_options(load_settings())
    assert (options.late_events, options.late_grace_s) == ("dead_letter", 0.0)
    monkeypatch.setenv("SEQSENTINEL_SCORING__LATE_EVENTS", "score")
    monkeypatch.setenv("SEQSENTINEL_SCORING__LATE_GRACE_S", "30")
    options = engine_options(load_settings())
    assert (options.late_events, options.late_grace_s) == ("score", 30.0)


def test_toml_file(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        '[kafka]\ngroup_id = "g2"\napi_version = "3.9"\n'
        '[scoring]\nthreshold = 0.75\n[model]\nallowed_sha256 = ["' + "AB" * 32 + '"]\n',
    )
    settings = load_settings(path)
    assert settings.kafka.group_id == "g2"
    assert settings.kafka.api_version == "3.9"
    assert settings.scoring.threshold == 0.75
    assert settings.model.allowed_sha256 == ["ab" * 32]
    assert isinstance(settings, Settings)


def test_precedence_overrides_then_env_then_file_then_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_toml(tmp_path, '[http]\nport = 9000\nhost = "10.0.0.1"\n[topics]\ninput = "f"\n')
    monkeypatch.setenv("SEQSENTINEL_HTTP__PORT", "9100")
    monkeypatch.setenv("SEQSENTINEL_TOPICS__INPUT", "e")
    settings = load_settings(path, topics={"input": "o"})
    assert settings.http.port == 9100  # env over file
    assert settings.http.host == "10.0.0.1"  # file over default, env for a sibling kept
    assert settings.topics.input == "o"  # overrides over env
    assert settings.topics.alerts == "alerts"  # default


@pytest.mark.parametrize(
    ("toml", "field", "problem"),
    [
        ("[http]\nport = 70000", "http.port", "less than or equal to 65535"),
        ('[kafka]\nauto_offset_reset = "newest"', "kafka.auto_offset_reset", "'earliest'"),
        ("[batching]\nmax_batch = 0", "batching.max_batch", "greater than 0"),
        ("[kafka]\nlinger_ms = -1", "kafka.linger_ms", "greater than or equal to 0"),
        ("[processing]\nshutdown_timeout_s = 30", "processing.shutdown_timeout_s", "less than 30"),
        ('[kafka]\nbootstrap_servers = "a:1,,b:2"', "kafka.bootstrap_servers", "empty"),
        ('[kafka]\napi_version = "latest"', "kafka.api_version", "pattern"),
        ('[model]\nallowed_sha256 = ["abc"]', "model.allowed_sha256[0]", "pattern"),
        ('[kafka]\nssl_cafile = "no/such/ca.pem"', "kafka.ssl_cafile", "not point to a file"),
        ('[kafka]\nbootstrap_server = "x:1"', "kafka.bootstrap_server", "Extra inputs"),
        ("[kafak]\ngroup_id = 'g'", "kafak", "Extra inputs"),
        ('[scoring]\nlate_events = "drop"', "scoring.late_events", "'dead_letter' or 'score'"),
        ("[scoring]\nlate_grace_s = -1", "scoring.late_grace_s", "greater than or equal to 0"),
    ],
)
def test_invalid_values_are_refused_naming_the_field(
    tmp_path: Path, toml: str, field: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write_toml(tmp_path, toml))
    [line] = caught.value.problems
    assert line.startswith(f"{field}: ")
    assert problem in line


def test_sasl_needs_mechanism_username_and_password() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(kafka={"security_protocol": "SASL_PLAINTEXT", "sasl_username": "u"})
    assert caught.value.problems == [
        "kafka: security_protocol SASL_PLAINTEXT also needs sasl_mechanism, sasl_password"
    ]


def test_missing_and_malformed_files_are_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=r"absent\.toml: cannot read"):
        load_settings(missing)
    with pytest.raises(ConfigError, match=r"detector\.toml: not valid TOML"):
        load_settings(write_toml(tmp_path, "[kafka\nx = 1"))


def test_client_options_plaintext() -> None:
    kafka = KafkaSettings(bootstrap_servers="k1:9092,k2:9092", client_id="c")
    assert kafka.client_options() == {
        "bootstrap_servers": ["k1:9092", "k2:9092"],
        "client_id": "c",
        "security_protocol": "PLAINTEXT",
    }


def test_client_options_sasl_ssl_scram(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    kafka = KafkaSettings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="detector",
        sasl_password=PASSWORD,
        ssl_cafile=ca,
        api_version="3.9",
    )
    assert kafka.client_options() == {
        "bootstrap_servers": ["127.0.0.1:9092"],
        "client_id": "seqsentinel",
        "security_protocol": "SASL_SSL",
        "api_version": (3, 9),
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "detector",
        "sasl_plain_password": PASSWORD,
        "ssl_cafile": str(ca),
    }


def test_librdkafka_options_carry_the_same_security_settings(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / name for name in ("ca.pem", "client.pem", "client.key"))
    for path in (ca, cert, key):
        path.write_text("-----BEGIN-----\n")
    kafka = KafkaSettings(
        bootstrap_servers="k1:9092,k2:9092",
        client="confluent",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="detector",
        sasl_password=PASSWORD,
        ssl_cafile=ca,
        ssl_certfile=cert,
        ssl_keyfile=key,
        ssl_password="key-secret",
    )
    assert kafka.librdkafka_options() == {
        "bootstrap.servers": "k1:9092,k2:9092",
        "client.id": "seqsentinel",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "detector",
        "sasl.password": PASSWORD,
        "ssl.ca.location": str(ca),
        "ssl.certificate.location": str(cert),
        "ssl.key.location": str(key),
        "ssl.key.password": "key-secret",
    }


def test_the_confluent_client_without_its_package_is_refused_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError) as caught:
        load_settings(kafka={"client": "confluent"})
    [line] = caught.value.problems
    assert line.startswith("kafka.client: ")
    assert "pip install 'seqsentinel[confluent]'" in line
    assert load_settings().kafka.client == "kafka-python"


def test_masked_hides_secrets_and_keeps_absent_ones_none(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SASL_ENV.items():
        monkeypatch.setenv(name, value)
    masked = load_settings().masked()
    assert masked["kafka"]["sasl_password"] == "**********"
    assert masked["kafka"]["ssl_password"] is None
    assert masked["kafka"]["sasl_username"] == "detector"
    assert PASSWORD not in json.dumps(masked)


def test_check_config_prints_effective_config_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_toml(tmp_path, f'[kafka]\nssl_password = "{PASSWORD}"\n[http]\nport = 9000\n')
    for name, value in SASL_ENV.items():
        monkeypatch.setenv(name, value)
    status, out, err = check_config(["--config", str(path)], capsys)
    assert status == 0
    printed = json.loads(out)
    assert printed["http"]["port"] == 9000
    assert printed["kafka"]["security_protocol"] == "SASL_SSL"
    assert printed["kafka"]["sasl_password"] == printed["kafka"]["ssl_password"] == "**********"
    assert PASSWORD not in out + err


@pytest.mark.parametrize(
    "kafka_toml",
    [
        # another field is invalid
        f'sasl_password = "{PASSWORD}"\nsecurity_protocol = "SASL_SSL"\nmax_poll_records = -1',
        # the secret itself is invalid (not a string), and so is its neighbour
        f'ssl_password = ["{PASSWORD}"]\nsasl_password = ["{PASSWORD}"]',
    ],
)
def test_refusals_never_echo_secrets(
    tmp_path: Path, kafka_toml: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_toml(tmp_path, f"[kafka]\n{kafka_toml}\n")
    status, out, err = check_config(["--config", str(path)], capsys)
    assert status == 2
    assert out == ""
    assert "kafka." in err
    assert "Traceback" not in err
    assert PASSWORD not in err

    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert PASSWORD not in "".join(traceback.format_exception(caught.value))


def test_secret_from_env_never_echoed_when_invalid(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in SASL_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SEQSENTINEL_KAFKA__SASL_MECHANISM", PASSWORD)  # pasted in the wrong var
    status, _, err = check_config([], capsys)
    assert status == 2
    assert "kafka.sasl_mechanism: Input should be 'PLAIN'" in err
    assert PASSWORD not in err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = check_config(["--config", str(tmp_path / "nope.toml")], capsys)
    assert (status, out) == (2, "")
    assert "nope.toml: cannot read" in err


def test_check_config_as_a_subprocess(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SEQSENTINEL_")}
    env["SEQSENTINEL_TOPICS__INPUT"] = "from-env"

    def run(toml: str) -> subprocess.CompletedProcess[str]:
        path = write_toml(tmp_path, f'[kafka]\nsasl_password = "{PASSWORD}"\n{toml}')
        command = [sys.executable, "-m", "detector", "check-config", "--config", str(path)]
        return subprocess.run(command, capture_output=True, text=True, env=env, check=False)

    bad = run("[http]\nport = 0\n")
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert "http.port: Input should be greater than or equal to 1" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert PASSWORD not in bad.stderr

    good = run("")
    assert good.returncode == 0
    assert json.loads(good.stdout)["topics"]["input"] == "from-env"
    assert PASSWORD not in good.stdout + good.stderr
