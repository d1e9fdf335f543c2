"""The ``rollbackd`` command against a running daemon: status, rearm, test-action, demo."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from rollbackd.api import ApiServer, ensure_control_token
from tests.helpers import config_file, daemon_table, payment_error_rate, route_legacy
from tests.servers import Rollbackd, free_port, http_get, wait_for

pytestmark = pytest.mark.slow


def rollbackd(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m rollbackd ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "rollbackd", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
        check=False,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A synthetic-source config: 2 s of outage (rolls back), then healthy for good."""
    port = free_port()
    (tmp_path / "traffic.env").write_text("BOOP_TRAFFIC_PERCENT=5\n")
    outage_then_healthy = [{"kind": "outage", "duration": "2s"}, {"kind": "healthy"}]
    raw = {
        "daemon": daemon_table(tmp_path / "state", listen=f"127.0.0.1:{port}"),
        "sources": {"boop": {"type": "synthetic", "seed": 3, "phases": outage_then_healthy}},
        "monitors": {
            "payments": {
                "interval": "200ms",
                "rollback_after": 2,
                "on_alert": ["note"],
                "on_rollback": ["route-legacy", "note"],
                "rules": [payment_error_rate("boop", "payment_error_rate")],
            }
        },
        "actions": {
            "route-legacy": route_legacy(tmp_path / "traffic.env"),
            "note": {"type": "alert.log"},
        },
    }
    return config_file(tmp_path, raw)


@pytest.fixture
def daemon(config: Path) -> Iterator[str]:
    """``rollbackd run`` in the background; yields its base URL."""
    port = int(config.read_text().split('listen = "127.0.0.1:', 1)[1].split('"', 1)[0])
    process = Rollbackd(config, port, config.parent)
    process.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        assert process.stop() == 0, process.log()


def monitor_state(base: str) -> tuple[str, str | None]:
    """The payments monitor's state and last outcome from /status."""
    monitor = json.loads(http_get(f"{base}/status")[1])["monitors"]["payments"]
    return monitor["state"], monitor["last_outcome"]


def test_status_and_rearm(config: Path, daemon: str) -> None:
    """Status shows the latch; rearm with the token file clears it; status --json agrees."""
    wait_for(lambda: monitor_state(daemon)[0] == "rolled_back", 20, what="rollback")
    shown = rollbackd("status", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert "payments" in shown.stdout
    assert "rolled_back" in shown.stdout
    assert "payment-error-rate" in shown.stdout
    wait_for(lambda: monitor_state(daemon) == ("rolled_back", "ok"), 20, what="healthy again")
    rearmed = rollbackd("rearm", "payments", "--config", str(config))
    assert rearmed.returncode == 0, rearmed.stderr
    assert "payments: ok" in rearmed.stdout
    as_json = json.loads(rollbackd("status", "--json", "--config", str(config)).stdout)
    assert as_json["monitors"]["payments"]["state"] == "ok"
    again = rollbackd("rearm", "payments", "--config", str(config))
    assert again.returncode == 1
    assert "nothing to re-arm" in again.stderr


def test_rearm_unknown_monitor_names_it(config: Path, daemon: str) -> None:
    """Re-arming a monitor that does not exist is a clear error, not a traceback."""
    result = rollbackd("rearm", "paymnets", "--config", str(config))
    assert result.returncode == 1
    assert "paymnets" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_without_daemon_says_so(config: Path) -> None:
    """Status with nothing listening tells the operator the daemon is not reachable."""
    result = rollbackd("status", "--config", str(config))
    assert result.returncode == 1
    assert "is rollbackd running?" in result.stderr
    assert "Traceback" not in result.stderr


def test_test_action_fires_once_with_yes(config: Path, tmp_path: Path) -> None:
    """test-action fires the named action; without --yes and a terminal it refuses."""
    refused = rollbackd("test-action", "route-legacy", "--config", str(config), stdin="")
    assert refused.returncode == 1
    assert "--yes" in refused.stderr
    assert "BOOP_TRAFFIC_PERCENT=5" in (tmp_path / "traffic.env").read_text()
    fired = rollbackd("test-action", "route-legacy", "--yes", "--config", str(config))
    assert fired.returncode == 0, fired.stderr
    assert "BOOP_TRAFFIC_PERCENT=0" in (tmp_path / "traffic.env").read_text()
    unknown = rollbackd("test-action", "route-legasy", "--yes", "--config", str(config))
    assert unknown.returncode == 1
    assert "actions.route-legasy" in unknown.stderr


def test_bad_arguments_are_usage_errors() -> None:
    """Unknown commands and missing arguments exit 2 with usage, no traceback."""
    for args in (["frobnicate"], ["rearm"], ["demo", "--speed", "fast"]):
        result = rollbackd(*args)
        assert result.returncode == 2, args
        assert "usage:" in result.stderr
        assert "Traceback" not in result.stderr


def test_run_with_bad_config_exits_1_naming_key(tmp_path: Path) -> None:
    """Run refuses a broken config with the key, before starting anything."""
    path = tmp_path / "bad.toml"
    path.write_text('[daemon]\nmode = "yolo"\n')
    result = rollbackd("run", "--config", str(path))
    assert result.returncode == 1
    assert f"{path}: daemon.mode:" in result.stderr


def test_demo_rolls_back(tmp_path: Path) -> None:
    """The demo ramps 5 -> 25 -> 50 % without servers or root, then rolls back with a record."""
    env = {**os.environ}
    result = subprocess.run(
        [sys.executable, "-m", "rollbackd", "demo", "--speed", "8", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rolled back. incident" in result.stdout
    assert "BREACH" in result.stdout
    assert "failures 5/5" in result.stdout
    for ramp in ("at 5%", "at 25%", "at 50%", "ROLLED BACK"):
        assert ramp in result.stdout, ramp
    assert "BOOP_TRAFFIC_PERCENT=0" in (tmp_path / "traffic.env").read_text()
    flags = json.loads((tmp_path / "flags.json").read_text())
    assert flags["flags"]["boop-payments"]["defaultVariant"] == "off"
    records = list((tmp_path / "state" / "incidents").glob("*.json"))
    assert any(json.loads(p.read_text())["event"] == "rollback" for p in records)


def test_unusable_state_dir_and_demo_dir_are_named(config: Path, tmp_path: Path) -> None:
    """A state_dir or demo dir that cannot be created is one line naming it, no traceback."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    text = config.read_text().replace(str(tmp_path / "state"), str(blocker / "state"))
    config.write_text(text)
    result = rollbackd("run", "--config", str(config))
    assert result.returncode == 1
    assert f"cannot use state directory {blocker / 'state'} (daemon.state_dir)" in result.stderr
    demo = rollbackd("demo", "--dir", str(blocker / "demo"))
    assert demo.returncode == 1
    assert f"cannot write its files in {blocker / 'demo'}" in demo.stderr
    assert "Traceback" not in result.stderr + demo.stderr


class Surface:
    """A daemon stand-in with an empty status document."""

    mode = "dry-run"

    def health(self) -> tuple[bool, str]:
        """Healthy."""
        return True, "ok"

    def status(self) -> dict[str, Any]:
        """No monitors."""
        return {"version": "t", "mode": "dry-run", "environment": "test", "monitors": {}}

    async def rearm(self, monitor: str) -> dict[str, Any]:
        """Not used."""
        return {"monitor": monitor}


@contextlib.contextmanager
def guarded_api(state_dir: Path) -> Iterator[int]:
    """An ApiServer with status_token = true in a thread of its own; yields its port."""
    token = ensure_control_token(state_dir)
    loop = asyncio.new_event_loop()
    started: concurrent.futures.Future[int] = concurrent.futures.Future()
    stop = threading.Event()

    async def serve() -> None:
        address = ("127.0.0.1", 0)
        server = ApiServer(
            Surface(), CollectorRegistry(), token, address, version="t", status_token=True
        )
        async with server:
            started.set_result(server.port or 0)
            await loop.run_in_executor(None, stop.wait)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        yield started.result(10)
    finally:
        stop.set()
        thread.join(10)
        loop.close()


@pytest.mark.parametrize("status_token", [True, False])
def test_status_sends_the_token_when_status_token(tmp_path: Path, status_token: bool) -> None:
    """With daemon.status_token = true, ``rollbackd status`` sends the control token."""
    state = tmp_path / "state"
    with guarded_api(state) as port:
        path = tmp_path / "rollbackd.toml"
        path.write_text(
            f'[daemon]\nstate_dir = "{state}"\nlisten = "127.0.0.1:{port}"\n'
            f"status_token = {str(status_token).lower()}\n"
        )
        result = rollbackd("status", "--config", str(path))
        assert http_get(f"http://127.0.0.1:{port}/status")[0] == 401
        assert http_get(f"http://127.0.0.1:{port}/health")[0] == 200
    if status_token:
        assert result.returncode == 0, result.stderr
        assert "mode=dry-run" in result.stdout
    else:
        assert result.returncode == 1
        assert "refused the control token" in result.stderr
    assert "Traceback" not in result.stderr


def test_retry_reruns_a_failed_step(tmp_path: Path) -> None:
    """``rollbackd retry`` re-runs a finished rollback's failed step once its cause is gone."""
    port = free_port()
    later = tmp_path / "later"
    route = {**route_legacy(later / "traffic.env"), "retries": 0}
    raw = {
        "daemon": daemon_table(tmp_path / "state", listen=f"127.0.0.1:{port}"),
        "sources": {"boop": {"type": "synthetic", "seed": 3, "phases": [{"kind": "outage"}]}},
        "monitors": {
            "payments": {
                "interval": "200ms",
                "rollback_after": 2,
                "on_rollback": ["route-legacy"],
                "rules": [payment_error_rate("boop", "payment_error_rate")],
            }
        },
        "actions": {"route-legacy": route},
    }
    config = config_file(tmp_path, raw)
    process = Rollbackd(config, port, tmp_path)
    process.start()
    base = f"http://127.0.0.1:{port}"

    def rollback() -> dict[str, object] | None:
        incidents = json.loads(http_get(f"{base}/status")[1])["incidents"]
        return next((i for i in incidents if i["event"] == "rollback"), None)

    try:
        wait_for(lambda: (i := rollback()) and i["finished_at"], 20, what="the rollback")
        incident = rollback()
        assert incident is not None
        refused = rollbackd("retry", "no-such-incident", "--config", str(config))
        assert refused.returncode == 1
        assert "no-such-incident" in refused.stderr
        later.mkdir()
        done = rollbackd("retry", str(incident["id"]), "--config", str(config))
        assert done.returncode == 0, done.stderr
        assert "retrying failed steps 0" in done.stdout
        wait_for(lambda: (i := rollback()) and i["finished_at"], 20, what="the retried plan")
        assert [s["status"] for s in rollback()["steps"]] == ["ok"]  # type: ignore[index]
        assert "BOOP_TRAFFIC_PERCENT=0" in (later / "traffic.env").read_text()
    finally:
        assert process.stop() == 0, process.log()


def test_approve_runs_a_waiting_plan_once(tmp_path: Path) -> None:
    """Past max_rollbacks a plan waits; ``rollbackd approve`` runs it; a second one is refused."""
    port = free_port()
    outage = [{"kind": "outage"}]

    def monitor(name: str) -> dict[str, Any]:
        return {
            "interval": "200ms",
            "rollback_after": 2,
            "on_rollback": [f"route-{name}"],
            "rules": [payment_error_rate("boop", "payment_error_rate")],
        }

    daemon = {
        **daemon_table(tmp_path / "state", listen=f"127.0.0.1:{port}"),
        "max_rollbacks": {"count": 1, "per": "1h"},
    }
    raw = {
        "daemon": daemon,
        "sources": {"boop": {"type": "synthetic", "seed": 3, "phases": outage}},
        "monitors": {name: monitor(name) for name in ("payments", "checkout")},
        "actions": {
            f"route-{name}": route_legacy(tmp_path / f"{name}.env")
            for name in ("payments", "checkout")
        },
    }
    config = config_file(tmp_path, raw)
    process = Rollbackd(config, port, tmp_path)
    process.start()

    def rollbacks() -> list[dict[str, Any]]:
        return [i for i in process.status()["incidents"] if i["event"] == "rollback"]

    try:
        wait_for(lambda: len(rollbacks()) == 2 and any(i["finished_at"] for i in rollbacks()), 20)
        (held,) = [i for i in rollbacks() if i["waiting"] == "approval"]
        assert held["finished_at"] is None
        shown = rollbackd("status", "--config", str(config))
        assert "PLANS WAITING" in shown.stdout
        assert f"rollbackd approve {held['id']}" in shown.stdout
        waiting_file = tmp_path / f"{held['monitor']}.env"
        assert not waiting_file.exists()
        unknown = rollbackd("approve", "no-such-incident", "--config", str(config))
        assert unknown.returncode == 1
        assert "no-such-incident" in unknown.stderr
        done = rollbackd("approve", str(held["id"]), "--config", str(config))
        assert done.returncode == 0, done.stderr
        assert f"{held['id']}: approved" in done.stdout
        wait_for(lambda: all(i["finished_at"] for i in rollbacks()), 20, what="the approved plan")
        assert "BOOP_TRAFFIC_PERCENT=0" in waiting_file.read_text()
        again = rollbackd("approve", str(held["id"]), "--config", str(config))
        assert again.returncode == 1
        assert "not waiting for approval" in again.stderr
        assert "Traceback" not in again.stderr + unknown.stderr
    finally:
        assert process.stop() == 0, process.log()
