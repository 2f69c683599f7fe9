"""docs/configuration.md is what the settings model says today."""

from __future__ import annotations

from pathlib import Path

from detector.commands.config_docs import COMMAND, PAGE, render
from detector.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_the_committed_configuration_page_is_up_to_date() -> None:
    committed = (ROOT / PAGE).read_text(encoding="utf-8")
    assert committed == render(), f"{PAGE} is out of date with detector/config.py: run `{COMMAND}`"


def test_every_setting_has_a_description() -> None:
    """The page is made of the descriptions: a setting without one would be a blank cell."""
    missing = [
        f"{section}.{name}"
        for section, field in Settings.model_fields.items()
        for name, setting in field.annotation.model_fields.items()
        if not setting.description
    ]
    assert not missing, f"add a docstring under these settings in detector/config.py: {missing}"
