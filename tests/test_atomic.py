"""atomic_write: a file is replaced whole, keeping its mode and its symlink; only regular files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rollbackd.atomic import NotRegularFileError, atomic_write


def test_atomic_write_keeps_mode_and_symlink(tmp_path: Path) -> None:
    """The rewritten file keeps its permissions, a symlink stays a link, no temp file is left."""
    real = tmp_path / "real.env"
    real.write_text("A=1\n")
    real.chmod(0o640)
    link = tmp_path / "link.env"
    link.symlink_to(real)
    atomic_write(link, b"A=2\n")
    assert link.is_symlink()
    assert real.read_text() == "A=2\n"
    assert real.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.env", "real.env"]


def test_atomic_write_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    """A FIFO or a directory at the path is named and left in place, not replaced by a file."""
    fifo = tmp_path / "flags.json"
    os.mkfifo(fifo)
    with pytest.raises(NotRegularFileError, match=r"flags.json is a FIFO \(named pipe\)"):
        atomic_write(fifo, b"{}")
    assert fifo.is_fifo()
    with pytest.raises(NotRegularFileError, match="is a directory, not a regular file"):
        atomic_write(tmp_path, b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flags.json"]
