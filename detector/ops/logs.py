"""structlog for the whole process: JSON lines for machines, colored lines for people, on stderr.

stdout is left to command output. Records of the standard `logging` module (kafka-python logs
through it) are rendered by the same processors, so one stream holds one format. Modules log
with `structlog.get_logger(__name__)`; the name shows as the `logger` field.

Used as a library, with logging configured by nobody, the packages log to stderr too
(`default_to_stderr`, run when `detector` is imported): structlog's own default is stdout,
where a log line would corrupt the output of the program using them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from detector import __version__

__all__ = ["LogFormat", "bind_model_version", "configure_logging", "default_to_stderr"]

LogFormat = Literal["auto", "json", "console"]

# Process-wide fields, merged into every event. Not contextvars: threads do not inherit them,
# and the consumer, scorer and HTTP server each run in their own. Replaced, never mutated, so
# that a thread logging while another binds never iterates a changing dict.
_process_fields: dict[str, Any] = {}
_STANDARD_KEYS = ("timestamp", "level", "logger", "event")


def _add_process_fields(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key, value in _process_fields.items():
        event_dict.setdefault(key, value)
    return event_dict


def _add_logger_name(logger: WrappedLogger, _: str, event_dict: EventDict) -> EventDict:
    record = event_dict.get("_record")
    name = record.name if record is not None else getattr(logger, "name", None)
    if name:
        event_dict["logger"] = name
    return event_dict


def _standard_keys_first(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """Put `timestamp level logger event` at the start of each JSON line, where eyes look."""
    lead = {key: event_dict.pop(key) for key in _STANDARD_KEYS if key in event_dict}
    return {**lead, **event_dict}


class _NamedWriteLogger(structlog.WriteLogger):
    """A `WriteLogger` that keeps the name given to `structlog.get_logger(name)`."""

    def __init__(self, file: TextIO, name: str | None) -> None:
        super().__init__(file)
        self.name = name


class _Handler(logging.StreamHandler):
    """The root handler `configure_logging` installs, told apart so a second call replaces it."""


def configure_logging(fmt: LogFormat = "auto", level: str = "info", **bound: Any) -> None:
    """Set up structlog and route stdlib logging through it; calling it again reconfigures.

    `bound` fields (by default `service` and `version`) are added to every event of every
    thread. Standard-library loggers are shown from WARNING (or `level` if higher) so that
    libraries stay quiet; `logging.getLogger("kafka").setLevel(logging.DEBUG)` opens one up.
    """
    stream = sys.stderr
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(
            colors=stream.isatty(),
            # No locals: they would print whatever secrets the failing frame held.
            exception_formatter=structlog.dev.RichTracebackFormatter(show_locals=False)
            if stream.isatty()
            else structlog.dev.plain_traceback,
        )
    )
    shared: list[Processor] = [
        _add_logger_name,
        structlog.contextvars.merge_contextvars,
        _add_process_fields,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if as_json:  # the console renderer formats exceptions itself, with more colour
        shared += [structlog.processors.format_exc_info, _standard_keys_first]

    global _process_fields
    _process_fields = {"service": "seqsentinel-detector", "version": __version__, **bound}
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=lambda name=None, *_: _NamedWriteLogger(stream, name),
        cache_logger_on_first_use=False,
    )

    handler = _Handler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(numeric_level, logging.WARNING))


def default_to_stderr() -> None:
    """Unless structlog is configured already, print its events to stderr instead of stdout.

    Everything else stays structlog's default; `configure_logging`, or the host program's own
    configuration before or after, replaces it.
    """
    if not structlog.is_configured():
        # sys.stderr looked up at each event: a program may replace it after this call.
        structlog.configure(logger_factory=lambda *_: structlog.PrintLogger(sys.stderr))


def bind_model_version(version: str) -> None:
    """Stamp every later event with the model version now serving, after a (re)load."""
    global _process_fields
    _process_fields = {**_process_fields, "model_version": version}
