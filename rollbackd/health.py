"""Whether the daemon is doing its job: checks judged and committed, the store writing.

What /health answers and what the systemd watchdog is petted on; plus the chores that keep
those facts fresh (the group commit every second, the watchdog ping).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import structlog

from rollbackd import notify
from rollbackd.errors import StateError
from rollbackd.monitor import MonitorRunner
from rollbackd.schedule import beats
from rollbackd.state import GROUP_COMMIT_SECONDS
from rollbackd.stores import StateStore

log = structlog.get_logger("rollbackd.health")

UNHEALTHY_AFTER = 2
"""Checks in a row of one monitor that crashed or could not be committed before it shows."""

Verdict = tuple[bool, str]
"""``(True, "ok")`` or ``(False, why)``."""


def judge(
    overdue: str | None, store_trouble: str, monitors: Mapping[str, MonitorRunner]
) -> Verdict:
    """Unhealthy when a check is overdue, the store cannot write, or checks keep failing."""
    if overdue:
        return False, overdue
    if store_trouble:
        return False, f"state store cannot write: {store_trouble}"
    for name, runner in monitors.items():
        if runner.failed_runs >= UNHEALTHY_AFTER:
            failed = f"{runner.failed_runs} checks in a row failed"
            return False, f"monitor {name}: {failed}: {runner.trouble}"
    return True, "ok"


class GroupCommit:
    """The chore writing quiet checks every GROUP_COMMIT_SECONDS; ``trouble`` says why not."""

    def __init__(self, store: Callable[[], StateStore]) -> None:
        self._store = store
        self.trouble = ""

    async def run(self, anchor: float | None = None) -> None:
        """Flush forever (until cancelled); log the first failure and the recovery.

        On the beats of the checks' schedule from ``anchor`` (loop clock): monitors checked
        every second wake the process once a second for their checks and this flush together.
        """
        async for _ in beats(GROUP_COMMIT_SECONDS, anchor):
            try:
                await self._store().flush()
            except StateError as exc:
                if not self.trouble:
                    log.error("state_flush_failed", error=str(exc))
                self.trouble = str(exc)
            else:
                if self.trouble:
                    log.warning("state_flush_recovered")
                self.trouble = ""


async def watchdog(health: Callable[[], Verdict]) -> None:
    """Pet systemd's watchdog while healthy (until cancelled); without a watchdog, return."""
    interval = notify.watchdog_interval()
    if interval is None:
        return
    while True:
        healthy, reason = health()
        if healthy:
            notify.watchdog()
        else:
            log.error("watchdog_withheld", reason=reason)
        await asyncio.sleep(interval)
