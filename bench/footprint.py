"""Footprint: RSS and CPU of an idle daemon subprocess with 10 and 100 monitors at a 1 s interval.

Idle: the synthetic source stays healthy, so every check is ok and nothing acts.
Run: ``.venv/bin/python -m bench.footprint [--quick]``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import DaemonProcess, parse_args, table, toml_config, write_result
from tests.servers import free_port

METRICS = ("auth_error_rate", "auth_response_time_ms", "auth_success_rate")
THRESHOLDS = {
    "auth_error_rate": {"above": 1.0},
    "auth_response_time_ms": {"above": 3000.0},
    "auth_success_rate": {"below": 99.0},
}
TICK = os.sysconf("SC_CLK_TCK")


def config(workdir: Path, monitors: int, rules: int, port: int) -> Path:
    text = toml_config(
        daemon={
            "mode": "dry-run",
            "environment": "bench",
            "state_dir": str(workdir / "state"),
            "listen": f"127.0.0.1:{port}",
        },
        sources={"synthetic": {"type": "synthetic", "phases": [{"kind": "healthy"}]}},
        actions={"note": {"type": "alert.log"}},
        monitors={
            f"m{i:03d}": {
                "interval": "1s",
                "rollback_after": 5,
                "on_rollback": ["note"],
                "rules": [
                    {"name": m, "source": "synthetic", "query": m, **THRESHOLDS[m]}
                    for m in METRICS[:rules]
                ],
            }
            for i in range(monitors)
        },
    )
    path = workdir / "rollbackd.toml"
    path.write_text(text)
    return path


def rss_kib(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` in KiB from /proc/<pid>/status."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            found[key] = int(value.split()[0])
    return found["VmRSS"], found["VmHWM"]


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all threads) from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5)


def total_checks(daemon: DaemonProcess) -> int:
    return sum(m["checks"] for m in daemon.status()["monitors"].values())


def measure(monitors: int, rules: int, window: float, warmup: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rollbackd-bench-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        daemon = DaemonProcess(config(workdir, monitors, rules, port), workdir, port)
        started = time.monotonic()
        daemon.start()
        ready_s = time.monotonic() - started
        try:
            time.sleep(warmup)  # startup imports and the first checks are not idle
            pid = daemon.pid
            checks0, cpu0, wall0 = total_checks(daemon), cpu_seconds(pid), time.monotonic()
            samples = []
            while time.monotonic() - wall0 < window:
                time.sleep(1.0)
                samples.append(rss_kib(pid)[0])
            # /status is read before and after, outside the window's CPU figure as far as
            # possible: read CPU first, then the check count
            cpu1, wall1 = cpu_seconds(pid), time.monotonic()
            checks1 = total_checks(daemon)
            hwm = rss_kib(pid)[1]
            threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
        finally:
            daemon.stop()
    wall = wall1 - wall0
    return {
        "monitors": monitors,
        "rules_per_monitor": rules,
        "window_s": round(wall, 1),
        "ready_s": round(ready_s, 2),
        "rss_mib_median": round(statistics.median(samples) / 1024, 1),
        "rss_mib_max": round(max(samples) / 1024, 1),
        "hwm_mib": round(hwm / 1024, 1),
        "cpu_percent_of_core": round(100 * (cpu1 - cpu0) / wall, 2),
        "checks_per_s": round((checks1 - checks0) / wall, 1),
        "threads": threads,
    }


def main() -> None:
    args = parse_args(__doc__ or "")
    window = 30.0 if args.quick else 60.0
    warmup = 3.0 if args.quick else 5.0
    runs = [(10, 1), (100, 1)] if args.quick else [(10, 1), (100, 1), (100, 3)]
    results = []
    for monitors, rules in runs:
        print(f"  {monitors} monitors x {rules} rule(s): {window:g} s ...", flush=True)
        results.append(measure(monitors, rules, window, warmup))
    print()
    keys = ("monitors", "rules_per_monitor", "checks_per_s", "rss_mib_median", "rss_mib_max",
            "hwm_mib", "cpu_percent_of_core", "threads", "ready_s")  # fmt: skip
    header = ["monitors", "rules/mon", "checks/s", "RSS MiB (median)", "RSS max", "HWM",
              "CPU % of a core", "threads", "ready s"]  # fmt: skip
    title = f"Idle daemon subprocess, interval 1 s, synthetic healthy source ({window:g} s window)"
    print(table(title, header, [[r[k] for k in keys] for r in results]))
    write_result(
        "footprint",
        args,
        {
            "method": "daemon subprocess `python -m rollbackd run --config FILE`, dry-run, "
            "listen on a free loopback port, state_dir in a temporary directory; synthetic "
            "source with one healthy phase; after a warm-up, VmRSS from /proc/<pid>/status "
            "every second and utime+stime from /proc/<pid>/stat over the window; CPU % = CPU "
            "seconds / wall seconds x 100; checks/s from /status before and after",
            "target": {"rss_mib": 60, "cpu_percent_of_core": 1.0},
            "runs": results,
        },
    )


if __name__ == "__main__":
    main()
