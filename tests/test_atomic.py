"""atomic_write: a file is replaced whole, keeping its mode and its symlink."""

from __future__ import annotations

from pathlib import Path

from rollbackd.atomic import atomic_write


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
