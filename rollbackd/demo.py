"""The embedded demo: synthetic BOOP traffic goes bad and is rolled back, in under a minute.

No server and no root: the flag and routing files live in a temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

from prometheus_client import CollectorRegistry

from rollbackd import logs
from rollbackd.assemble import Assembly, from_dict
from rollbackd.config import Config
from rollbackd.daemon import Daemon
from rollbackd.engine import Check, MonitorState, Outcome
from rollbackd.errors import RollbackdError
from rollbackd.verdicts import Verdict

FLAG = "boop-payments"
DEADLINE_SECONDS = 120.0
"""The demo gives up (exit 1) if no rollback has finished by then."""


def demo_config(directory: Path, speed: float = 1.0) -> Assembly:
    """The demo's configuration: the seed's thresholds over a synthetic source."""
    interval = f"{round(2000 / speed)}ms"
    seconds = {"healthy": 14 / speed, "degrading": 10 / speed}
    hold = f"{round(3000 / speed)}ms"  # 5 -> 25 -> 50 while healthy; 50 holds past the breach
    rules = {
        "authentication": [
            ("auth-error-rate", "auth_error_rate", "above", 1.0, "%"),
            ("auth-response-time", "auth_response_time_ms", "above", 3000.0, "ms"),
            ("auth-success-rate", "auth_success_rate", "below", 99.0, "%"),
        ],
        "payments": [
            ("payment-error-rate", "payment_error_rate", "above", 0.1, "%"),
            ("payment-response-time", "payment_response_time_ms", "above", 2000.0, "ms"),
            ("payment-success-rate", "payment_success_rate", "below", 99.5, "%"),
        ],
    }
    plan = ["stop-boop-traffic", "drain", "route-legacy", "notify-team"]
    raw: dict[str, Any] = {
        "daemon": {
            "mode": "armed",
            "environment": "demo",
            "state_dir": str(directory / "state"),
            "listen": "",
        },
        "sources": {
            "boop": {
                "type": "synthetic",
                "seed": 7,
                "phases": [
                    {"kind": "healthy", "duration": f"{seconds['healthy']:.3f}s"},
                    {"kind": "degrading", "duration": f"{seconds['degrading']:.3f}s"},
                    {"kind": "outage"},
                ],
            }
        },
        "monitors": {
            name: {
                "interval": interval,
                "rollback_after": 5,
                "alert_after": 1,
                "on_alert": ["notify-team"],
                "on_rollback": plan,
                "rules": [
                    {"name": rule, "source": "boop", "query": metric, side: limit, "unit": unit}
                    for rule, metric, side, limit, unit in monitor_rules
                ],
            }
            for name, monitor_rules in rules.items()
        },
        "actions": {
            "stop-boop-traffic": {
                "type": "flag.file",
                "path": str(directory / "flags.json"),
                "flag": FLAG,
                "variant": "off",
            },
            "drain": {
                "type": "wait",
                "source": "boop",
                "query": "inflight_transactions",
                "poll": f"{round(1000 / speed)}ms",
                "timeout": "30s",  # the synthetic drain takes 10 s whatever the speed
                "retries": 0,
            },
            "route-legacy": {
                "type": "route.file",
                "path": str(directory / "traffic.env"),
                "key": "BOOP_TRAFFIC_PERCENT",
                "value": "0",
            },
            "notify-team": {"type": "alert.log", "level": "warning"},
            "route-percent": {
                "type": "route.file",
                "path": str(directory / "traffic.env"),
                "key": "BOOP_TRAFFIC_PERCENT",
                "value": "{percent}",
            },
            "announce": {
                "type": "alert.log",
                "level": "info",
                "message": "BOOP now takes {percent}% of traffic",
            },
        },
        "rollouts": {
            "boop": {
                "steps": [5, 25, 50, 100],
                "holds": [hold, hold, "10m", hold],
                "gates": list(rules),
                "set": "route-percent",
                "on_promote": ["announce"],
            }
        },
    }
    return from_dict(raw)


def prepare(directory: Path) -> None:
    """Write the rollout's starting point: flag on, 5 % of traffic on BOOP (the first step)."""
    directory.mkdir(parents=True, exist_ok=True)
    flags = {
        "flags": {
            FLAG: {
                "state": "ENABLED",
                "variants": {"on": True, "off": False},
                "defaultVariant": "on",
            }
        }
    }
    (directory / "flags.json").write_text(json.dumps(flags, indent=2) + "\n")
    (directory / "traffic.env").write_text(
        "# BOOP staged rollout (deployment guide, section 3)\nBOOP_TRAFFIC_PERCENT=5\n"
    )


def run_demo(directory: Path | None = None, speed: float = 1.0, out: TextIO | None = None) -> int:
    """``rollbackd demo``: 0 once a rollback plan has run, 1 if none did."""
    out = out or sys.stdout
    directory = directory or Path(tempfile.mkdtemp(prefix="rollbackd-demo-"))
    try:
        prepare(directory)
    except OSError as exc:
        raise RollbackdError(
            f"demo: cannot write its files in {directory}: {exc.strerror}"
        ) from exc
    logs.configure("console", "info", quiet={"check_failed", "check_inconclusive"})
    assembly = demo_config(directory, speed)
    config = assembly.config
    print(_INTRO.format(dir=directory, hold=3 / speed), file=out, flush=True)
    started = time.monotonic()
    incident = asyncio.run(_watch(assembly, out, started))
    if incident is None:
        print("\nno rollback happened before the deadline: something is wrong", file=out)
        return 1
    _summary(directory, config, incident, out)
    return 0


async def _watch(assembly: Assembly, out: TextIO, started: float) -> str | None:
    config = assembly.config
    daemon = Daemon(assembly, registry=CollectorRegistry())

    def show(monitor: str, check: Check, state: MonitorState) -> None:
        print(
            _line(monitor, check, state, time.monotonic() - started, config), file=out, flush=True
        )

    daemon.check_listener = show
    serving = asyncio.create_task(daemon.serve())
    deadline = time.monotonic() + DEADLINE_SECONDS
    incident: str | None = None
    shown: tuple[Any, ...] = ()
    try:
        await daemon.ready.wait()
        while incident is None and time.monotonic() < deadline and not serving.done():
            await asyncio.sleep(0.2)
            shown = _ramp(daemon.ramp.status().get("boop", {}), shown, started, out)
            finished = [
                i.id
                for i in await daemon.state.incidents()
                if i.event == "rollback" and i.finished_at is not None
            ]
            incident = finished[0] if finished else None
    finally:
        daemon.stop()
        await serving
    return incident


def _ramp(
    rollout: dict[str, Any], shown: tuple[Any, ...], started: float, out: TextIO
) -> tuple[Any, ...]:
    """Print the rollout's line when its percentage or state changed; what it printed."""
    now = (rollout.get("percent"), rollout.get("state"), rollout.get("promoting"))
    if now != shown and rollout:
        percent, state, promoting = now
        steps = rollout.get("steps", [])
        step = f"step {rollout.get('step')} of {len(steps) - 1}"
        if promoting:
            state, percent = "promoting", steps[rollout.get("step", 0)]
        what = {
            "promoting": f"setting {percent}% ({step}): incident {promoting}",
            "holding": f"at {percent}% ({step}), holding {rollout.get('hold_s'):g}s "
            "while both monitors stay green",
            "rolled_back": f"ROLLED BACK ({rollout.get('reason')}): their plans route to 0%",
        }.get(str(state), f"{state} at {percent}%")
        print(f"[{time.monotonic() - started:5.1f}s] rollout boop    {what}", file=out, flush=True)
    return now


def _line(monitor: str, check: Check, state: MonitorState, elapsed: float, config: Config) -> str:
    limit = config.monitors[monitor].rollback_after
    values = "  ".join(
        f"{r.rule}={'-' if r.value is None else f'{r.value:.4g}'}{r.unit}"
        + ("!" if r.verdict is Verdict.BREACH else "")
        for r in check.results
    )
    outcome = {Outcome.OK: "ok", Outcome.BREACH: "BREACH", Outcome.INCONCLUSIVE: "?"}[check.outcome]
    failures = f"failures {state.consecutive_failures}/{limit}"
    return f"[{elapsed:5.1f}s] {monitor:<15} {outcome:<7} {failures}  {state.phase!s:<12} {values}"


def _summary(directory: Path, config: Config, incident: str, out: TextIO) -> None:
    flags = json.loads((directory / "flags.json").read_text())
    variant = flags["flags"][FLAG]["defaultVariant"]
    traffic = (directory / "traffic.env").read_text().strip().splitlines()[-1]
    record = config.daemon.state_dir / "incidents" / f"{incident}.json"
    print(
        _SUMMARY.format(
            incident=incident, flag=FLAG, variant=variant, traffic=traffic, record=record
        ),
        file=out,
    )


_INTRO = """\
rollbackd demo: synthetic BOOP traffic, healthy at first, then degrading.
The rollout ramps BOOP's share of traffic 5% -> 25% -> 50%, holding {hold:g} s at each step
while both monitors stay green. Two monitors check the deployment guide's thresholds every 2 s and
roll back after 5 failing checks in a row: flag off, drain in-flight work, traffic back to
legacy (0%), notify.
Files (the 'production' the demo rolls back): {dir}
"""

_SUMMARY = """
rolled back. incident {incident}
  flag {flag} -> defaultVariant "{variant}"
  traffic    -> {traffic}
  incident record (triggering checks, recent samples, every step's result):
    {record}
"""
