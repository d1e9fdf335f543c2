"""Local actions: alert.log writes one structured event; exec runs argv without a shell, bounded."""

from __future__ import annotations

import json
import os
import sys
from functools import partial
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from rollbackd.actions.local import ALERT_LOG, EXEC
from rollbackd.errors import ActionError
from rollbackd.plan import attempt_once
from tests import helpers
from tests.servers import wait_for

PY = sys.executable


# The second attempt of step 1 of an armed rollback of monitor payments.
context = partial(helpers.context, step=1, attempt=2)


def exec_action(argv: list[str], **options: object) -> object:
    """Build an exec action through its registered type."""
    return EXEC.build("run", EXEC.options.model_validate({"argv": argv, **options}))


async def run(argv: list[str], **options: object) -> str:
    """Run an exec action once and return its detail."""
    action = exec_action(argv, **options)
    return await action.run(context())  # type: ignore[attr-defined,no-any-return]


async def test_alert_log_writes_one_incident_event() -> None:
    """alert.log emits ``incident_alert`` at its level with the incident's fields."""
    options = ALERT_LOG.options.model_validate({"level": "error"})
    with capture_logs() as logs:
        detail = await ALERT_LOG.build("log", options).run(context())
    [event] = [e for e in logs if e["event"] == "incident_alert"]
    assert event["log_level"] == "error"
    assert event["monitor"] == "payments"
    assert event["incident"] == "20261125T120000Z-payments-ab12"
    assert event["message"] == "rollback on payments: 5 failing checks"
    assert detail == "logged at error: rollback on payments: 5 failing checks"


async def test_exec_passes_argv_verbatim_without_a_shell() -> None:
    """Arguments reach the program as written (no shell), with {fields} rendered."""
    script = "import json, sys; print(json.dumps(sys.argv[1:]))"
    args = ["a b", "$(touch /tmp/x)", ";", "*", "{monitor}-{incident}"]
    detail = await run([PY, "-c", script, *args])
    printed = json.loads(detail.split(": ", 2)[2])
    assert printed == [
        "a b",
        "$(touch /tmp/x)",
        ";",
        "*",
        "payments-20261125T120000Z-payments-ab12",
    ]
    assert detail.startswith(f"{PY}: exit status 0: ")


async def test_exec_environment_is_config_plus_incident_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The child sees PATH, the configured env (secrets revealed) and ROLLBACKD_*, nothing else."""
    monkeypatch.setenv("DAEMON_ONLY", "leak")
    monkeypatch.setenv("HOOK_TOKEN", "s3cret")
    script = "import json, os; print(json.dumps(dict(os.environ)))"
    detail = await run(
        [PY, "-c", script],
        env={"STATIC": "1", "TOKEN": {"env": "HOOK_TOKEN"}},
        output_limit=5000,
    )
    env = json.loads(detail.split(": ", 2)[2])
    assert "DAEMON_ONLY" not in env
    assert env["STATIC"] == "1"
    assert env["TOKEN"] == "s3cret"
    assert env["ROLLBACKD_MONITOR"] == "payments"
    assert env["ROLLBACKD_IDEMPOTENCY_KEY"] == "20261125T120000Z-payments-ab12:1"
    assert (env["ROLLBACKD_STEP"], env["ROLLBACKD_ATTEMPT"]) == ("1", "2")
    assert env["PATH"] == os.environ["PATH"]


async def test_exec_nonzero_exit_is_a_failure_with_output() -> None:
    """A non-zero exit fails the attempt with the status and the output's tail."""
    script = "import sys; print('switching route', flush=True); sys.exit('route API said no')"
    with pytest.raises(ActionError) as caught:
        await run([PY, "-c", script])
    assert str(caught.value) == f"{PY}: exit status 1: switching route\nroute API said no"


async def test_exec_output_is_truncated_to_its_tail() -> None:
    """Long output keeps only the last ``output_limit`` characters in the detail."""
    script = "print('x' * 100000 + 'THE END')"
    detail = await run([PY, "-c", script], output_limit=50)
    tail = detail.split(": ", 2)[2]
    assert tail.startswith("...")
    assert tail.endswith("THE END")
    assert len(tail) == 53


async def test_exec_missing_program_is_an_error() -> None:
    """A program that does not exist fails the attempt with the reason."""
    with pytest.raises(ActionError, match="cannot run /nonexistent/tool: No such file"):
        await run(["/nonexistent/tool"])


def _gone(pid: int) -> bool:
    """Tell whether ``pid`` no longer runs (gone, or a zombie awaiting its reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


async def test_exec_timeout_kills_the_process_and_its_children(tmp_path: Path) -> None:
    """When the step's timeout cancels the attempt, the command and its children are killed."""
    pids = tmp_path / "pids"
    script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(60)\n"
    )
    action = exec_action([PY, "-c", script])
    ok, detail, _ = await attempt_once(action, context(), 1.0)  # type: ignore[arg-type]
    assert (ok, detail) == (False, "timed out after 1s")
    parent, child = (int(p) for p in pids.read_text().split())
    assert _gone(parent)
    wait_for(lambda: _gone(child), 5.0, what="grandchild killed")


def test_alert_log_resolves_and_exec_does_not() -> None:
    """alert.log tells people, so it declares resolves; exec does not."""
    assert (ALERT_LOG.resolves, EXEC.resolves) == (True, False)
