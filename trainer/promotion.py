"""Put a model into service atomically, and keep the one it replaces for a rollback.

The detector reloads its model file when the file's identity (inode, size, mtime) changes.
New bytes are written beside the target, flushed to disk and renamed over it, so the target
gets a new inode in one step: a detector reading it sees the old model or the new one, never
half a file, and its watcher notices the change. The model displaced is kept as
`<name>.previous`; `rollback` puts it back the same way and keeps the one it displaces there,
so that a rollback can itself be undone.
"""

from __future__ import annotations

import contextlib
import fcntl
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from detector.contract.model_file import file_sha256, load_model_file, write_atomically

__all__ = ["Promotion", "PromotionError", "previous_path", "promote", "rollback"]

PREVIOUS_SUFFIX = ".previous"


class PromotionError(RuntimeError):
    """The model in service could not be replaced or restored; the message says why."""


@dataclass(frozen=True)
class Promotion:
    """What is in service now, and where the model it displaced went (None: there was none)."""

    target: Path
    model_version: str
    sha256: str
    previous: Path | None


def previous_path(target: Path) -> Path:
    """Where the model displaced from `target` is kept."""
    return target.with_name(target.name + PREVIOUS_SUFFIX)


def promote(candidate: Path, target: Path) -> Promotion:
    """Verify `candidate` as the detector would, then put it into service at `target`.

    The model in service, if any, is first kept as `target.previous`, so that no model is
    ever lost. Raises `ModelContractError` for a candidate the detector would refuse.
    """
    manifest, data = load_model_file(candidate)
    target = Path(target)
    with _locked(target):
        displaced = _read(target)
        if displaced is not None:
            write_atomically(previous_path(target), displaced, _mode(target))
        write_atomically(target, data, _mode(target))
    kept = previous_path(target) if displaced is not None else None
    return Promotion(target, manifest.model_version, file_sha256(target), kept)


def rollback(target: Path) -> Promotion:
    """Put `target.previous` back into service; the model it displaces becomes the previous one.

    Raises `PromotionError` when there is no previous model, `ModelContractError` when the
    detector would refuse it.
    """
    target = Path(target)
    previous = previous_path(target)
    with _locked(target):
        if not previous.is_file():
            raise PromotionError(f"{previous}: no previous model to restore")
        manifest, data = load_model_file(previous)
        displaced = _read(target)
        write_atomically(target, data, _mode(target))
        if displaced is not None:
            write_atomically(previous, displaced, _mode(previous))
    kept = previous if displaced is not None else None
    return Promotion(target, manifest.model_version, file_sha256(target), kept)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """One promotion or rollback of `target` at a time (a scheduled run and an operator's)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.with_name(f".{target.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
