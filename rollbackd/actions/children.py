"""Notes of the commands ``exec`` started, so a restarted daemon never runs a second copy.

A note ``state_dir/children/<idempotency key>.json`` holds the child's pid and its start
time (``/proc/<pid>/stat`` field 22, which tells a live child from a reused pid). It is
written right after the start and removed once the child has exited; a note left by a
killed daemon names a child that may still run (in its own session, it outlives us).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import structlog

from rollbackd.errors import ActionError

log = structlog.get_logger("rollbackd.actions")

POLL = 0.05
"""Seconds between looks at a child that is not ours (when pidfd is unavailable)."""
MARGIN = 0.2
"""Seconds before the attempt's deadline at which waiting stops, to fail with the reason."""


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), None if gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rpartition(")")[2].split()  # the name may hold spaces and parentheses
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return int(fields[19])  # field 22; fields[0] is field 3


@dataclass(frozen=True, slots=True)
class Child:
    """A command ``exec`` started for one idempotency key."""

    pid: int
    started: int
    program: str

    def alive(self) -> bool:
        """Tell whether this very process still runs (a reused pid has another start time)."""
        return start_time(self.pid) == self.started


@dataclass(frozen=True, slots=True)
class ChildNotes:
    """The notes under ``state_dir/children``, one per idempotency key."""

    directory: Path

    @classmethod
    def under(cls, state_dir: Path) -> ChildNotes:
        """The notes of a state directory; the folder is created on first use."""
        return cls(state_dir / "children")

    def path(self, key: str) -> Path:
        """The note's file for ``key`` (quoted: a key may hold any character)."""
        return self.directory / f"{quote(key, safe='')}.json"

    def prepare(self) -> None:
        """Create the folder, so a start is never followed by a failure to note it."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ActionError(
                f"cannot create {self.directory} to track exec's children: {exc.strerror}"
            ) from exc

    def record(self, key: str, child: Child) -> None:
        """Note a started child (replace-by-rename: a daemon killed now leaves a whole note).

        No fsync: a killed daemon's write is in the page cache, a crashed machine has no
        children left.
        """
        path = self.path(key)
        tmp = path.with_name(f".{path.name}.tmp")
        body = {"pid": child.pid, "start_time": child.started, "program": child.program}
        tmp.write_text(json.dumps(body) + "\n", encoding="utf-8")
        tmp.replace(path)

    def recorded(self, key: str) -> Child | None:
        """The child noted for ``key``, if any (an unreadable note is dropped)."""
        path = self.path(key)
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            return Child(int(body["pid"]), int(body["start_time"]), str(body["program"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("exec_note_unreadable", path=str(path), error=str(exc))
            self.forget(key)
            return None

    def forget(self, key: str) -> None:
        """Remove ``key``'s note (its child has exited)."""
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()


async def wait_for_earlier(notes: ChildNotes, key: str, deadline: float | None) -> None:
    """Wait until the child an earlier attempt of ``key`` started has exited.

    ``deadline`` is event-loop time; ActionError when the child still runs shortly before.
    """
    child = notes.recorded(key)
    if child is None:
        return
    if child.alive():
        log.warning("exec_waiting_for_earlier", pid=child.pid, program=child.program, key=key)
        loop = asyncio.get_running_loop()
        budget = None if deadline is None else max(0.0, deadline - loop.time() - MARGIN)
        try:
            async with asyncio.timeout(budget):
                await _exited(child)
        except TimeoutError:
            raise ActionError(
                f"{child.program}: the copy an earlier attempt started (pid {child.pid}, "
                f"in its own process group) still runs after {budget:.1f}s; not starting a "
                f"second one: it is waited for again on the next attempt (to run the step "
                f"anew now, stop it: kill -- -{child.pid})"
            ) from None
    notes.forget(key)


async def _exited(child: Child) -> None:
    """Return once ``child`` (not a child of ours, so not awaitable with wait()) has exited."""
    try:
        fd = os.pidfd_open(child.pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfd (Linux < 5.3): look now and then
        while child.alive():  # noqa: ASYNC110 -- nothing to wait on but the pid
            await asyncio.sleep(POLL)
        return
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_reader(fd, done.set)  # readable once the process has exited
    try:
        if child.alive():  # the pidfd names the noted process, not a later one with its pid
            await done.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)
