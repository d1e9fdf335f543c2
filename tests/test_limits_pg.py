"""max_rollbacks on PostgreSQL state: exact when many monitors breach on the same tick.

An in-process daemon leads on a real PostgreSQL (``tests/pg.py``); its monitors share one
scheduler job, so their checks run concurrently and each gate's count and commit are
awaited I/O that the others' can interleave with.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rollbackd.daemon import Daemon
from rollbackd.engine import Event
from rollbackd.records import IncidentDraft, IncidentRecord
from tests.helpers import wait_until
from tests.pg import PASSWORD, PASSWORD_ENV, Postgres, state_keys
from tests.test_daemon import SCRIPT, from_dict
from tests.test_daemon import running as serve
from tests.test_limits import EFFECTS, config

pytestmark = pytest.mark.slow

MONITORS = 6
LIMIT = 2


@pytest.fixture(autouse=True)
def healthy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The role's password where the config says; a healthy source and no effects."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    SCRIPT.value, SCRIPT.failing, SCRIPT.reads = 0.1, None, 0
    EFFECTS.clear()
    yield
    SCRIPT.value = 0.1


def on_pg(tmp_path: Path, pg: Postgres, **daemon: Any) -> dict[str, Any]:
    """``MONITORS`` scripted monitors checking every 100 ms, state on a fresh database."""
    raw = config(tmp_path / "state", MONITORS, **daemon)
    for monitor in raw["monitors"].values():
        monitor["interval"] = "100ms"
    raw["daemon"].update(state_keys(pg.url(pg.database())))
    raw["ha"] = {"takeover_after": "400ms", "node": "solo"}
    return raw


async def rollbacks(daemon: Daemon) -> list[IncidentRecord]:
    """The rollback incidents in the shared store, oldest first."""
    found = await daemon.state.incidents(limit=100)
    return sorted((i for i in found if i.event is Event.ROLLBACK), key=lambda i: i.opened_at)


async def opened(daemon: Daemon, count: int, timeout: float = 10.0) -> list[IncidentRecord]:
    """Poll the shared store until ``count`` rollback incidents exist; fail at ``timeout``."""
    deadline = time.monotonic() + timeout
    while len(found := await rollbacks(daemon)) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{count} rollback incidents not opened within {timeout}s: {len(found)}")
        await asyncio.sleep(0.05)
    return found


async def test_six_monitors_breaching_on_one_tick_run_exactly_the_limit(
    pg: Postgres, tmp_path: Path
) -> None:
    """6 monitors roll back on the same tick under max_rollbacks 2: 2 plans run, 4 wait.

    An approval (it counts too) waits for a rollback's gate and commit in progress.
    """
    raw = on_pg(tmp_path, pg, max_rollbacks={"count": LIMIT, "per": "1h"})

    async def body(daemon: Daemon) -> None:
        await wait_until(lambda: daemon.role == "leader", timeout=10, what="the lead")
        runners = daemon.monitors.values()
        await wait_until(lambda: all(r.state.checks >= 1 for r in runners), what="checks")
        SCRIPT.value = 5.0  # every monitor breaches from its next check on
        found = await opened(daemon, MONITORS)
        ran = [i for i in found if i.waiting is None]
        held = [i for i in found if i.waiting is not None]
        assert (len(ran), len(held)) == (LIMIT, MONITORS - LIMIT), [
            (i.monitor, i.waiting, i.opened_at) for i in found
        ]
        assert {i.waiting for i in held} == {"approval"}
        assert all(i.details["wait"]["released"] == LIMIT for i in held)
        await wait_until(
            lambda: sum(1 for e in EFFECTS if e[0] == "rollback") == LIMIT, what="the plans"
        )
        assert sorted(e[2] for e in EFFECTS if e[0] == "rollback") == sorted(i.id for i in ran)
        assert await daemon.state.rollbacks_released(0.0, "armed") == LIMIT

        late = IncidentDraft("m0", Event.ROLLBACK, "test", "armed", time.time(), ("act",), {})
        async with daemon.waiting.gate(late) as gated:
            assert gated.waiting == "approval"
            approving = asyncio.create_task(daemon.approve(held[0].id))
            await asyncio.sleep(0.2)  # not a synchronisation: it must still be waiting
            assert not approving.done()
        assert (await approving)["waited"] == "approval"
        assert await daemon.state.rollbacks_released(0.0, "armed") == LIMIT + 1

    await serve(from_dict(raw), body)
