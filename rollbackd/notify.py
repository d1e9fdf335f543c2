"""A dependency-free sd_notify client: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

Every function is a no-op without ``$NOTIFY_SOCKET`` and never raises into the daemon.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("rollbackd.notify")


def send(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``KEY=VALUE`` fields as one datagram; True if sent, False if not (or no socket)."""
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    payload = "\n".join(fields).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never block the event loop on a full queue: a lost heartbeat is logged instead.
            sock.setblocking(False)
            sock.sendto(payload, target)
    except (OSError, ValueError) as exc:  # ValueError: an address with an embedded NUL
        log.warning("notify_failed", socket=address, fields=_names(fields), error=str(exc))
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Tell systemd the service is up (startup done, or a reload finished)."""
    fields = ["READY=1"]
    if status_text is not None:
        fields.append(_status_field(status_text))
    return send(*fields)


def status(text: str) -> bool:
    """Set the one-line status shown by ``systemctl status``."""
    return send(_status_field(text))


def watchdog() -> bool:
    """Pet the watchdog (``WatchdogSec=``)."""
    return send("WATCHDOG=1")


def reloading() -> bool:
    """Tell systemd a reload started (with the monotonic time systemd >= 253 wants)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return send("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    """Tell systemd shutdown started."""
    return send("STOPPING=1")


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Return seconds between heartbeats (half of ``$WATCHDOG_USEC``), or None without one."""
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid is not None and pid.strip() != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def _status_field(text: str) -> str:
    # A newline would start a new field: a status text could otherwise forge READY=1.
    return "STATUS=" + " ".join(text.splitlines())


def _names(fields: tuple[str, ...]) -> list[str]:
    return [field.partition("=")[0] for field in fields]
