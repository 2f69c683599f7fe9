"""constraints.txt, the lock: it pins every dependency, and every install goes through it."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from test_docker_install import environment, parse_dockerfile, values

ROOT = Path(__file__).resolve().parents[2]
LOCK = "constraints.txt"
#: The Pythons the lock promises to serve, on Linux x86_64.
PYTHONS = ("3.11", "3.12", "3.13")


def _marker_environment(python: str) -> dict[str, str]:
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
    }


def _applies(requirement: Requirement, python: str, extra: str = "") -> bool:
    marker = requirement.marker
    return marker is None or marker.evaluate(_marker_environment(python) | {"extra": extra})


def _pins() -> list[Requirement]:
    lines = (ROOT / LOCK).read_text().splitlines()
    return [Requirement(line) for line in lines if line and not line.lstrip().startswith("#")]


def _project_requirements() -> list[tuple[Requirement, str]]:
    """Every requirement of pyproject.toml with the extra that brings it ("" for the base)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].items()
    every = [("", project["dependencies"]), *extras]
    return [(Requirement(text), extra) for extra, texts in every for text in texts]


def test_every_pin_is_exact() -> None:
    pins = _pins()

    assert len(pins) > 20
    assert [pin.name for pin in pins if len(pin.specifier) != 1] == []
    assert {spec.operator for pin in pins for spec in pin.specifier} == {"=="}


@pytest.mark.parametrize("python", PYTHONS)
def test_every_project_requirement_is_pinned_within_its_range(python: str) -> None:
    pins: dict[str, list[str]] = {}
    for pin in _pins():
        if _applies(pin, python):
            pins.setdefault(pin.name.lower(), []).append(next(iter(pin.specifier)).version)
    misses = []
    for requirement, extra in _project_requirements():
        if not _applies(requirement, python, extra):
            continue
        versions = pins.get(requirement.name.lower(), [])
        if len(versions) != 1 or versions[0] not in requirement.specifier:
            misses.append(f"{requirement} -> {versions}")

    assert misses == [], "run `make lock` after changing pyproject.toml"


def test_images_install_through_the_lock() -> None:
    stages = parse_dockerfile((ROOT / "Dockerfile").read_text())
    build = stages["build"]
    copied = [name for arguments in values(build, "COPY") for name in arguments.split()[:-1]]
    workdir = values(build, "WORKDIR")[-1]

    assert LOCK in copied
    assert environment(build)["PIP_CONSTRAINT"] == f"{workdir}/{LOCK}"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_venv_installs_through_the_lock() -> None:
    """`make -n -W pyproject.toml venv`: the commands a changed pyproject.toml would run."""
    result = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", "venv"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    installs = [line for line in result.stdout.splitlines() if "pip install" in line]

    assert installs[-1].split("pip install", 1)[1].split() == [
        "-c",
        LOCK,
        "-e",
        "'.[train,dev,bench,confluent]'",
    ]
