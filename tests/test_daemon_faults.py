"""The daemon as a process under faults: reload storms, state taken away, a full disk.

Each test runs ``python -m rollbackd run`` as a subprocess (``tests.servers.Rollbackd``).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.servers import Mosquitto, Rollbackd, free_port, http_get, wait_for

pytestmark = pytest.mark.slow

SYNTHETIC = """
[daemon]
mode = "armed"
environment = "test"
state_dir = "{state}"
listen = "127.0.0.1:{port}"

[sources.boop]
type = "synthetic"
seed = 3
phases = [{{ kind = "{kind}" }}]

[monitors.payments]
interval = "{interval}"
rollback_after = 3
on_rollback = ["route-legacy"]

[[monitors.payments.rules]]
name = "payment-error-rate"
source = "boop"
query = "payment_error_rate"
above = 0.1

[actions.route-legacy]
type = "route.file"
path = "{work}/traffic.env"
key = "BOOP_TRAFFIC_PERCENT"
value = "0"
"""

PUSHED = """
[daemon]
mode = "armed"
environment = "test"
state_dir = "{state}"
listen = "127.0.0.1:{port}"

[sources.bus]
type = "mqtt"
host = "127.0.0.1"
port = {broker}
stale_after = "60s"

[monitors.auth]
interval = "1s"
rollback_after = 3
blind_after = 2
on_blind = "rollback"
on_rollback = ["route-legacy"]

[[monitors.auth.rules]]
name = "auth-success-rate"
source = "bus"
topic = "boop/auth/success_rate"
below = 99.0

[actions.route-legacy]
type = "route.file"
path = "{work}/traffic.env"
key = "BOOP_TRAFFIC_PERCENT"
value = "0"
"""


def write(tmp_path: Path, template: str, **values: object) -> tuple[Path, int]:
    """Write a config from ``template`` into tmp_path; return its path and the HTTP port."""
    port = free_port()
    path = tmp_path / "rollbackd.toml"
    fields = {"state": tmp_path / "state", "work": tmp_path, "port": port, **values}
    path.write_text(template.format(**fields), encoding="utf-8")
    return path, port


@pytest.fixture
def daemon_of(tmp_path: Path) -> Iterator[list[Rollbackd]]:
    """Daemons started by a test; each is killed afterwards if still running."""
    started: list[Rollbackd] = []
    yield started
    for daemon in started:
        if daemon.process is not None and daemon.process.poll() is None:
            daemon.kill()


def run(tmp_path: Path, started: list[Rollbackd], template: str, **values: object) -> Rollbackd:
    """Start a daemon on a config made from ``template``; wait for /health."""
    path, port = write(tmp_path, template, **values)
    daemon = Rollbackd(path, port, tmp_path)
    started.append(daemon)
    daemon.start()
    return daemon


def hup(daemon: Rollbackd, times: int = 1, pause: float = 0.0) -> None:
    """Send SIGHUP ``times`` times."""
    assert daemon.process is not None
    for _ in range(times):
        daemon.process.send_signal(signal.SIGHUP)
        if pause:
            time.sleep(pause)


def settle(daemon: Rollbackd, seconds: float) -> None:
    """Let the daemon run for ``seconds`` (to show that something does NOT happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert daemon.process is not None
        assert daemon.process.poll() is None, daemon.log()
        time.sleep(0.1)


def test_reloads_add_no_checks(tmp_path: Path, daemon_of: list[Rollbackd]) -> None:
    """Reloads keep a 30 s monitor's schedule: five SIGHUPs add no check and roll nothing back."""
    daemon = run(tmp_path, daemon_of, SYNTHETIC, kind="outage", interval="30s")
    wait_for(lambda: daemon.monitor()["checks"] == 1, 10, what="the first check")
    hup(daemon, 5, pause=0.3)
    wait_for(lambda: "config_reloaded" in daemon.log(), 10, what="a reload")
    settle(daemon, 2.0)
    monitor = daemon.monitor()
    assert (monitor["checks"], monitor["state"]) == (1, "failing"), monitor
    assert daemon.status()["incidents"] == []


def test_reload_keeps_the_latest_pushed_values(
    tmp_path: Path, daemon_of: list[Rollbackd], mosquitto: Mosquitto
) -> None:
    """A reload keeps an unchanged MQTT source (connection and values): no blind rollback."""
    daemon = run(tmp_path, daemon_of, PUSHED, broker=mosquitto.port)
    wait_for(lambda: "mqtt_connected" in daemon.log(), 10, what="the broker connection")
    publish(mosquitto.port, "boop/auth/success_rate", "99.9")
    wait_for(lambda: daemon.monitor("auth")["last_outcome"] == "ok", 10, what="a healthy check")
    hup(daemon, 3, pause=0.5)
    wait_for(lambda: daemon.log().count("config_reloaded") >= 2, 10, what="the reloads")
    settle(daemon, 3.0)  # blind_after = 2 one-second ticks, had the values been lost
    monitor = daemon.monitor("auth")
    assert (monitor["state"], monitor["consecutive_errors"]) == ("ok", 0), monitor
    assert daemon.status()["incidents"] == []


def test_sighup_storm_leaves_one_broker_connection(
    tmp_path: Path, daemon_of: list[Rollbackd], mosquitto: Mosquitto
) -> None:
    """A hundred SIGHUPs at once end with exactly one connection to the broker."""
    daemon = run(tmp_path, daemon_of, PUSHED, broker=mosquitto.port)
    wait_for(lambda: "mqtt_connected" in daemon.log(), 10, what="the broker connection")
    hup(daemon, 100)
    assert daemon.process is not None
    pid = daemon.process.pid
    wait_for(lambda: http_get(f"http://127.0.0.1:{daemon.port}/health")[0] == 200, 20)
    settle(daemon, 2.0)
    assert connections(pid, mosquitto.port) == 1


def test_deleted_database_is_noticed_and_refused_at_restart(
    tmp_path: Path, daemon_of: list[Rollbackd]
) -> None:
    """state.db deleted under a running daemon: /health says so; a restart refuses to start."""
    daemon = run(tmp_path, daemon_of, SYNTHETIC, kind="healthy", interval="200ms")
    state = tmp_path / "state"
    wait_for(lambda: daemon.monitor()["checks"] >= 2, 10, what="checks")
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (state / name).unlink(missing_ok=True)
    wait_for(lambda: b"deleted" in health(daemon)[1], 10, what="/health noticing")
    assert health(daemon)[0] == 503
    daemon.stop()
    again = start_plain(daemon.config)
    assert again.returncode == 1
    assert "state.marker" in again.stderr, again.stderr
    assert "missing" in again.stderr
    assert not (state / "state.db").exists(), "nothing was created in its place"


def test_second_daemon_refused_after_lock_file_deleted(
    tmp_path: Path, daemon_of: list[Rollbackd]
) -> None:
    """Deleting rollbackd.lock does not let a second daemon run on the same state directory."""
    daemon = run(tmp_path, daemon_of, SYNTHETIC, kind="healthy", interval="1s")
    (tmp_path / "state" / "rollbackd.lock").unlink()
    other = tmp_path / "other.toml"
    port = free_port()
    other.write_text(
        daemon.config.read_text().replace(f"127.0.0.1:{daemon.port}", f"127.0.0.1:{port}")
    )
    again = start_plain(other)
    assert again.returncode == 1
    assert "in use by another rollbackd" in again.stderr, again.stderr


def test_full_disk_makes_health_fail(tmp_path: Path, daemon_of: list[Rollbackd]) -> None:
    """With the state directory's disk full, checks cannot be committed and /health says 503."""
    state = tmp_path / "state"
    state.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(state)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {mounted.stderr.decode()}")
    try:
        daemon = run(tmp_path, daemon_of, SYNTHETIC, kind="healthy", interval="100ms")
        wait_for(lambda: daemon.monitor()["checks"] >= 3, 10, what="checks")
        fill(state / "filler")
        wait_for(lambda: health(daemon)[0] == 503, 15, what="/health noticing the full disk")
        assert b"state store cannot write" in health(daemon)[1] or b"failed" in health(daemon)[1]
        (state / "filler").unlink()
        wait_for(lambda: health(daemon)[0] == 200, 15, what="/health recovering")
        daemon.stop()
    finally:
        for started in daemon_of:
            if started.process is not None and started.process.poll() is None:
                started.kill()
        subprocess.run(["umount", "-l", str(state)], check=False)


# --- helpers --------------------------------------------------------------------------------


def fill(path: Path) -> None:
    """Write zeros to ``path`` until its disk is full."""
    with path.open("wb") as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        except OSError:
            return


def health(daemon: Rollbackd) -> tuple[int, bytes]:
    """``(status, body)`` of the daemon's /health."""
    return http_get(f"http://127.0.0.1:{daemon.port}/health")


def start_plain(config: Path) -> subprocess.CompletedProcess[str]:
    """Run ``rollbackd run`` expecting it to refuse at once; its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "rollbackd", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def publish(port: int, topic: str, payload: str) -> None:
    """Publish one message to the broker on 127.0.0.1:port and wait until it is sent."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


def connections(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` to 127.0.0.1:``port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count
