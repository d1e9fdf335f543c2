"""Rollouts across SIGKILL: a hold resumes with its remaining time, no step is set twice."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Receiver, alive, config_file, daemon_table, rollout_tables
from tests.servers import Rollbackd, free_port, wait_for
from tests.test_cli import rollbackd

pytestmark = pytest.mark.slow


@pytest.fixture
def hooks() -> Iterator[Receiver]:
    """The team's webhook; the first announcement of 50 % is answered only after 3 s."""
    with Receiver(hold=lambda key: key == "boop:2", delay=3.0) as server:
        yield server


def write_config(
    tmp_path: Path,
    port: int,
    hook: str,
    holds: tuple[str, ...] = ("300ms", "4s", "300ms", "300ms"),
) -> Path:
    """Two synthetic, always healthy gates; 5 -> 25 -> 50 -> 100 with a 4 s hold at 25 %."""
    daemon = daemon_table(tmp_path / "state", environment="test", listen=f"127.0.0.1:{port}")
    tables = rollout_tables(
        tmp_path / "traffic.env", f"{hook}/hooks", [5, 25, 50, 100], list(holds)
    )
    return config_file(tmp_path, {"daemon": daemon, **tables})


def boop(daemon: Rollbackd) -> dict[str, Any]:
    """``rollouts.boop`` of /status."""
    found: dict[str, Any] = daemon.status()["rollouts"]["boop"]
    return found


def test_sigkill_mid_hold_and_mid_promotion_resumes_without_repeating(
    tmp_path: Path, hooks: Receiver
) -> None:
    """Killed mid-hold and mid-promotion, the daemon resumes both and sets nothing twice.

    Killed during the 25 % hold, the restarted daemon holds only what was left; killed while
    announcing 50 %, it finishes that promotion (same key) and sets nothing twice.
    """
    port = free_port()
    daemon = Rollbackd(write_config(tmp_path, port, hooks.url), port, tmp_path)
    try:
        daemon.start()
        wait_for(lambda: boop(daemon)["percent"] == 25 and boop(daemon)["hold_remaining_s"], 20)
        time.sleep(1.5)
        before = boop(daemon)["hold_remaining_s"]
        daemon.kill()
        killed_at = time.monotonic()
        daemon.start()
        after = boop(daemon)
        elapsed = time.monotonic() - killed_at
        assert (after["step"], after["percent"], after["state"]) == (1, 25, "holding")
        # The hold went on while the daemon was down: it did not start again.
        assert after["hold_remaining_s"] <= before - elapsed + 0.2
        assert after["hold_remaining_s"] > 0

        assert hooks.arrived.wait(20), "the 50 % announcement never arrived"
        daemon.kill()  # mid-step: the webhook of the 50 % promotion is in flight
        daemon.start()
        wait_for(lambda: boop(daemon)["state"] == "complete", 20, what="complete")
        assert daemon.stop() == 0
    finally:
        if alive(daemon):
            daemon.kill()

    assert (tmp_path / "traffic.env").read_text().strip().endswith("BOOP_TRAFFIC_PERCENT=100")
    # The interrupted announcement was attempted again with its key; every other step once.
    assert hooks.calls == ["boop:0", "boop:1", "boop:2", "boop:2", "boop:3"]
    with sqlite3.connect(tmp_path / "state" / "state.db") as db:
        rows = db.execute(
            "SELECT json_extract(i.details, '$.step'), s.action, s.status, s.attempts, "
            "s.interruptions FROM incidents i JOIN steps s ON s.incident_id = i.id "
            "WHERE i.event = 'promote' ORDER BY 1, s.step"
        ).fetchall()
    assert rows == [
        (0, "route-percent", "ok", 1, 0),
        (0, "team", "ok", 1, 0),
        (1, "route-percent", "ok", 1, 0),
        (1, "team", "ok", 1, 0),
        (2, "route-percent", "ok", 1, 0),
        (2, "team", "ok", 2, 1),
        (3, "route-percent", "ok", 1, 0),
        (3, "team", "ok", 1, 0),
    ]


def test_rollout_cli_steers_a_running_daemon(tmp_path: Path, hooks: Receiver) -> None:
    """Rollout status / pause / resume / promote --yes / abort / restart, token-guarded HTTP."""
    port = free_port()
    config = write_config(tmp_path, port, hooks.url, holds=("300ms", "24h", "1s", "1s"))
    daemon = Rollbackd(config, port, tmp_path)
    daemon.start()
    try:
        wait_for(lambda: boop(daemon)["percent"] == 25 and boop(daemon)["hold_remaining_s"], 20)

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return rollbackd("rollout", *args, "--config", str(config))

        shown = cli("status")
        assert shown.returncode == 0, shown.stderr
        assert "boop" in shown.stdout
        assert "25%" in shown.stdout
        assert "gate authentication" in shown.stdout
        assert json.loads(cli("status", "boop", "--json").stdout)["boop"]["step"] == 1
        assert cli("pause", "boop").returncode == 0
        refused = cli("promote", "boop", "--yes")
        assert refused.returncode == 1
        assert "cannot promote: it is paused, not holding" in refused.stderr
        assert cli("resume", "boop").returncode == 0
        no_tty = rollbackd("rollout", "promote", "boop", "--config", str(config))
        assert no_tty.returncode == 1
        assert "--yes" in no_tty.stderr
        assert cli("promote", "boop", "--yes").returncode == 0
        wait_for(lambda: boop(daemon)["percent"] == 50, 20, what="promoted to 50 %")
        unknown = cli("pause", "bop")
        assert unknown.returncode == 1
        assert "rollouts.bop: no such rollout" in unknown.stderr
        url = f"http://127.0.0.1:{port}/rollouts/boop/abort"
        request = urllib.request.Request(url, method="POST")
        with pytest.raises(urllib.error.HTTPError) as no_token:
            urllib.request.urlopen(request, timeout=5)
        assert no_token.value.code == 401
        no_token.value.close()
        aborted = cli("abort", "boop")
        assert aborted.returncode == 0, aborted.stderr
        assert "rolled_back" in aborted.stdout
        wait_for(lambda: "BOOP_TRAFFIC_PERCENT=0" in (tmp_path / "traffic.env").read_text(), 20)
        assert cli("restart", "boop").returncode == 0
        wait_for(lambda: boop(daemon)["percent"] == 5 and boop(daemon)["run"] == 2, 20)
    finally:
        assert daemon.stop() == 0, daemon.log()
