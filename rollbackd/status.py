"""The status of a running daemon: the ``/status`` document, and its table for the terminal."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from rollbackd.config import Config
from rollbackd.records import IncidentRecord


def document(
    version: str,
    config: Config,
    monitors: Mapping[str, dict[str, Any]],
    incidents: Sequence[IncidentRecord],
    *,
    waiting: Sequence[IncidentRecord] = (),
    released: int | None = None,
) -> dict[str, Any]:
    """The ``/status`` document: mode, limits, every monitor's part, the recent incidents.

    ``waiting``: every incident whose plan waits (approval, cooldown), however old;
    ``released``: rollback plans let run within ``max_rollbacks.per`` until now.
    """
    daemon = config.daemon
    limit = daemon.max_rollbacks
    return {
        "version": version,
        "mode": daemon.mode,
        "environment": daemon.environment,
        "config_sha256": config.sha256,
        "limits": {
            "max_rollbacks": None
            if limit is None
            else {"count": limit.count, "per_seconds": limit.per, "released": released},
            "rearm_cooldown_seconds": daemon.rearm_cooldown,
        },
        "monitors": dict(monitors),
        "waiting": [
            {
                "id": inc.id,
                "monitor": inc.monitor,
                "waiting": inc.waiting,
                "reason": _wait(inc).get("reason"),
                "until": _wait(inc).get("until"),
                "opened_at": inc.opened_at,
            }
            for inc in waiting
        ],
        "incidents": [
            {
                "id": inc.id,
                "monitor": inc.monitor,
                "event": inc.event,
                "mode": inc.mode,
                "opened_at": inc.opened_at,
                "finished_at": inc.finished_at,
                "waiting": inc.waiting,
                "approved_at": inc.approved_at,
                "steps": [
                    {"step": s.step, "action": s.action, "status": s.status, "detail": s.detail}
                    for s in inc.steps
                ],
            }
            for inc in incidents
        ],
    }


def _wait(incident: IncidentRecord) -> dict[str, Any]:
    wait = incident.details.get("wait")
    return wait if isinstance(wait, dict) else {}


def table(status: dict[str, Any]) -> str:
    """A table of monitors (state, counters, last check) and their rules' latest values."""
    lines = [
        f"rollbackd {status.get('version', '?')}  mode={status.get('mode')}  "
        f"environment={status.get('environment')}",
        "",
        f"{'MONITOR':<18} {'STATE':<12} {'FAILURES':<9} {'ERRORS':<7} {'LAST CHECK':<20} INCIDENT",
    ]
    peers: list[dict[str, Any]] = status.get("peers") or []
    if peers:  # a high-availability group (PostgreSQL state)
        seen = ", ".join(f"{p['node']} ({p['role']}, {p['seen_seconds_ago']}s ago)" for p in peers)
        lines[1:1] = [
            f"role={status.get('role')}  generation={status.get('generation')}  peers: {seen}"
        ]
    monitors: dict[str, Any] = status.get("monitors", {})
    for name, monitor in sorted(monitors.items()):
        failures = f"{monitor['consecutive_failures']}/{monitor['rollback_after']}"
        lines.append(
            f"{name:<18} {monitor['state']:<12} {failures:<9} "
            f"{monitor.get('consecutive_errors', 0):<7} {_when(monitor.get('last_check_at')):<20} "
            f"{monitor.get('incident') or '-'}"
        )
        for rule, series in monitor.get("rules", {}).items():
            if not series:
                lines.append(f"    {rule:<26} (not checked yet)")
            for item in series:
                labels = ",".join(f"{k}={v}" for k, v in item.get("labels", {}).items())
                lines.append(
                    f"    {rule + ('{' + labels + '}' if labels else ''):<26} {_value(item)}"
                )
    waiting = status.get("waiting", [])
    if waiting:
        lines += ["", "PLANS WAITING"]
        for inc in waiting:
            hint = (
                f"rollbackd approve {inc['id']}"
                if inc.get("waiting") == "approval"
                else f"runs at {_when(inc.get('until'))}"
            )
            lines.append(f"  {inc['id']}  {inc.get('waiting')}  {inc.get('reason') or ''}  {hint}")
    if status.get("rollouts"):
        lines += ["", rollout_table(status["rollouts"])]
    incidents = status.get("incidents", [])
    if incidents:
        lines += ["", "RECENT INCIDENTS"]
        for inc in incidents:
            done = "finished" if inc.get("finished_at") else "RUNNING"
            if inc.get("waiting") and not inc.get("finished_at"):
                done = f"WAITING ({inc['waiting']})"
            steps = " ".join(f"{s['action']}:{s['status']}" for s in inc.get("steps", []))
            lines.append(f"  {inc['id']}  {inc['event']}  {inc['mode']}  {done}  {steps}")
    return "\n".join(lines)


def _value(item: dict[str, Any]) -> str:
    value = item.get("value")
    shown = "-" if value is None else f"{value:.4g}{item.get('unit', '')}"
    side = ">" if item.get("direction") == "above" else "<"
    limit = f"{item.get('threshold')}{item.get('unit', '')}"
    verdict = str(item.get("verdict", "")).upper()
    return f"{shown:<12} breach if {side} {limit:<10} {verdict}  {item.get('reason', '')}".rstrip()


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def rollout_table(rollouts: dict[str, Any]) -> str:
    """Rollouts (``rollouts`` of ``/status``): step, percent, hold left, every gate and why."""
    if not rollouts:
        return "no rollouts configured"
    lines = [f"{'ROLLOUT':<18} {'STATE':<12} {'STEP':<6} {'PERCENT':<8} {'HOLD LEFT':<11} REASON"]
    for name, rollout in sorted(rollouts.items()):
        if rollout is None:
            lines.append(f"{name:<18} (not running: reload the daemon with this config)")
            continue
        steps = rollout.get("steps", [])
        left = rollout.get("hold_remaining_s")
        lines.append(
            f"{name:<18} {rollout['state']:<12} {rollout['step']}/{len(steps) - 1:<4} "
            f"{str(rollout['percent']) + '%':<8} {'-' if left is None else f'{left:.0f}s':<11} "
            f"{rollout.get('reason') or ''}".rstrip()
        )
        for gate, view in rollout.get("gates", {}).items():
            checks = f"{view.get('ok_checks')}/{view.get('min_checks')} ok checks"
            why = view.get("why") or "green"
            lines.append(f"    gate {gate:<21} {view.get('state'):<12} {checks:<16} {why}")
    return "\n".join(lines)
