"""The state directory: one daemon's lock on it, and the marker that guards its database.

A database deleted or replaced while the daemon runs is refused by the store
(``state.Store``); one missing at start, from a directory that held one, is refused here.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from rollbackd.errors import StateError

LOCK_FILE = "rollbackd.lock"
MARKER = "state.marker"


def refuse_lost_database(database: Path) -> None:
    """StateError when ``database`` is gone from a directory that is marked as holding it."""
    marker = database.parent / MARKER
    if not database.exists() and marker.exists():
        raise StateError(
            f"state database {database} is missing, but {marker} says this directory held "
            "rollbackd state (latches, incidents): restore it from a backup, or delete "
            f"{marker} to start deliberately with empty state"
        )


def mark_database(database: Path) -> None:
    """Leave the marker that makes a later start refuse to run without ``database``.

    Also make the database and its journals readable by the service's user only.
    """
    for path in (database, *(database.with_name(database.name + x) for x in ("-wal", "-shm"))):
        try:
            path.chmod(0o600)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StateError(f"cannot make {path} private (chmod 600): {exc.strerror}") from exc
    marker = database.parent / MARKER
    if marker.exists():
        return
    try:
        marker.write_text(
            f"rollbackd keeps its state in {database.name} here. If it goes missing, rollbackd "
            "refuses to start (so a lost latch cannot roll back twice): restore it, or delete "
            "this file to start with empty state.\n",
            encoding="utf-8",
        )
    except OSError as exc:
        raise StateError(f"cannot write {marker}: {exc.strerror}") from exc


class StateDirLock:
    """An exclusive ``flock`` on the state directory itself: one daemon per state, ever.

    The lock is on the open directory, not on a file that someone could delete;
    ``rollbackd.lock`` only tells the holder's pid.
    """

    def __init__(self, state_dir: Path) -> None:
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            state_dir.chmod(0o700)  # it holds evidence and the control token: the service's only
            self._fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise StateError(
                f"cannot use state directory {state_dir} (daemon.state_dir): {exc.strerror}"
            ) from exc
        pid_file = state_dir / LOCK_FILE
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            owner = _read_pid(pid_file)
            raise StateError(
                f"{state_dir} is in use by another rollbackd (pid {owner}); "
                "stop it or give this one another daemon.state_dir"
            ) from exc
        try:
            pid_file.write_text(f"{os.getpid()}\n", encoding="utf-8")
        except OSError as exc:
            self.close()
            raise StateError(f"cannot write {pid_file}: {exc.strerror}") from exc

    def close(self) -> None:
        """Release the lock (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _read_pid(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "unknown"
    except (OSError, UnicodeDecodeError):
        return "unknown"
