"""What the benchmarks share: the daemon subprocess, a timing webhook receiver, stats, results.

Servers come from ``tests/servers.py`` (real binaries on 127.0.0.1, temporary dirs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rollbackd import __version__
from tests.servers import http_get, wait_for

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def parse_args(description: str) -> argparse.Namespace:
    """``--quick`` (about a fifth of the time) and ``--no-write`` (print only)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="shorter run, fewer trials")
    parser.add_argument(
        "--no-write", action="store_true", help="do not write bench/results/<name>.json"
    )
    return parser.parse_args()


# --- statistics and output -----------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float | None:
    """Percentile ``q`` (0-100) by linear interpolation between order statistics; None if empty.

    With few samples a high percentile is close to the maximum: read p99 of n trials as such.
    """
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> dict[str, Any]:
    """``n``, median, p99, min, max (multiplied by ``scale``, e.g. 1000 for ms)."""

    def r(v: float | None) -> float | None:
        return None if v is None else round(v * scale, digits)

    return {
        "n": len(values),
        "median": r(statistics.median(values)) if values else None,
        "p99": r(pct(values, 99)),
        "min": r(min(values)) if values else None,
        "max": r(max(values)) if values else None,
    }


def table(title: str, header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Render a plain-text table (columns padded to their widest cell)."""
    cells = [[str(h) for h in header]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells[1:]]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Where the figures were measured."""
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "rollbackd": __version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_result(name: str, args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Write ``bench/results/<name>.json`` (unless ``--no-write``) with the environment."""
    document = {"benchmark": name, "quick": bool(args.quick), **result, "env": environment()}
    if args.no_write:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(ROOT)}")


# --- a webhook receiver that notes when each request arrived ----------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    """One POST: its path, the parsed JSON body, and ``time.time()`` when its headers were read."""

    path: str
    body: Any
    at: float


class Receiver:
    """HTTP server on 127.0.0.1 recording every POST (rollbackd's and Alertmanager's webhooks)."""

    def __init__(self) -> None:
        self.arrivals: list[Arrival] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                at = time.time()
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"null")
                except ValueError:
                    body = None
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with receiver._cond:
                    receiver.arrivals.append(Arrival(self.path, body, at))
                    receiver._cond.notify_all()

            def log_message(self, fmt: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        """Full URL of ``path`` on this receiver."""
        return f"http://127.0.0.1:{self.port}{path}"

    def wait(self, match: Callable[[Arrival], bool], timeout: float) -> Arrival | None:
        """Return the first arrival matching ``match``, waiting up to ``timeout``; None if none."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for arrival in self.arrivals:
                    if match(arrival):
                        return arrival
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


# --- the daemon as a subprocess ------------------------------------------------------------


class DaemonProcess:
    """``python -m rollbackd run --config FILE``, its log in ``workdir/daemon.log``."""

    def __init__(self, config: Path, workdir: Path, port: int | None) -> None:
        self.config, self.workdir, self.port = config, workdir, port
        self.log_path = workdir / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, env: dict[str, str] | None = None, timeout: float = 30.0) -> None:
        """Start and wait for ``daemon_ready`` in the log (and /health when it listens)."""
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rollbackd", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "ROLLBACKD_LOG_FORMAT": "json", **(env or {})},
                cwd=self.workdir,
            )
        wait_for(self._ready, timeout, interval=0.05, what="daemon ready")

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.log()}")
        if b"daemon_ready" not in self.log_path.read_bytes():
            return False
        return self.port is None or http_get(f"http://127.0.0.1:{self.port}/health")[0] == 200

    def status(self) -> dict[str, Any]:
        """GET /status."""
        code, body = http_get(f"http://127.0.0.1:{self.port}/status")
        if code != 200:
            raise RuntimeError(f"/status answered {code}: {body[:200]!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def log(self) -> str:
        """The tail of the daemon's log."""
        return self.log_path.read_text(errors="replace")[-4000:]


def toml_value(value: object) -> str:
    """A Python value as TOML (strings, numbers, booleans, lists, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        pairs = ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        return "{ " + pairs + " }"
    raise TypeError(f"no TOML for {type(value).__name__}")


def toml_config(
    daemon: dict[str, Any],
    sources: dict[str, dict[str, Any]],
    actions: dict[str, dict[str, Any]],
    monitors: dict[str, dict[str, Any]],
) -> str:
    """A rollbackd config file; a monitor's ``rules`` become ``[[monitors.NAME.rules]]``."""
    out = ["[daemon]", *(f"{k} = {toml_value(v)}" for k, v in daemon.items())]
    for kind, tables in (("sources", sources), ("actions", actions)):
        for name, table in tables.items():
            out += ["", f'[{kind}."{name}"]', *(f"{k} = {toml_value(v)}" for k, v in table.items())]
    for name, monitor in monitors.items():
        out += ["", f'[monitors."{name}"]']
        out += [f"{k} = {toml_value(v)}" for k, v in monitor.items() if k != "rules"]
        for rule in monitor["rules"]:
            out += ["", f'[[monitors."{name}".rules]]']
            out += [f"{k} = {toml_value(v)}" for k, v in rule.items()]
    return "\n".join(out) + "\n"
