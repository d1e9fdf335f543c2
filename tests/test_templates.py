"""Template fields: what an action may render from the incident, whatever the incident holds."""

from __future__ import annotations

import sys

from rollbackd.actions import action_types
from rollbackd.actions.templates import fields
from rollbackd.plan import attempt_once
from tests import helpers


def test_a_nul_in_the_reason_is_spelled_not_passed() -> None:
    """A NUL from a series label becomes a visible escape: argv, env and headers cannot carry it."""
    ctx = helpers.context(reason='err{region="eu\0west"}: value 5.0 above 1.0')
    values = fields(ctx)
    assert "\0" not in "".join(values.values())
    assert "eu\\0west" in values["reason"]


async def test_exec_runs_with_a_nul_in_the_reason() -> None:
    """An exec step whose argv renders a reason holding a NUL still runs (it used to fail)."""
    kind = action_types().get("exec")
    options = kind.options.model_validate(
        {"argv": [sys.executable, "-c", "import sys; print(len(sys.argv[1]))", "{reason}"]}
    )
    action = kind.build("script", options)
    ctx = helpers.context(reason="label a\0b")
    ok, detail, _ = await attempt_once(action, ctx, 10.0)
    await action.aclose()
    assert ok, detail
