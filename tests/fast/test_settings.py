"""Settings as docs/configuration.md documents them: each variable it names sets its setting."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from detector.commands.config_docs import PAGE
from detector.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| `(\w+)` \| `(SEQSENTINEL_\w+)` \|", re.MULTILINE)
SECTION = re.compile(r"^## `\[(\w+)\]`$", re.MULTILINE)


def documented_variables() -> dict[str, str]:
    """`section.setting` -> the environment variable the committed page names for it."""
    page = (ROOT / PAGE).read_text(encoding="utf-8")
    parts = SECTION.split(page)[1:]  # section, its text, section, its text, ...
    return {
        f"{section}.{name}": variable
        for section, text in zip(parts[::2], parts[1::2], strict=True)
        for name, variable in ROW.findall(text)
    }


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("SEQSENTINEL_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("setting", "text", "value"),
    [
        ("kafka.bootstrap_servers", "a:9092, b:9092", "a:9092,b:9092"),
        ("kafka.create_topics", "false", False),
        ("kafka.sasl_mechanism", "SCRAM-SHA-512", "SCRAM-SHA-512"),
        ("topics.input", "payments", "payments"),
        ("model.path", "/models/model.onnx", Path("/models/model.onnx")),
        ("model.providers", '["CPUExecutionProvider"]', ["CPUExecutionProvider"]),
        ("batching.max_batch", "512", 512),
        ("state.key_ttl_s", "3600", 3600.0),
        ("scoring.late_events", "score", "score"),
        ("processing.guarantee", "exactly_once", "exactly_once"),
        ("log.level", "WARNING", "warning"),
    ],
)
def test_the_documented_variable_sets_its_setting(
    monkeypatch: pytest.MonkeyPatch, setting: str, text: str, value: object
) -> None:
    monkeypatch.setenv(documented_variables()[setting], text)
    section, name = setting.split(".")
    assert getattr(getattr(load_settings(), section), name) == value


def test_every_setting_of_the_model_is_documented() -> None:
    settings = load_settings().model_dump()
    expected = {f"{section}.{name}" for section, fields in settings.items() for name in fields}
    assert set(documented_variables()) == expected


def test_the_environment_overrides_the_toml_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "detector.toml"
    config.write_text('[topics]\ninput = "from-file"\nalerts = "file-alerts"\n')
    monkeypatch.setenv(documented_variables()["topics.input"], "from-env")

    topics = load_settings(config).topics

    assert (topics.input, topics.alerts) == ("from-env", "file-alerts")


def test_a_wrong_value_is_refused_naming_the_setting_not_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(documented_variables()["http.port"], "70000")
    monkeypatch.setenv(documented_variables()["kafka.sasl_password"], "hunter2")

    with pytest.raises(ConfigError) as refused:
        load_settings()

    assert refused.value.problems[0].startswith("http.port:")
    assert "hunter2" not in str(refused.value) and "70000" not in str(refused.value)
