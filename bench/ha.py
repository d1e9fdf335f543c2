"""High availability on PostgreSQL: takeover time after a leader's SIGKILL, and what a check
costs when committed to PostgreSQL rather than SQLite.

Takeover: two daemons (subprocesses) on a real PostgreSQL (initdb in a temporary directory,
``tests/pg.py``); a synthetic outage rolls back through one ``flag.http`` step whose first
request the receiver holds unanswered; the leader is SIGKILLed while it waits, and the time
until the standby's request with the same Idempotency-Key arrives is the takeover (notice,
lock, generation, reload, resume, the step's request); the kill comes at a random point of
the standby's poll cycle (a random 0 to takeover_after/2 s wait). The killed daemon is started again
(as the standby), the new leader re-armed, and the next trial begins.

Run: ``.venv/bin/python -m bench.ha [--quick]``.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import parse_args, summary, table, write_result
from rollbackd.api import read_control_token
from rollbackd.client import post_rearm
from rollbackd.engine import Check, MonitorState, Outcome
from rollbackd.pgstate import PgState
from rollbackd.stores import SqliteState, StateStore
from tests.helpers import Receiver, alive, payment_error_rate, role_of
from tests.pg import PASSWORD, PASSWORD_ENV, Postgres, daemon_of, ha_node, lead, running
from tests.servers import wait_for

HISTORY = 50


def scenario(hook: str) -> dict[str, Any]:
    """An outage from the start, rolled back by one ``flag.http`` step to ``hook`` (60 s budget)."""
    payments = {
        "interval": "200ms",
        "rollback_after": 3,
        "on_rollback": ["stop-traffic"],
        "rules": [payment_error_rate("boop", "payment_error_rate", unit=None)],
    }
    return {
        "sources": {
            "boop": {"type": "synthetic", "seed": 3, "noise": 0, "phases": [{"kind": "outage"}]}
        },
        "monitors": {"payments": payments},
        "actions": {"stop-traffic": {"type": "flag.http", "url": f"{hook}/flag", "timeout": "60s"}},
    }


def takeover_trials(pg: Postgres, workdir: Path, trials: int, takeover_after: float) -> list[float]:
    """SIGKILL the leader with a step in flight ``trials`` times; seconds until the rerun."""
    os.environ[PASSWORD_ENV] = PASSWORD
    # holds the first request of each Idempotency-Key unanswered: the leader is killed meanwhile
    holder = Receiver(hold=lambda key: True, delay=60.0)
    url = pg.url(pg.database())
    daemons = {
        node: ha_node(
            workdir / f"{node}-{takeover_after:g}",
            url,
            node,
            scenario(holder.url),
            takeover_after=f"{takeover_after}s",
            environment="bench",
        )
        for node in ("a", "b")
    }
    times: list[float] = []
    try:
        for daemon in daemons.values():
            daemon.start()
        for trial in range(trials):
            leader = wait_for(
                lambda: next((n for n, d in daemons.items() if role_of(d) == "leader"), None),
                30,
                0.05,
                what="a leader",
            )
            standby = "b" if leader == "a" else "a"
            wait_for(lambda s=standby: role_of(daemons[s]) == "standby", 30, 0.05, what="standby")
            if trial:
                token = read_control_token(daemons[leader].workdir / "state")
                asyncio.run(post_rearm(f"127.0.0.1:{daemons[leader].port}", token, "payments"))
            key = wait_for(
                lambda: next((k for k, n in holder.effects().items() if n == 1), None),
                30,
                0.01,
                what="the step in flight",
            )
            # at a random point of the standby's poll cycle, as a real failure would be
            time.sleep(random.uniform(0.0, takeover_after / 2))
            daemons[leader].kill()
            killed = time.monotonic()
            wait_for(lambda k=key: len(holder.arrivals(k)) >= 2, 60, 0.005, what="the rerun")
            times.append(holder.arrivals(key)[1] - killed)
            print(f"  trial {trial + 1}: takeover {times[-1]:.3f} s (leader {leader})")
            daemons[leader].start()  # back as the standby
    finally:
        holder.stop()
        for daemon in daemons.values():
            if alive(daemon):
                daemon.stop()
    return times


async def check_cost(store: StateStore, seconds: float, deciding: bool) -> dict[str, Any]:
    """Commit checks for ``seconds``: quiet ones (grouped) or each one changing the state."""
    checks, state, started = 0, MonitorState(), time.perf_counter()
    while True:
        failing = deciding and checks % 2 == 0
        outcome = Outcome.BREACH if failing else Outcome.OK
        state = MonitorState(
            consecutive_failures=1 if failing else 0, checks=checks + 1, last_outcome=outcome
        )
        await store.commit_check(Check("bench", 1e9 + checks, outcome, ()), state, HISTORY)
        checks += 1
        if time.perf_counter() - started >= seconds and checks >= 5:
            break
    await store.flush()
    wall = time.perf_counter() - started
    return {"checks": checks, "us_per_check": round(wall / checks * 1e6, 1)}


async def costs(pg: Postgres, workdir: Path, seconds: float) -> list[dict[str, Any]]:
    os.environ[PASSWORD_ENV] = PASSWORD
    pgstore = await PgState.open(daemon_of(pg.url(pg.database())), "bench")
    await lead(pgstore)
    sqlite = SqliteState.open(workdir / "sqlite")
    rows = []
    try:
        for name, store in (("sqlite", sqlite), ("postgresql", pgstore)):
            for deciding in (False, True):
                result = await check_cost(store, seconds, deciding)
                rows.append({"store": name, "check": "deciding" if deciding else "quiet", **result})
    finally:
        await pgstore.close()
        await sqlite.close()
    return rows


def main() -> None:
    args = parse_args(__doc__ or "")
    trials = 5 if args.quick else 20
    seconds = 1.0 if args.quick else 3.0
    with tempfile.TemporaryDirectory(prefix="rollbackd-bench-ha-") as tmp, running() as pg:
        workdir = Path(tmp)
        cost_rows = asyncio.run(costs(pg, workdir, seconds))
        takeovers = {}
        for takeover_after in (5.0, 1.0):
            print(f"takeover_after = {takeover_after:g} s")
            takeovers[f"{takeover_after:g}s"] = summary(
                takeover_trials(pg, workdir, trials, takeover_after), digits=3
            )
    print()
    print(
        table(
            f"Takeover after the leader's SIGKILL, {trials} trials each (seconds until the "
            "standby's request for the step in flight)",
            ["takeover_after", "n", "median s", "p99 s", "min s", "max s"],
            [(k, s["n"], s["median"], s["p99"], s["min"], s["max"]) for k, s in takeovers.items()],
        )
    )
    print()
    print(
        table(
            "Cost of committing one check (StateStore.commit_check, one daemon, PostgreSQL "
            "15 on loopback vs SQLite WAL synchronous=FULL)",
            ["store", "check", "checks", "us/check"],
            [(r["store"], r["check"], r["checks"], r["us_per_check"]) for r in cost_rows],
        )
    )
    write_result(
        "ha",
        args,
        {
            "method": {
                "takeover": "two daemons as subprocesses on PostgreSQL 15 (loopback, fsync off: "
                "a test cluster); a synthetic outage rolls back through one flag.http step "
                "whose first request the receiver holds; SIGKILL the leader after a random 0 to "
                "takeover_after/2 s (a random point of the standby's poll cycle), measure until "
                "the standby's request with the same Idempotency-Key arrives; the killed "
                "daemon restarts as the standby and the new leader is re-armed between trials",
                "check_cost": f"StateStore.commit_check in a loop for {seconds:g} s per row; "
                "quiet = state unchanged (group commit, written every second), deciding = "
                "every check changes the counters (one fenced transaction each on PostgreSQL, "
                "one SQLite transaction each)",
            },
            "takeover": takeovers,
            "check_cost": cost_rows,
        },
    )


if __name__ == "__main__":
    main()
