"""Atomic file replacement: temporary file, fsync, rename, fsync of the directory."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

_DEFAULT_MODE = 0o644


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path``'s content at once: temp file beside it, fsync, rename, fsync the directory.

    The file keeps its mode (and owner, when running as root); a symlink is followed so the
    link stays a link. Blocking: call it from a thread.
    """
    target = Path(os.path.realpath(path))
    try:
        previous: os.stat_result | None = target.stat()
    except FileNotFoundError:
        previous = None
    mode = stat.S_IMODE(previous.st_mode) if previous else _DEFAULT_MODE
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.chmod(mode)
        if previous is not None and os.geteuid() == 0:
            os.chown(tmp, previous.st_uid, previous.st_gid)
        tmp.replace(target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable: it lives in the directory's entry, not in the file."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
