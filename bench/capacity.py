"""Evaluation capacity: series evaluations per second with state persistence, and a 1,000-rule
cycle against a real local Prometheus through the PrometheusSource.

Run: ``.venv/bin/python -m bench.capacity [--quick]``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import parse_args, table, write_result
from rollbackd.config import MonitorConfig, RuleConfig
from rollbackd.engine import MonitorState, Policy, advance, decide
from rollbackd.readings import Reading, ReadingStatus, labels_of, ok
from rollbackd.sources.prometheus import PrometheusOptions, PrometheusSource
from rollbackd.state import Store
from rollbackd.verdicts import evaluate_rule
from tests.servers import Exporter, Prometheus, wait_for

SERIES = (1, 100, 10_000)
RULES = 1000
HISTORY = 50  # the [daemon] history default: checks kept per monitor
CYCLE_COLUMNS = (
    ("max_concurrency", "max_concurrency"),
    ("cycles", "cycles"),
    ("median_s", "median s"),
    ("min_s", "min s"),
    ("max_s", "max s"),
    ("client_cpu_s", "client cpu s"),
    ("non_ok_readings", "non-ok readings"),
)


def one_core() -> str:
    """Pin this process to one CPU so "per core" means one core."""
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[-1]})
    return f"cpu {cpus[-1]}"


def readings_for(series: int, at: float) -> list[Reading]:
    """``series`` healthy series with distinct labels (a vector result of one query)."""
    return [
        ok(0.2 + (i % 50) * 0.01, at, labels_of({"instance": f"10.0.{i // 250}.{i % 250}:9100"}))
        for i in range(series)
    ]


def engine_rate(series: int, seconds: float, store: Store | None) -> dict[str, Any]:
    """Run whole checks (evaluate_rule, decide, advance and, with a store, commit_check)."""
    rule = RuleConfig(name="error-rate", source="prom", query="q", above=1.0, unit="%")
    policy = Policy.of(MonitorConfig(rules=[rule], rollback_after=5))
    base = time.time()
    readings = readings_for(series, base)
    monitor = f"capacity-{series}"
    state = MonitorState()
    checks = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    deadline = wall0 + seconds
    while True:
        at = base + checks
        results = evaluate_rule(rule, readings, at)
        check = decide(monitor, results, at)
        transition = advance(state, check, policy)
        if store is not None:
            store.commit_check(check, transition.state, HISTORY)
        state = transition.state
        checks += 1
        if time.perf_counter() >= deadline and checks >= 3:
            break
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    assert state.checks == checks
    return {
        "series_per_check": series,
        "persist": store is not None,
        "checks": checks,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "series_per_s": round(series * checks / wall),
        "series_per_cpu_s": round(series * checks / cpu) if cpu > 0 else None,
        "us_per_check": round(wall / checks * 1e6, 1),
    }


async def prometheus_cycle(url: str, concurrency: int, cycles: int) -> dict[str, Any]:
    """``cycles`` times: read 1,000 distinct queries at once through one source, evaluate all."""
    rules = [
        RuleConfig(name=f"r{i}", source="prom", query=f'bench_capacity{{shard="{i}"}}', above=1.0)
        for i in range(RULES)
    ]
    source = PrometheusSource("prom", PrometheusOptions(url=url, max_concurrency=concurrency))
    await source.start()
    times: list[float] = []
    cpu: list[float] = []
    bad = 0
    try:
        for n in range(cycles + 1):  # the first cycle warms up the connections
            now = time.time()
            started, cpu0 = time.perf_counter(), time.process_time()
            results = await asyncio.gather(*(source.read(rule, now) for rule in rules))
            for rule, readings in zip(rules, results, strict=True):
                evaluate_rule(rule, readings, now)
            elapsed, used = time.perf_counter() - started, time.process_time() - cpu0
            bad += sum(1 for rs in results for r in rs if r.status is not ReadingStatus.OK)
            if n:
                times.append(elapsed)
                cpu.append(used)
    finally:
        await source.aclose()
    return {
        "max_concurrency": concurrency,
        "cycles": len(times),
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "max_s": round(max(times), 3),
        "client_cpu_s": round(statistics.median(cpu), 3),
        "non_ok_readings": bad,
    }


def run_prometheus(workdir: Path, cycles: int) -> list[dict[str, Any]]:
    """Start an exporter with 1,000 series and a Prometheus scraping it; time the cycles."""
    exporter = Exporter()
    gauge = exporter.gauge("bench_capacity", ["shard"])
    for i in range(RULES):
        gauge.labels(shard=str(i)).set(0.5)
    prom = Prometheus(workdir / "prometheus", [exporter.target])
    try:
        prom.start()
        prom.wait_targets_up()
        wait_for(
            lambda: prom.query("count(bench_capacity)")["result"],
            15,
            what="1,000 series in Prometheus",
        )
        # the option's default, then more queries in flight
        return [
            asyncio.run(prometheus_cycle(prom.url, c, cycles))
            for c in (PrometheusOptions.model_fields["max_concurrency"].default, 16, 64)
        ]
    finally:
        prom.stop()
        exporter.close()


def main() -> None:
    args = parse_args(__doc__ or "")
    seconds = 1.0 if args.quick else 3.0
    cycles = 3 if args.quick else 5
    with tempfile.TemporaryDirectory(prefix="rollbackd-bench-") as tmp:
        workdir = Path(tmp)
        cycle = run_prometheus(workdir, cycles)  # before pinning: Prometheus gets the cores
        pinned = one_core()
        engine: list[dict[str, Any]] = []
        with Store.open(workdir / "state") as store:
            for series in SERIES:
                engine.append(engine_rate(series, seconds, store))
                engine.append(engine_rate(series, seconds, None))
    print(
        table(
            f"Series evaluations per second, one core ({pinned}); persist = Store.commit_check "
            f"per check (SQLite WAL, synchronous=FULL, history {HISTORY})",
            ["series/check", "persist", "checks", "us/check", "series/s (wall)", "series/s (cpu)"],
            [
                (
                    e["series_per_check"],
                    "yes" if e["persist"] else "no",
                    e["checks"],
                    e["us_per_check"],
                    e["series_per_s"],
                    e["series_per_cpu_s"],
                )
                for e in engine
            ],
        )
    )
    print()
    print(
        table(
            f"{RULES}-rule cycle against a local Prometheus (distinct queries, one source)",
            [header for _, header in CYCLE_COLUMNS],
            [[c[key] for key, _ in CYCLE_COLUMNS] for c in cycle],
        )
    )
    write_result(
        "capacity",
        args,
        {
            "method": {
                "engine": "in-process loop of whole checks on one pinned core: evaluate_rule "
                "over N healthy labelled series, decide, advance and Store.commit_check (one "
                f"SQLite transaction per check, history {HISTORY}) for {seconds:g} s per row; "
                "persist=no rows leave out commit_check to show its share",
                "prometheus_cycle": f"{RULES} rules, each an instant query for its own series, "
                "read at once with asyncio.gather through one PrometheusSource (one aiohttp "
                "session; its max_concurrency semaphore bounds the queries in flight), then "
                f"evaluate_rule on each; {cycles} timed cycles after one warm-up, Prometheus "
                "2.x on 127.0.0.1 scraping an exporter with 1,000 series every 1 s; client_cpu_s "
                "is this process's CPU time per cycle (the exporter's thread included)",
            },
            "target": {"series_per_s": 200_000, "cycle_s": 1.0},
            "engine": engine,
            "prometheus_cycle": cycle,
        },
    )


if __name__ == "__main__":
    main()
