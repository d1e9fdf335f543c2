"""A takeover on PostgreSQL: a check between the lead and the reload must not commit.

A standby evaluates on its own copy of each monitor's state; a takeover raises the
generation (the store leads from there) and then reloads every monitor's committed state.
A check landing in between would commit the standby's copy: a copy latched while the old
leader was gone, with no incident, would latch the monitor for good and lose the rollback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from rollbackd.config import from_dict
from rollbackd.engine import Check, Event, Phase, Transition
from rollbackd.monitor import MonitorRunner
from rollbackd.pgstate import PgState
from rollbackd.sources.synthetic import SyntheticOptions, SyntheticSource
from tests.helpers import payment_error_rate
from tests.pg import PASSWORD, PASSWORD_ENV, Postgres, daemon_of, lead, state_keys

pytestmark = pytest.mark.slow

ROLLBACK_AFTER = 2


@pytest.fixture(autouse=True)
def password(monkeypatch: pytest.MonkeyPatch) -> None:
    """The role's password, where the config's secret reference says."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)


def payments(
    url: str,
    tmp_path: Path,
    opened: list[str],
    store: PgState,
    observer: Callable[[Check, Transition, float], None] | None = None,
) -> MonitorRunner:
    """The payments monitor on a source in an outage from the start, committing to ``store``."""
    monitor = {
        "interval": "1s",
        "rollback_after": ROLLBACK_AFTER,
        "on_rollback": ["page"],
        "rules": [payment_error_rate("boop", "payment_error_rate", unit=None)],
    }
    config = from_dict(
        {
            "daemon": {"state_dir": str(tmp_path), **state_keys(url)},
            "sources": {"boop": {"type": "synthetic"}},
            "monitors": {"payments": monitor},
            "actions": {"page": {"type": "alert.webhook", "url": "http://127.0.0.1:9/"}},
        }
    )
    options = SyntheticOptions.model_validate(
        {"start": 0, "noise": 0, "phases": [{"kind": "outage"}]}
    )
    return MonitorRunner(
        name="payments",
        config=config.monitors["payments"],
        sources={"boop": SyntheticSource("boop", options)},
        store=store,
        history=5,
        mode="armed",
        on_incident=opened.append,
        observer=observer,
    )


async def test_a_check_between_the_takeover_and_the_reload_commits_nothing(
    pg: Postgres, tmp_path: Path
) -> None:
    """The standby's latched copy is not committed: after the reload the rollback opens."""
    url = pg.url(pg.database())
    store = await PgState.open(daemon_of(url))
    try:
        opened: list[str] = []
        runner = payments(url, tmp_path, opened, store)
        await runner.load()  # a standby's start: the committed state (none yet)
        for _ in range(ROLLBACK_AFTER):  # the leader is gone: the standby's copy latches
            await runner.tick()
        assert runner.state.phase is Phase.ROLLED_BACK
        assert await store.monitor_state("payments") is None
        await lead(store)  # the takeover: the store leads before the daemon reloads
        await runner.tick()  # a check of the scheduler lands in between
        assert await store.monitor_state("payments") is None, "the standby's copy committed"
        await runner.load()  # the takeover reloads: counts on from the committed state
        for _ in range(ROLLBACK_AFTER):
            await runner.tick()
        assert len(opened) == 1
        incident = await store.incident(opened[0])
        assert incident.event is Event.ROLLBACK

        store.lead(None)  # deposed, then leading again: the state is reloaded first again
        runner.standby()
        await lead(store)
        committed = await store.monitor_state("payments")
        await runner.tick()
        assert await store.monitor_state("payments") == committed
    finally:
        await store.close()


async def test_a_standby_logs_and_counts_no_rollback_of_its_own(
    pg: Postgres, tmp_path: Path
) -> None:
    """The standby's copy latches, but its log says the decision is the leader's.

    ``rollback_triggered`` is the leader's line (operators grep for it), and the standby's
    observer (its metrics) is handed no event: a rollback is counted once, by the leader.
    """
    url = pg.url(pg.database())
    store = await PgState.open(daemon_of(url))
    try:
        seen: list[tuple[Event, ...]] = []
        runner = payments(url, tmp_path, [], store, lambda _c, t, _s: seen.append(t.events))
        await runner.load()
        with capture_logs() as logs:
            for _ in range(ROLLBACK_AFTER):
                await runner.tick()
        assert runner.state.phase is Phase.ROLLED_BACK
        assert seen == [(), ()]
        events = [entry["event"] for entry in logs]
        assert "rollback_triggered" not in events
        (left,) = [entry for entry in logs if entry["event"] == "decision_left_to_leader"]
        assert (left["log_level"], left["events"]) == ("info", ["rollback"])
    finally:
        await store.close()
