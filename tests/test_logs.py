"""Log setup: JSON lines off a terminal, console on one, secrets redacted, libraries at warning."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from rollbackd import logs, notify


class Terminal(io.StringIO):
    """A stream that says it is a TTY."""

    def isatty(self) -> bool:
        """Pretend to be a terminal."""
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put structlog and the root logger back as they were after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_with_timestamp_level_event() -> None:
    """In json format each event is one JSON object with timestamp, level, event and its keys."""
    out = io.StringIO()
    logs.configure("json", "info", stream=out)
    structlog.get_logger("t").info("rollback_started", monitor="payments", incident="i-1")
    (line,) = _lines(out)
    assert line["event"] == "rollback_started"
    assert line["level"] == "info"
    assert line["monitor"] == "payments"
    assert line["incident"] == "i-1"
    assert line["timestamp"].endswith("Z")


def test_auto_is_json_off_a_terminal() -> None:
    """Format "auto" writes JSON when the stream is not a TTY (journald, files, pipes)."""
    out = io.StringIO()
    logs.configure("auto", "info", stream=out)
    structlog.get_logger("t").warning("check_failed", monitor="auth")
    assert _lines(out)[0]["event"] == "check_failed"


def test_auto_is_readable_on_a_terminal() -> None:
    """Format "auto" writes the console renderer's text on a TTY, not JSON."""
    out = Terminal()
    logs.configure("auto", "info", stream=out)
    structlog.get_logger("t").info("daemon_ready", mode="dry-run")
    text = out.getvalue()
    assert "daemon_ready" in text
    assert "mode" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])


def test_level_filters_events() -> None:
    """Events below the configured level are not written."""
    out = io.StringIO()
    logs.configure("json", "warning", stream=out)
    log = structlog.get_logger("t")
    log.info("check")
    log.debug("check")
    log.error("plan_step_failed")
    assert [line["event"] for line in _lines(out)] == ["plan_step_failed"]


def test_secrets_never_reach_the_output() -> None:
    """Secret-looking keys, bearer tokens and URL passwords are redacted, nested ones too."""
    out = io.StringIO()
    logs.configure("json", "debug", stream=out)
    structlog.get_logger("t").info(
        "action_request",
        token="tok-123",
        api_key="key-456",
        headers={"Authorization": "Bearer abc.def", "Accept": "application/json"},
        url="https://deploy:pa55word@flags.example/api",
        error="server said: Bearer zzz-top is expired",
        items=[{"password": "hunter2"}],
        monitor="payments",
    )
    raw = out.getvalue()
    for secret in ("tok-123", "key-456", "abc.def", "pa55word", "zzz-top", "hunter2"):
        assert secret not in raw
    (line,) = _lines(out)
    assert line["token"] == "***"
    assert line["headers"] == {"Authorization": "***", "Accept": "application/json"}
    assert line["url"] == "https://deploy:***@flags.example/api"
    assert line["monitor"] == "payments"


def test_redact_leaves_ordinary_events_alone() -> None:
    """Redaction changes nothing in an event without secrets."""
    out = io.StringIO()
    logs.configure("json", "info", stream=out)
    structlog.get_logger("t").info("check", monitor="payments", failures=3, values=[1.0, 2.0])
    (line,) = _lines(out)
    assert (line["monitor"], line["failures"], line["values"]) == ("payments", 3, [1.0, 2.0])


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_carry_no_locals_and_no_known_secret(fmt: str) -> None:
    """A traceback shows no local variables, and a known secret in its text is redacted."""
    out = io.StringIO()
    password = "pw-\u20ac-CANARY\nsecond-line"  # a € and a line break, as read from a file
    redactor = logs.configure(fmt, "info", stream=out)
    redactor.learn([password])

    def refuse(topic: str) -> None:
        credentials = {"password": password}  # a local a traceback would otherwise show
        raise ValueError(f"broker refused {topic!r} for {credentials['password']!r}")

    try:
        refuse("alerts/x")
    except ValueError:
        structlog.get_logger("t").exception("publish_failed")
    text = out.getvalue()
    assert "publish_failed" in text
    assert "broker refused" in text
    for piece in ("CANARY", "second-line", "\\u20ac", "\\xe2\\x82\\xac"):
        assert piece not in text, piece
    if fmt == "json":
        (line,) = _lines(out)
        frames = line["exception"][0]["frames"]
        assert all("locals" not in frame for frame in frames), "no locals in tracebacks"
    assert "{'password'" not in text, "no locals in tracebacks"


def test_credentials_in_command_output_are_redacted() -> None:
    """Schemes beyond Bearer/Basic (an exec's output with ``Authorization: Token``) are hidden."""
    out = io.StringIO()
    logs.configure("json", "info", stream=out)
    structlog.get_logger("t").info(
        "action_ok", detail="curl said: Authorization: Token 9f8e7d6c; X-Api-Key: k-1234"
    )
    (line,) = _lines(out)
    assert "9f8e7d6c" not in line["detail"]
    assert "k-1234" not in line["detail"]
    assert "Authorization: Token ***" in line["detail"]


def test_long_values_are_cut() -> None:
    """A 1 MB query is not echoed whole into a log line."""
    out = io.StringIO()
    logs.configure("json", "info", stream=out)
    structlog.get_logger("t").info("check_failed", reasons=["x" * 1_000_000])
    assert len(out.getvalue()) < 5000


def test_stdlib_libraries_at_warning() -> None:
    """Library logging below warning is dropped; warnings come out as JSON, redacted, named."""
    out = io.StringIO()
    logs.configure("json", "debug", stream=out)
    library = logging.getLogger("aiomqtt.client")
    library.info("Subscribed")
    library.warning("Reconnecting; Authorization: Bearer s3cr3t")
    (line,) = _lines(out)
    assert line["level"] == "warning"
    assert line["logger"] == "aiomqtt.client"
    assert "s3cr3t" not in line["event"]


def test_module_loggers_follow_reconfiguration() -> None:
    """Loggers created at import time are not frozen: capture_logs still sees them."""
    logs.configure("json", "info", stream=io.StringIO())
    with capture_logs() as captured:
        notify.log.warning("notify_failed", socket="/x")
    assert captured == [{"event": "notify_failed", "socket": "/x", "log_level": "warning"}]
