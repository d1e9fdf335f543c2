"""Log setup: structlog as JSON lines in production, readable on a terminal, secrets redacted.

Libraries' stdlib logging goes through the same renderer at warning level and above.
Tracebacks carry no local variables, and redaction runs over the final rendered line, so
no field, message or traceback text escapes it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection
from typing import Any, Literal, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import EventDict, Processor, WrappedLogger

from rollbackd.redact import Redactor

Format = Literal["auto", "json", "console"]

EVENT_CHARS = 2000
"""Longest text value a log event keeps (a 1 MB query is not echoed into every line)."""


def configure(
    fmt: Format = "auto",
    level: str = "info",
    *,
    stream: TextIO | None = None,
    quiet: Collection[str] = (),
    redactor: Redactor | None = None,
) -> Redactor:
    """Set up structlog and stdlib logging for the process; ``auto`` is JSON unless on a TTY.

    Events named in ``quiet`` are dropped (the demo shows checks its own way). Returns the
    redactor in use: tell it the secrets (``learn``) as they are read.
    """
    redactor = redactor or Redactor()
    out = sys.stderr if stream is None else stream
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    threshold = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Processor] = [
        *([_dropper(frozenset(quiet))] if quiet else []),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _fields_redactor(redactor),
    ]
    renderer: Processor
    tail: list[Processor]
    if as_json:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
        no_locals = ExceptionDictTransformer(show_locals=False)
        tail = [structlog.processors.ExceptionRenderer(no_locals), renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        tail = [renderer]
    tail.append(_line_redactor(redactor))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.StackInfoRenderer(),
            *shared,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(out),
        # Loggers are module globals created at import; caching would freeze the first config.
        cache_logger_on_first_use=False,
    )
    _route_stdlib(out, tail, shared, max(threshold, logging.WARNING))
    return redactor


def _route_stdlib(out: TextIO, tail: list[Processor], shared: list[Processor], level: int) -> None:
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
                *shared,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def _fields_redactor(redactor: Redactor) -> Processor:
    """Processor: secret-named fields lose their value; long texts are cut."""

    def redact_fields(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        for key in list(event_dict):
            if key != "event":
                event_dict[key] = _cut(redactor.value(event_dict[key], key))
        return event_dict

    return redact_fields


def _line_redactor(redactor: Redactor) -> Processor:
    """Processor after the renderer: secrets out of the final line, tracebacks included."""

    def redact_line(_logger: WrappedLogger, _method: str, line: Any) -> Any:
        return redactor.text(line) if isinstance(line, str) else line

    return redact_line


def _cut(value: Any) -> Any:
    if isinstance(value, str) and len(value) > EVENT_CHARS:
        return f"{value[:EVENT_CHARS]}… ({len(value)} characters)"
    if isinstance(value, list):
        return [_cut(v) for v in value]
    return value


def _dropper(events: frozenset[str]) -> Processor:
    def drop(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        if event_dict.get("event") in events:
            raise structlog.DropEvent
        return event_dict

    return drop
