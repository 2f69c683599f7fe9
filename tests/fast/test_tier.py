"""The fast tier itself: it collects with torch blocked, also inside the whole suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FAST = Path(__file__).resolve().parent
BLOCK_TORCH_THEN_COLLECT = (
    "import sys; sys.modules['torch'] = None; import pytest; "
    "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', sys.argv[1]]))"
)


def test_every_module_of_the_fast_tier_imports_without_torch() -> None:
    """A test module of the tier that imports torch, or anything that does (the trainer,
    tests/model_factory.py), fails to collect here."""
    run = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH_THEN_COLLECT, str(FAST)],
        capture_output=True,
        text=True,
        cwd=FAST.parent.parent,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
