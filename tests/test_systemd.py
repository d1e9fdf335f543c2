"""The systemd surface: the unit verifies and is sandboxed, and sd_notify datagrams are right."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from rollbackd import notify
from tests.helpers import config_file, daemon_table, payment_error_rate

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "rollbackd.service"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(
    not Path(ANALYZE).exists(), reason="systemd-analyze is not installed"
)


def _settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_declares_the_service_contract() -> None:
    """The unit is Type=notify with a watchdog, reloads by SIGHUP, keeps state in StateDirectory."""
    settings = _settings(UNIT.read_text(encoding="utf-8"))
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30s",
        "ExecStart": "/usr/local/bin/rollbackd run --config /etc/rollbackd/rollbackd.toml",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "60s",
        "LimitNOFILE": "65536",
        "StateDirectory": "rollbackd",
        "StateDirectoryMode": "0700",
        "UMask": "0077",
        "CapabilityBoundingSet": "",
        "ProtectSystem": "strict",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures": "native",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], key
    assert "@system-service" in settings["SystemCallFilter"]


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the unit (ExecStart pointed at an existing binary).

    verify checks that ExecStart's binary exists, and rollbackd is not installed in
    /usr/local/bin on a test machine, so a temporary copy runs /bin/true with the same arguments.
    """
    copy = tmp_path / "rollbackd.service"
    text = UNIT.read_text(encoding="utf-8")
    copy.write_text(
        text.replace("ExecStart=/usr/local/bin/rollbackd ", "ExecStart=/bin/true "),
        encoding="utf-8",
    )
    assert "ExecStart=/bin/true run --config" in copy.read_text(encoding="utf-8")
    result = subprocess.run(
        [ANALYZE, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "rollbackd.service" not in result.stderr, result.stderr


@needs_analyze
def test_unit_security_exposure_is_at_most_two() -> None:
    """``systemd-analyze security --offline=true`` rates the unit's exposure at most 2.0."""
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr.lower():
        pytest.skip(f"this systemd-analyze has no --offline: {result.stderr.strip()}")
    match = re.search(
        r"Overall exposure level for rollbackd\.service: (\d+(?:\.\d+)?)", result.stdout
    )
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


# --- sd_notify --------------------------------------------------------------------------


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """Bind an AF_UNIX datagram socket for NOTIFY_SOCKET (a short path: 108 bytes max)."""
    with tempfile.TemporaryDirectory(prefix="rbn-") as directory:
        path = os.path.join(directory, "notify")  # noqa: PTH118 - the socket API wants str
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.settimeout(5.0)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield sock


def _fields(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode("utf-8").split("\n")


def test_ready_sends_ready_and_status(listener: socket.socket) -> None:
    """ready(text) is one datagram with READY=1 and the status line."""
    assert notify.ready("watching 3 monitors, mode dry-run")
    assert _fields(listener) == ["READY=1", "STATUS=watching 3 monitors, mode dry-run"]


def test_each_message_has_its_field(listener: socket.socket) -> None:
    """watchdog, stopping and status send WATCHDOG=1, STOPPING=1 and STATUS=... datagrams."""
    assert notify.watchdog()
    assert _fields(listener) == ["WATCHDOG=1"]
    assert notify.stopping()
    assert _fields(listener) == ["STOPPING=1"]
    assert notify.status("reload rejected")
    assert _fields(listener) == ["STATUS=reload rejected"]


def test_reloading_carries_monotonic_usec(listener: socket.socket) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC of now on CLOCK_MONOTONIC (systemd >= 253)."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic = _fields(listener)
    assert reloading == "RELOADING=1"
    key, _, value = monotonic.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_text_cannot_forge_fields(listener: socket.socket) -> None:
    """A newline in a status text is flattened, so it cannot add a READY=1 field."""
    assert notify.status("bad\nREADY=1")
    assert _fields(listener) == ["STATUS=bad READY=1"]


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET starting with '@' is an abstract-namespace address."""
    name = f"rollbackd-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready()
        assert _fields(sock) == ["READY=1"]


def test_no_socket_is_a_silent_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET nothing is sent and nothing is logged."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with capture_logs() as logs:
        assert notify.ready("x") is False
        assert notify.watchdog() is False
    assert logs == []


def test_unreachable_socket_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A socket nobody listens on makes send return False and log notify_failed."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent"))
    with capture_logs() as logs:
        assert notify.watchdog() is False
    assert [entry["event"] for entry in logs] == ["notify_failed"]
    assert logs[0]["fields"] == ["WATCHDOG"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    """The heartbeat is half of WATCHDOG_USEC, and only for the process WATCHDOG_PID names."""
    assert notify.watchdog_interval(env) == expected


@pytest.mark.slow
def test_daemon_speaks_the_notify_protocol(tmp_path: Path) -> None:
    """The real daemon sends READY, WATCHDOG pings, RELOADING on SIGHUP and STOPPING on SIGTERM."""
    short = Path(tempfile.mkdtemp(prefix="rbn-"))  # AF_UNIX paths: 108 bytes at most
    path = short / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(10)
    raw = {
        "daemon": daemon_table(tmp_path / "state", mode=None),
        "sources": {"boop": {"type": "synthetic", "phases": [{"kind": "healthy"}]}},
        "monitors": {
            "payments": {
                "interval": "200ms",
                "rules": [payment_error_rate("boop", "payment_error_rate", unit=None)],
            }
        },
    }
    config = config_file(tmp_path, raw)
    env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)  # unset: the pings are not restricted to one pid
    process = subprocess.Popen(
        [sys.executable, "-m", "rollbackd", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seen: list[str] = []

    def until(field: str) -> None:
        deadline = time.monotonic() + 15
        while not any(f.startswith(field) for f in seen):
            assert time.monotonic() < deadline, f"{field} not received; got {seen}"
            seen.extend(_fields(sock))

    try:
        until("READY=1")
        until("WATCHDOG=1")
        process.send_signal(signal.SIGHUP)
        until("RELOADING=1")
        process.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        sock.close()
        shutil.rmtree(short)
    assert any(f.startswith("STATUS=watching 1 monitors") for f in seen)
    assert any(f.startswith("MONOTONIC_USEC=") for f in seen)
