"""The state database's connection settings."""

from __future__ import annotations

from pathlib import Path

from rollbackd import schema


def test_connection_caps_the_page_cache(tmp_path: Path) -> None:
    """Each connection keeps at most CACHE_KIB of pages (RSS), with WAL and full sync kept."""
    conn = schema.connect(tmp_path / "state.db")
    try:
        assert conn.execute("PRAGMA cache_size").fetchone()[0] == -schema.CACHE_KIB
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        conn.close()
