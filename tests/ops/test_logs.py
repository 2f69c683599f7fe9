"""Logging: parseable JSON lines with the standard fields, console text, stdlib records alike."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from model_factory import export_random, make_manifest

from detector import __version__
from detector.config import ConfigError, load_settings
from detector.ops.logs import LogFormat, bind_model_version, configure_logging, default_to_stderr

PASSWORD = "s3cr3t-Pa55word"


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state: put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.reset_defaults()
    default_to_stderr()  # as importing `detector` left it
    root.handlers[:] = handlers
    root.setLevel(level)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_json_lines_carry_standard_and_bound_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info", region="eu-1")
    bind_model_version("fraud-7")
    log = structlog.get_logger("detector.scoring")
    log.info("batch scored", size=12)
    log.debug("not shown at info")

    out, err = capsys.readouterr()
    assert out == ""  # stdout belongs to command output
    [event] = json_lines(err)
    assert list(event)[:4] == ["timestamp", "level", "logger", "event"]
    assert event["level"] == "info"
    assert event["logger"] == "detector.scoring"
    assert event["event"] == "batch scored"
    assert event["size"] == 12
    assert event["service"] == "seqsentinel-detector"
    assert event["version"] == __version__
    assert event["region"] == "eu-1"
    assert event["model_version"] == "fraud-7"
    stamp = datetime.fromisoformat(event["timestamp"])
    assert stamp.utcoffset() == UTC.utcoffset(None)


def test_auto_renders_json_when_not_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("auto")
    structlog.get_logger().warning("disk low", free_mb=10)
    [event] = json_lines(capsys.readouterr().err)
    assert (event["event"], event["free_mb"], event["level"]) == ("disk low", 10, "warning")


def test_console_is_readable_text(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("console", service="seqsentinel-trainer")
    structlog.get_logger("detector.kafka").info("partition assigned", partition=3)
    err = capsys.readouterr().err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err)
    assert "partition assigned" in err
    assert "[detector.kafka]" in err
    assert "partition=3" in err
    assert "service=seqsentinel-trainer" in err
    assert "\x1b[" not in err  # no colour codes when stderr is not a terminal


def test_stdlib_records_go_through_the_same_renderer(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    bind_model_version("m1")
    kafka_log = logging.getLogger("kafka.conn")
    kafka_log.info("library chatter stays below WARNING")
    kafka_log.warning("broker %s unreachable", "k1:9092")
    [event] = json_lines(capsys.readouterr().err)
    assert event["event"] == "broker k1:9092 unreachable"
    assert event["logger"] == "kafka.conn"
    assert event["level"] == "warning"
    assert event["service"] == "seqsentinel-detector"
    assert event["model_version"] == "m1"


def test_level_above_warning_also_quiets_libraries(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "error")
    logging.getLogger("kafka").warning("hidden")
    structlog.get_logger().warning("hidden too")
    logging.getLogger("kafka").error("shown")
    assert [e["event"] for e in json_lines(capsys.readouterr().err)] == ["shown"]


def test_second_call_reconfigures_without_duplicating(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("console")
    configure_logging("json", "info", region="a")
    configure_logging("json", "info", region="b")
    structlog.get_logger().warning("once")
    logging.getLogger("kafka").warning("once too")
    events = json_lines(capsys.readouterr().err)
    assert [(e["event"], e["region"]) for e in events] == [("once", "b"), ("once too", "b")]


def test_bound_fields_reach_other_threads(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json")
    bind_model_version("m2")
    thread = threading.Thread(target=lambda: structlog.get_logger().info("from a thread"))
    thread.start()
    thread.join()
    [event] = json_lines(capsys.readouterr().err)
    assert event["model_version"] == "m2"


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_secrets_stay_out_of_logs(
    fmt: LogFormat, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SEQSENTINEL_KAFKA__SASL_PASSWORD", PASSWORD)
    configure_logging(fmt)
    log = structlog.get_logger("detector.run")
    settings = load_settings()
    log.info("configuration", settings=settings, effective=settings.masked())
    try:
        load_settings(http={"port": 0})
    except ConfigError:
        log.exception("refused")
        logging.getLogger("detector").exception("refused via stdlib")
    err = capsys.readouterr().err
    assert "refused via stdlib" in err
    assert "http.port" in err
    assert PASSWORD not in err


def test_unconfigured_events_go_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    structlog.reset_defaults()
    default_to_stderr()
    structlog.get_logger("detector.engine.scorer").info("model loaded", path="m.onnx")

    out, err = capsys.readouterr()
    assert (out, "model loaded" in err, "m.onnx" in err) == ("", True, True)


def test_a_configuration_made_before_is_kept(capsys: pytest.CaptureFixture[str]) -> None:
    structlog.reset_defaults()
    structlog.configure(logger_factory=lambda *_: structlog.PrintLogger(sys.stdout))
    default_to_stderr()
    structlog.get_logger().info("the host's choice")

    out, err = capsys.readouterr()
    assert ("the host's choice" in out, err) == (True, "")


def test_library_use_keeps_the_callers_stdout(tmp_path: Path) -> None:
    """A program that loads a model (which logs) and prints JSON prints nothing else there."""
    model = export_random(tmp_path / "model.onnx", make_manifest(), seed=1)
    program = (
        "import json, sys\n"
        "from detector.engine.scorer import Scorer\n"
        "scorer = Scorer.load(sys.argv[1])\n"
        "print(json.dumps({'version': scorer.manifest.model_version}))\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", program, str(model)], capture_output=True, text=True, check=True
    )

    assert list(json.loads(result.stdout)) == ["version"]
    assert "model loaded" in result.stderr
