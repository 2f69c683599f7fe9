"""The command lines: registering the sub-commands stays light, and their help stays complete.

How fast the commands start is bench/startup.py's to measure; here only what they import.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from rich.console import Console
from rich.table import Table

from detector import cli as detector_cli
from detector.cli import main as detector_main
from detector.commands.options import FILE_FORMATS
from detector.commands.output import stdout_console
from detector.files.readers import SUFFIXES
from trainer import cli as trainer_cli
from trainer import retrain
from trainer.cli import main as trainer_main
from trainer.commands import retrain as retrain_command
from trainer.commands.synth import KINDS
from trainer.synth import GENERATORS

#: Modules that registering a sub-command must not import: each costs from a tenth of a second
#: (numpy) to seconds (torch), and only the command that needs one should pay for it.
HEAVY = {
    "kafka",
    "matplotlib",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "pyarrow",
    "scipy",
    "sklearn",
    "torch",
}
COMMANDS = {
    "detector": ["check-config", "replay", "inspect-model", "run", "produce", "tail-alerts"],
    "trainer": ["synth", "train", "inspect", "evaluate", "retrain", "rollback"],
}
#: Runs `tool`'s main(argv) for each argv, its output and exits swallowed.
PROBE = """
import contextlib, io
from {tool}.cli import main
for argv in {argvs!r}:
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        main(argv)
"""
TOOLS = ["detector", "trainer"]
COMMAND_MODULES = [
    f"{package}.commands.{name}"
    for package, names in (
        ("detector", detector_cli.COMMAND_MODULES),
        ("trainer", trainer_cli.COMMAND_MODULES),
    )
    for name in names
]


def imported_by(code: str) -> set[str]:
    """The top-level names of the modules a fresh interpreter has imported after `code`."""
    listing = (
        'import json, sys; print(json.dumps(sorted({n.partition(".")[0] for n in sys.modules})))'
    )
    result = subprocess.run(
        [sys.executable, "-c", f"{code}\n{listing}"], capture_output=True, text=True, check=True
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


def running(tool: str, *argvs: list[str]) -> str:
    return PROBE.format(tool=tool, argvs=list(argvs))


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_registering_a_command_imports_nothing_heavy(module: str) -> None:
    assert imported_by(f"import {module}") & HEAVY == set()


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("option", ["--version", "--help"])
def test_starting_a_tool_imports_nothing_heavy(tool: str, option: str) -> None:
    assert imported_by(running(tool, [option])) & HEAVY == set()


@pytest.mark.parametrize("tool", TOOLS)
def test_the_help_of_every_sub_command_imports_nothing_heavy(tool: str) -> None:
    argvs = ([command, "--help"] for command in COMMANDS[tool])
    assert imported_by(running(tool, *argvs)) & HEAVY == set()


def help_text(tool: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    main = detector_main if tool == "detector" else trainer_main
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("tool", ["detector", "trainer"])
def test_help_lists_every_sub_command(tool: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(tool, [], capsys)

    assert [command for command in COMMANDS[tool] if f" {command} " not in text] == []


@pytest.mark.parametrize(
    ("tool", "command", "expected"),
    [
        ("detector", "replay", ["--threads N", "{csv,jsonl,parquet}", "more than 10% of the"]),
        ("trainer", "evaluate", ["--threads N", "{csv,jsonl,parquet}", "--no-progress"]),
        ("trainer", "synth", ["{sensors,transactions}", "--keys KEYS"]),
        ("trainer", "retrain", ["{auprc,auroc,f1,", "(default 0.05)", "--holdout FRACTION"]),
        ("trainer", "inspect", ["model", "--json"]),
    ],
)
def test_sub_command_help_is_complete(
    tool: str, command: str, expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_text(tool, [command], capsys)

    assert [part for part in expected if part not in text] == []


def test_choices_named_at_registration_are_those_of_the_modules_that_run() -> None:
    """Mirrored so that registering need not import those modules: kept equal here."""
    assert sorted(FILE_FORMATS) == sorted(set(SUFFIXES.values()))
    assert sorted(KINDS) == sorted(GENERATORS)
    assert sorted(retrain_command.METRIC_NAMES) == sorted(retrain.METRICS)
    assert retrain_command.DEFAULT_MAX_REJECTED == retrain.DEFAULT_MAX_REJECTED


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["synth", "sensors", "--out", "x", "--keys", "0"], "--keys: must be at least 1"),
        (["evaluate", "--model", "m", "--data", "d", "--out", "o", "--threads", "-2"], "least 0"),
        (["evaluate", "--model", "m", "--data", "d", "--out", "o", "--threads", "two"], "two"),
    ],
)
def test_counts_are_checked_when_parsed(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        trainer_main(argv)

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def wide_table() -> Table:
    table = Table("setting", "value")
    table.add_row("graph sha256", "0123456789abcdef" * 8)
    return table


def test_tables_keep_their_width_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    stdout_console().print(wide_table())
    unfolded = capsys.readouterr().out
    Console().print(wide_table())  # rich's default: 80 columns off a terminal

    assert "0123456789abcdef" * 8 in unfolded
    assert "0123456789abcdef" * 8 not in capsys.readouterr().out
