"""exec across a daemon crash: a command a killed daemon left running never runs twice at once."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rollbackd.actions import ActionContext
from rollbackd.actions.children import ChildNotes, start_time
from rollbackd.plan import attempt_once
from tests.servers import wait_for
from tests.test_actions_local import context, exec_action

PY = sys.executable
REPO = Path(__file__).resolve().parent.parent

# The command (no braces: exec's arguments are templates): holds an exclusive lock while it
# "works", and logs start / end, or overlap when another copy holds the lock.
COMMAND = """
import fcntl, os, sys, time
log, lock, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
def note(what):
    with open(log, "a") as out:
        out.write(" ".join([what, str(os.getpid()), repr(time.time())]) + "\\n")
with open(lock, "a") as held:
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        note("overlap")
        sys.exit(3)
    note("start")
    time.sleep(hold)
    note("end")
"""

# The daemon to be killed: runs the exec step with a state directory, as the plan runner does.
DAEMON = """
import asyncio, dataclasses, json, sys
from pathlib import Path
from tests.test_actions_local import context, exec_action
state_dir, argv = Path(sys.argv[1]), json.loads(sys.argv[2])
ctx = dataclasses.replace(context(), state_dir=state_dir)
asyncio.run(exec_action(argv).run(ctx))
"""


@dataclasses.dataclass
class Scene:
    """A state directory, the command's argv and its log."""

    state_dir: Path
    log: Path
    lock: Path

    def argv(self, hold: float) -> list[str]:
        """The exec action's argv: the command holding its lock for ``hold`` seconds."""
        return [PY, "-c", COMMAND, str(self.log), str(self.lock), str(hold)]

    def ctx(self) -> ActionContext:
        """The same step (same idempotency key) as the killed daemon ran, after a restart."""
        return dataclasses.replace(context(), attempt=3, state_dir=self.state_dir)

    def events(self) -> list[tuple[str, int, float]]:
        """The command's log: (what, pid, time)."""
        if not self.log.exists():
            return []
        lines = [line.split() for line in self.log.read_text().splitlines()]
        return [(what, int(pid), float(at)) for what, pid, at in lines]


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    """The scene; any command still running at the end is killed with its group."""
    made = Scene(tmp_path / "state", tmp_path / "command.log", tmp_path / "command.lock")
    made.state_dir.mkdir()
    yield made
    for _, pid, _ in made.events():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def kill_daemon_mid_run(scene: Scene, hold: float) -> int:
    """Start the step in a daemon process, SIGKILL it while the command runs; the command's pid."""
    daemon = subprocess.Popen(
        [PY, "-c", DAEMON, str(scene.state_dir), json.dumps(scene.argv(hold))], cwd=REPO
    )
    try:
        wait_for(scene.events, 10.0, what="command started")
    finally:
        daemon.kill()
        daemon.wait()
    [(what, pid, _)] = scene.events()
    assert what == "start"
    assert start_time(pid) is not None  # orphaned, still running in its own session
    return pid


async def test_rerun_after_a_crash_waits_for_the_orphaned_command(scene: Scene) -> None:
    """The step re-run after a SIGKILL starts its command only once the orphaned copy exited."""
    orphan = kill_daemon_mid_run(scene, hold=1.5)
    ok, detail, _ = await attempt_once(exec_action(scene.argv(1.5)), scene.ctx(), 20.0)  # type: ignore[arg-type]
    assert ok, detail
    events = scene.events()
    assert [(what, pid == orphan) for what, pid, _ in events] == [
        ("start", True),
        ("end", True),
        ("start", False),
        ("end", False),
    ]
    assert events[2][2] >= events[1][2]  # the second copy started after the first had ended
    assert list((scene.state_dir / "children").iterdir()) == []


async def test_rerun_fails_while_the_orphaned_command_outlives_the_attempt(scene: Scene) -> None:
    """An orphaned copy still running when the attempt's time is up fails it, naming the pid."""
    orphan = kill_daemon_mid_run(scene, hold=60)
    ok, detail, _ = await attempt_once(exec_action(scene.argv(60)), scene.ctx(), 1.5)  # type: ignore[arg-type]
    assert not ok
    assert detail.startswith(f"{PY}: the copy an earlier attempt started (pid {orphan}, ")
    assert re.search(r"still runs after 1\.[0-3]s; not starting a second one", detail)
    assert f"kill -- -{orphan}" in detail
    assert [what for what, _, _ in scene.events()] == ["start"]
    assert ChildNotes.under(scene.state_dir).recorded(scene.ctx().idempotency_key) is not None


async def test_note_is_removed_when_the_command_exits(scene: Scene) -> None:
    """A command run to its end leaves no note behind; without a state directory none is made."""
    ctx = scene.ctx()
    assert (await attempt_once(exec_action(scene.argv(0)), ctx, 10.0))[0]  # type: ignore[arg-type]
    assert list((scene.state_dir / "children").iterdir()) == []
    bare = dataclasses.replace(ctx, state_dir=None)
    assert (await attempt_once(exec_action(scene.argv(0)), bare, 10.0))[0]  # type: ignore[arg-type]


async def test_note_of_a_reused_pid_does_not_block(scene: Scene) -> None:
    """A note whose pid now belongs to another process (other start time) is stale: run at once."""
    notes = ChildNotes.under(scene.state_dir)
    notes.prepare()
    ctx = scene.ctx()
    mine = start_time(os.getpid())
    assert mine is not None
    notes.path(ctx.idempotency_key).write_text(
        json.dumps({"pid": os.getpid(), "start_time": mine + 1, "program": "x"})
    )
    ok, detail, _ = await attempt_once(exec_action(scene.argv(0)), ctx, 5.0)  # type: ignore[arg-type]
    assert ok, detail
    assert notes.recorded(ctx.idempotency_key) is None
