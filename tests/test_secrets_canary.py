"""No secret leaks: a daemon with a canary in every secret-bearing key, driven through errors.

No canary in its logs, /status, /metrics, state database or incident records.
"""

from __future__ import annotations

import stat
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.servers import Rollbackd, free_port, http_get, wait_for

pytestmark = pytest.mark.slow

CANARIES = {
    "RBD_PROM_TOKEN": "tok-CANARY1-prom",
    "RBD_BASIC_PW": "pw-CANARY2-basic",
    "RBD_MQTT_PW": "mqtt\u20ac-CANARY3-pw",
    "RBD_HOOK_TOKEN": "hook-CANARY4-header",
    "RBD_EXEC_TOKEN": "exec-CANARY5-env",
    "RBD_FLAG_KEY": "flag-CANARY6-key",
}
"""Each value's ASCII tail (``CANARYn-...``) is what is searched: it survives any escaping."""


class Echo(BaseHTTPRequestHandler):
    """Answers every request 500 with the request's headers in the body (a careless server)."""

    def _echo(self) -> None:
        body = "".join(f"{k}: {v}\n" for k, v in self.headers.items()).encode()
        self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _echo  # noqa: N815 - http.server's naming

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - its signature
        """Quiet."""


@pytest.fixture
def echo() -> Iterator[str]:
    """A loopback HTTP server echoing request headers in 500 answers; its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


CONFIG = """
[daemon]
mode = "armed"
environment = "test"
state_dir = "{state}"
listen = "127.0.0.1:{port}"

[sources.prom-token]
type = "prometheus"
url = "{echo}"
bearer_token = {{ env = "RBD_PROM_TOKEN" }}

[sources.prom-basic]
type = "prometheus"
url = "{echo}"
basic_auth = {{ username = "u", password = {{ env = "RBD_BASIC_PW" }} }}

[sources.bus]
type = "mqtt"
host = "127.0.0.1"
port = {dead}
username = "rollbackd"
password = {{ env = "RBD_MQTT_PW" }}

[sources.boop]
type = "synthetic"
phases = [{{ kind = "outage" }}]

[monitors.upstream]
interval = "200ms"
rules = [
  {{ name = "a", source = "prom-token", query = "up", below = 1.0 }},
  {{ name = "b", source = "prom-basic", query = "up", below = 1.0 }},
  {{ name = "c", source = "bus", topic = "boop/x", below = 1.0 }},
]

[monitors.payments]
interval = "200ms"
rollback_after = 2
on_rollback = ["flag-off", "page", "script", "shout"]

[[monitors.payments.rules]]
name = "payment-error-rate"
source = "boop"
query = "payment_error_rate"
above = 0.1

[actions.flag-off]
type = "flag.http"
url = "{echo}/flags/{{monitor}}"
method = "PUT"
retries = 0
give_up_after = "300ms"
headers = {{ X-Api-Key = {{ env = "RBD_FLAG_KEY" }} }}

[actions.page]
type = "alert.webhook"
url = "{echo}/hook"
retries = 0
give_up_after = "300ms"
headers = {{ Authorization = {{ env = "RBD_HOOK_TOKEN" }} }}

[actions.script]
type = "exec"
argv = ["{python}", "-c", "{script}"]
env = {{ T = {{ env = "RBD_EXEC_TOKEN" }} }}
retries = 0

[actions.shout]
type = "alert.mqtt"
host = "127.0.0.1"
port = {dead}
username = "rollbackd"
password = {{ env = "RBD_MQTT_PW" }}
topic = "alerts/{{monitor}}"
retries = 0
give_up_after = "300ms"
"""


SCRIPT = "import os; print('sent Authorization: Token ' + os.environ['T']); raise SystemExit(3)"
"""An exec step that prints its secret in a header the redactor has no key name for."""


def test_no_canary_anywhere(tmp_path: Path, echo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Errors, a rollback with failing steps, /status, /metrics, state and records: no canary."""
    for name, value in CANARIES.items():
        monkeypatch.setenv(name, value)
    port = free_port()
    config = tmp_path / "rollbackd.toml"
    config.write_text(
        CONFIG.format(
            state=tmp_path / "state",
            port=port,
            echo=echo,
            dead=free_port(),
            python=sys.executable,
            script=SCRIPT,
        )
    )
    daemon = Rollbackd(config, port, tmp_path)
    daemon.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: finished_rollback(daemon), 30, what="the rollback's plan to finish")
        wait_for(lambda: daemon.monitor("upstream")["consecutive_errors"] >= 3, 10)
        shown = {
            "/status": http_get(f"{base}/status")[1],
            "/metrics": http_get(f"{base}/metrics")[1],
        }
    finally:
        assert daemon.stop() == 0
    state = tmp_path / "state"
    shown["log"] = daemon.log_bytes()
    for path in state.rglob("*"):
        if path.is_file():
            shown[str(path.relative_to(tmp_path))] = path.read_bytes()
    status = shown["/status"].decode()
    assert "HTTP 500" in status or "failed" in status, "the errors did happen"
    leaks = [
        (where, value)
        for where, text in shown.items()
        for value in CANARIES.values()
        if value.split("-", 1)[1].encode() in text
    ]
    assert leaks == []
    records = list((state / "incidents").glob("*.json"))
    assert records, "a record was written"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "incidents").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in records)
    assert stat.S_IMODE((state / "state.db").stat().st_mode) == 0o600


def finished_rollback(daemon: Rollbackd) -> bool:
    """The rollback incident has finished its plan (every step tried)."""
    incidents = daemon.status()["incidents"]
    return any(i["event"] == "rollback" and i["finished_at"] for i in incidents)
