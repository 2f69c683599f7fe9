"""Hot model reload: notice a new model file, load it beside the serving one, hand it over.

A watcher thread polls the file's identity (inode, size, mtime) every `reload_interval_s`, or
at once when `request()` is called (on SIGHUP). A changed file is loaded, checked against the
`allowed_sha256` allow-list, validated and warmed up by `Scorer.load` while the old model
keeps serving; the processing loop `take()`s the new one between batches. A file that fails
any step is refused with an error in the log, and the old model stays.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from detector.config import ModelSettings
from detector.contract.model_file import ModelContractError, file_sha256
from detector.engine.scorer import Scorer

__all__ = ["ModelWatcher", "load_scorer"]

log = structlog.get_logger(__name__)

Fingerprint = tuple[int, int, int] | None


def load_scorer(settings: ModelSettings) -> Scorer:
    """Load the configured model, refusing a file that is not on the allow-list (if any).

    The digest is taken before and after loading, so that a file replaced meanwhile cannot
    slip past the allow-list. Raises `ModelContractError`.
    """
    path = settings.path
    allowed = set(settings.allowed_sha256)
    digest = _digest(path) if allowed else ""
    if allowed and digest not in allowed:
        raise ModelContractError(path, f"sha256 {digest} is not in model.allowed_sha256")
    scorer = Scorer.load(
        path, settings.providers, settings.intra_op_threads, settings.inter_op_threads
    )
    if allowed and _digest(path) != digest:
        raise ModelContractError(path, "the file changed while it was being loaded")
    return scorer


def _digest(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as error:
        raise ModelContractError(path, f"cannot read the model file ({error.strerror})") from None


def fingerprint(path: Path) -> Fingerprint:
    """What changes when the file is replaced or rewritten; None when it cannot be read."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class ModelWatcher:
    """Loads changed model files in the background; `take()` returns one when it is ready."""

    def __init__(
        self,
        settings: ModelSettings,
        serving_version: str,
        on_refused: Callable[[str], None],
        loader: Callable[[ModelSettings], Scorer] = load_scorer,
    ) -> None:
        self.settings = settings
        self._loader = loader
        self._on_refused = on_refused
        self._serving_version = serving_version
        self._seen = fingerprint(settings.path)
        self._ready: Scorer | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._forced = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="model-watch", daemon=True)

    def start(self) -> None:
        """Watch in the background; without an interval only `request()` triggers a check."""
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def request(self) -> None:
        """Load the file now even if it looks unchanged (SIGHUP); safe from a signal handler."""
        self._forced = True
        self._wake.set()

    def take(self) -> Scorer | None:
        """The newly loaded model, once; the caller swaps it in and it becomes the serving one."""
        with self._lock:
            scorer, self._ready = self._ready, None
        if scorer is not None:
            self._serving_version = scorer.manifest.model_version
        return scorer

    @property
    def interval(self) -> float | None:
        """Seconds between the background checks; None: only `request()` triggers one."""
        return self.settings.reload_interval_s or None

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self.interval)
            self._wake.clear()
            if not self._stopped:
                self.check()

    def check(self) -> None:
        """Load the file if it changed since the last check (or a reload was requested)."""
        forced, self._forced = self._forced, False
        current = fingerprint(self.settings.path)
        if current == self._seen and not forced:
            return
        self._seen = current
        try:
            scorer = self._loader(self.settings)
        except (ModelContractError, ValueError, OSError) as error:
            log.error("new model file refused; the serving model stays", error=str(error))
            self._on_refused(str(error))
            return
        version = scorer.manifest.model_version
        if version == self._serving_version:
            log.info("model file touched but unchanged", model_version=version)
            return
        with self._lock:
            self._ready = scorer
        log.info("new model loaded and warmed up", model_version=version)
