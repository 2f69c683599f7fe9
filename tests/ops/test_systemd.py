"""The sd_notify client against a socket the test owns, and the systemd units in deploy/systemd."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from detector.config import Settings, load_settings
from detector.ops.systemd import SystemdNotifier

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
DETECTOR_UNIT = UNITS / "seqsentinel-detector.service"
RETRAIN_UNIT = UNITS / "seqsentinel-retrain.service"
RETRAIN_TIMER = UNITS / "seqsentinel-retrain.timer"
#: `trainer retrain`'s exit status when the challenger lost and the champion stays in service.
CHAMPION_KEPT = "3"

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """Sections of a unit file, keeping every assignment of a key in order: systemd repeats keys."""
    sections: Unit = {}
    section: dict[str, list[str]] = {}
    logical = ""
    for line in path.read_text().splitlines():
        if not logical and line.lstrip().startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical, line = "", logical + line
        if match := re.fullmatch(r"\[(\w+)\]", line.strip()):
            section = sections.setdefault(match[1], {})
        elif line.strip():
            key, _, value = line.partition("=")
            section.setdefault(key.strip(), []).append(" ".join(value.split()))
    return sections


def read_env_file(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {key: value for key, value in pairs}


@pytest.fixture
def receiver() -> Iterator[socket.socket]:
    """A datagram socket in the abstract namespace, standing in for systemd's notify socket."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(f"\0seqsentinel-test-{uuid.uuid4().hex}")
    server.settimeout(2)
    yield server
    server.close()


def received(server: socket.socket, count: int) -> list[bytes]:
    return [server.recv(4096) for _ in range(count)]


def test_state_changes_arrive_in_order_at_an_abstract_address(receiver: socket.socket) -> None:
    address = "@" + receiver.getsockname()[1:].decode()
    notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": address})

    sent = [
        notifier.ready(),
        notifier.watchdog(),
        notifier.status("scoring 3 partitions\nlag 12"),
        notifier.stopping(),
    ]
    notifier.close()

    assert notifier.enabled
    assert sent == [True] * 4
    assert received(receiver, 4) == [
        b"READY=1",
        b"WATCHDOG=1",
        b"STATUS=scoring 3 partitions lag 12",
        b"STOPPING=1",
    ]


def test_filesystem_socket_path(tmp_path_factory: pytest.TempPathFactory) -> None:
    # A short folder of its own: AF_UNIX paths are limited to 107 bytes.
    path = Path(tmp_path_factory.mktemp("sd")) / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        notifier = SystemdNotifier.from_environment({"NOTIFY_SOCKET": str(path)})

        assert notifier.notify("READY=1", "STATUS=warming up")
        assert received(server, 1) == [b"READY=1\nSTATUS=warming up"]
        notifier.close()


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = SystemdNotifier.from_environment({})

    assert not notifier.enabled
    assert [notifier.ready(), notifier.watchdog(), notifier.status("x"), notifier.stopping()] == [
        False
    ] * 4
    assert notifier.watchdog_interval() is None


def test_a_vanished_manager_is_reported(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = Path(tmp_path_factory.mktemp("sd")) / "gone"
    notifier = SystemdNotifier(str(path))

    assert notifier.ready() is False


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    environ: dict[str, str], interval: float | None
) -> None:
    environ = {"NOTIFY_SOCKET": "@unused", **environ}

    assert SystemdNotifier.from_environment(environ).watchdog_interval() == interval


def test_detector_unit_is_a_hardened_notify_service() -> None:
    service = parse_unit(DETECTOR_UNIT)["Service"]
    shutdown_budget = Settings().processing.shutdown_timeout_s

    assert service["Type"] == ["notify"]
    assert service["WatchdogSec"] == ["30"]
    assert service["Restart"] == ["on-failure"]
    assert int(service["RestartSec"][0]) > 0
    assert float(service["TimeoutStopSec"][0]) > shutdown_budget
    assert service["EnvironmentFile"] == ["/etc/seqsentinel/detector.env"]
    assert service["ExecStart"] == ["/opt/seqsentinel/bin/detector run"]
    assert service["User"] == ["seqsentinel"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelTunables"):
        assert service[key] == ["yes"], key
    assert service["ProtectControlGroups"] == ["yes"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["CapabilityBoundingSet"] == [""]
    assert service["SystemCallFilter"][0] == "@system-service"
    assert service["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert "ReadWritePaths" not in service  # it only reads the model


def test_retrain_unit_writes_the_model_the_detector_reads() -> None:
    service = parse_unit(RETRAIN_UNIT)["Service"]
    model = Path(read_env_file(UNITS / "detector.env.example")["SEQSENTINEL_MODEL__PATH"])
    command = service["ExecStart"][0].split()

    assert service["Type"] == ["oneshot"]
    assert CHAMPION_KEPT in service["SuccessExitStatus"][0].split()
    assert command[:2] == ["/opt/seqsentinel/bin/trainer", "retrain"]
    assert command[command.index("--champion") + 1] == str(model)
    assert command[command.index("--promote-to") + 1] == str(model)
    assert str(model.parent) in service["ReadWritePaths"][0].split()
    assert service["User"] == ["seqsentinel"]
    assert service["ProtectSystem"] == ["strict"]
    assert service["NoNewPrivileges"] == ["yes"]
    assert service["CapabilityBoundingSet"] == [""]
    assert service["SystemCallFilter"] == ["@system-service"]
    assert "RETRAIN_ARGS" in read_env_file(UNITS / "retrain.env.example")


def test_retrain_timer_is_weekly_and_catches_up() -> None:
    timer = parse_unit(RETRAIN_TIMER)["Timer"]

    assert timer["OnCalendar"] == ["weekly"]
    assert timer["Persistent"] == ["true"]
    assert "RandomizedDelaySec" in timer
    assert parse_unit(RETRAIN_TIMER)["Install"]["WantedBy"] == ["timers.target"]


def test_detector_env_example_names_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    environ = read_env_file(UNITS / "detector.env.example")
    for name, value in environ.items():
        # A top-level typo would be ignored silently; nested unknown keys fail load_settings.
        section = re.fullmatch(r"SEQSENTINEL_([A-Z]+)__[A-Z_]+", name)
        assert section and section[1].lower() in Settings.model_fields, name
        monkeypatch.setenv(name, value)

    settings = load_settings()

    assert settings.kafka.group_id == environ["SEQSENTINEL_KAFKA__GROUP_ID"]
    assert settings.kafka.sasl_password is not None
    assert str(settings.model.path) == environ["SEQSENTINEL_MODEL__PATH"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    # verify checks that ExecStart is executable: point it at this environment's console scripts.
    scripts = Path(sys.executable).parent
    for unit in (DETECTOR_UNIT, RETRAIN_UNIT, RETRAIN_TIMER):
        text = unit.read_text().replace("/opt/seqsentinel/bin/", f"{scripts}/")
        (tmp_path / unit.name).write_text(text)

    result = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(path) for path in tmp_path.iterdir())],
        capture_output=True,
        text=True,
        check=False,
    )

    # Unknown keys and bad values are only warnings: any output is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
