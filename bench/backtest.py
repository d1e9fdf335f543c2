"""How fast ``rollbackd backtest`` replays one week of the example config at a 30 s interval.

Method: a synthetic week of BOOP-like series (2 regions; auth and payment request/failure/
success counters, two latency histograms, ``up`` and websocket failures), sampled every 30 s,
is backfilled with ``promtool tsdb create-blocks-from openmetrics`` into a real Prometheus
(retention 100y) on 127.0.0.1. The config is ``config.example.toml`` with its actions left
out, every monitor's interval set to 30 s, and the MQTT rule ``auth-success-rate`` removed
(MQTT rules have no Prometheus history: the authentication monitor would be skipped), so all
7 Prometheus rules run: 20,161 checks per monitor, 3 range queries per rule. Each trial is
``backtest.run`` over the week (fetch + replay, the CLI's path without printing), timed with
``perf_counter``; the first trial warms Prometheus's caches and is reported apart. Target
(issue 14): under 10 s on 2 cores.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from bench.common import ROOT, parse_args, table, write_result
from rollbackd import backtest
from rollbackd.assemble import from_dict
from tests.servers import HistoryPrometheus, backfill

START = 1_736_121_600.0  # 2025-01-06T00:00:00Z
WEEK = 7 * 86_400.0
STEP = 30.0
REGIONS = ("eu", "us")
BUCKETS = ("0.5", "1", "2.5", "5", "10", "+Inf")


def series_lines(name: str, labels: str, values: list[float]) -> list[str]:
    """OpenMetrics lines of one series, one sample per step from 10 minutes before START."""
    first = START - 600
    return [f"{name}{{{labels}}} {v!r} {first + i * STEP:.0f}" for i, v in enumerate(values)]


def write_week(path: Path) -> int:
    """Write the synthetic week; return the number of series."""
    n = int((WEEK + 600) / STEP) + 1
    count = 0
    with path.open("w") as out:
        for region in REGIONS:
            for family, fail_every in (("auth", 97), ("payment", 1009)):
                requests = [100.0 * i for i in range(n)]
                failures = [float(i // fail_every) for i in range(n)]
                lab = f'region="{region}"'
                rows = series_lines(f"boop_{family}_requests_total", lab, requests)
                rows += series_lines(f"boop_{family}_failures_total", lab, failures)
                if family == "payment":
                    success = [r - f for r, f in zip(requests, failures, strict=True)]
                    rows += series_lines("boop_payment_success_total", lab, success)
                for j, le in enumerate(BUCKETS):
                    share = min(1.0, 0.96 + 0.01 * j)  # p95 under 500 ms: healthy
                    bucket = [share * r for r in requests]
                    rows += series_lines(
                        f"boop_{family}_duration_seconds_bucket", f'{lab},le="{le}"', bucket
                    )
                out.write("\n".join(rows) + "\n")
                count += 3 + len(BUCKETS) if family == "payment" else 2 + len(BUCKETS)
        out.write("\n".join(series_lines("up", 'job="boop-api"', [1.0] * n)) + "\n")
        ws = [float(i // 50) for i in range(n)]
        out.write("\n".join(series_lines("boop_ws_connection_failures_total", "", ws)) + "\n")
        out.write("# EOF\n")
    return count + 2


def week_config(url: str) -> dict[str, Any]:
    """The example config's monitors at 30 s, Prometheus rules only, no actions."""
    raw = tomllib.loads((ROOT / "config.example.toml").read_text())
    raw["sources"] = {"prom": {**raw["sources"]["prom"], "url": url, "max_concurrency": 4}}
    raw.pop("actions")
    for monitor in raw["monitors"].values():
        monitor["interval"] = "30s"
        monitor["on_alert"], monitor["on_rollback"] = [], []
        monitor["rules"] = [r for r in monitor["rules"] if r["source"] == "prom"]
    return raw


def main() -> None:
    args = parse_args("backtest speed: a week of the example config at 30 s")
    trials = 2 if args.quick else 4
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        began = time.perf_counter()
        series = write_week(workdir / "week.om")
        (workdir / "data").mkdir()
        backfill(workdir / "week.om", workdir / "data")
        prepare = time.perf_counter() - began
        with HistoryPrometheus(workdir) as prometheus:
            assembly = from_dict(week_config(prometheus.url), secrets=False)
            times, found = [], None
            for _ in range(trials):
                began = time.perf_counter()
                found = asyncio.run(backtest.run(assembly, START, START + WEEK))
                times.append(time.perf_counter() - began)
    assert found is not None
    monitors = {
        name: {"checks": run.checks, "events": len(run.events), "skipped": run.skipped}
        for name, run in found.monitors.items()
    }
    rules = sum(len(run.config.rules) for run in found.monitors.values())
    checks = sum(run.checks for run in found.monitors.values())
    warm = times[1:] or times
    result = {
        "method": __doc__,
        "series": series,
        "rules": rules,
        "monitors": monitors,
        "backfill_seconds": round(prepare, 2),
        "first_run_seconds": round(times[0], 2),
        "seconds": {
            "median": round(statistics.median(warm), 2),
            "min": round(min(warm), 2),
            "max": round(max(warm), 2),
            "n": len(warm),
        },
        "checks_per_second": round(checks / statistics.median(warm)),
        "target_seconds": 10.0,
    }
    rows = [
        ("monitors / rules", f"{len(monitors)} / {rules}"),
        ("checks (all monitors)", checks),
        ("first run (cold)", f"{times[0]:.2f} s"),
        ("week replayed (median, warm)", f"{statistics.median(warm):.2f} s"),
        ("checks/s", result["checks_per_second"]),
        ("target", "< 10 s on 2 cores"),
    ]
    print(table("backtest: one week at 30 s, example config", ("figure", "value"), rows))
    write_result("backtest", args, result)


if __name__ == "__main__":
    main()
