"""Log setup: structlog as JSON lines in production, readable on a terminal, secrets redacted.

Libraries' stdlib logging goes through the same renderer at warning level and above.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Collection, Mapping
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

Format = Literal["auto", "json", "console"]

REDACTED = "***"

_SECRET_KEY = re.compile(
    r"token|passw(or)?d|secret|authori[sz]ation|api_?key|cookie", re.IGNORECASE
)
_BEARER = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_URL_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]*):[^/@\s]*@")


def configure(
    fmt: Format = "auto",
    level: str = "info",
    *,
    stream: TextIO | None = None,
    quiet: Collection[str] = (),
) -> None:
    """Set up structlog and stdlib logging for the process; ``auto`` is JSON unless on a TTY.

    Events named in ``quiet`` are dropped (the demo shows checks its own way).
    """
    out = sys.stderr if stream is None else stream
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    threshold = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Processor] = [
        *([_dropper(frozenset(quiet))] if quiet else []),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact,
    ]
    renderer: Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
        tail: list[Processor] = [structlog.processors.dict_tracebacks, renderer]
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
        tail = [renderer]
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


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Processor: replace values of secret-looking keys, bearer tokens and URL passwords."""
    for key in list(event_dict):
        if key != "event":
            event_dict[key] = _clean(key, event_dict[key])
    event = event_dict.get("event")
    if isinstance(event, str):
        event_dict["event"] = _scrub(event)
    return event_dict


def _clean(key: object, value: Any) -> Any:
    if isinstance(key, str) and _SECRET_KEY.search(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return _scrub(value)
    if isinstance(value, Mapping):
        return {k: _clean(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(None, v) for v in value]
    if isinstance(value, tuple):
        return tuple(_clean(None, v) for v in value)
    return value


def _scrub(text: str) -> str:
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _URL_USERINFO.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)


def _dropper(events: frozenset[str]) -> Processor:
    def drop(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        if event_dict.get("event") in events:
            raise structlog.DropEvent
        return event_dict

    return drop
