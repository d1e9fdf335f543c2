"""Local actions: ``alert.log`` (a structlog event) and ``exec`` (a command, no shell).

``exec`` runs an argv list in its own process group with the configured environment; its
output is captured (bounded) into the detail, and a cancelled attempt kills the whole group.
Each started command is noted in the state directory (``children.py``): a daemon killed
while it ran does not start a second copy at restart while the first one lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
from pydantic import Field, field_validator

from rollbackd.actions import ActionContext, ActionType, OptionsAction
from rollbackd.actions.children import Child, ChildNotes, start_time, wait_for_earlier
from rollbackd.actions.templates import Template, fields, render
from rollbackd.errors import ActionError, SecretError
from rollbackd.options import Frozen, SecretRef

log = structlog.get_logger("rollbackd.actions")

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_CHUNK = 4096

# --- alert.log -----------------------------------------------------------------------------


class AlertLogOptions(Frozen):
    """``alert.log``: write one ``incident_alert`` event to rollbackd's own log."""

    level: Literal["info", "warning", "error", "critical"] = "warning"
    message: Template = "{event} on {monitor}: {reason}"


@dataclass(slots=True)
class AlertLogAction(OptionsAction[AlertLogOptions]):
    """Logs the incident; journald / the log shipper carries it on."""

    async def run(self, ctx: ActionContext) -> str:
        """Log the incident at the configured level."""
        incident = ctx.incident
        message = render(self.options.message, fields(ctx))
        emit = getattr(log, self.options.level)
        emit(
            "incident_alert",
            action=self.name,
            message=message,
            monitor=incident.monitor,
            incident=incident.id,
            alert_event=str(incident.event),
            mode=incident.mode,
            environment=incident.environment,
            reason=incident.reason,
        )
        return f"logged at {self.options.level}: {message}"


# --- exec ----------------------------------------------------------------------------------


class ExecOptions(Frozen):
    """``exec``: run ``argv`` (no shell); ``{field}`` templates allowed in the arguments."""

    argv: list[Template] = Field(min_length=1)
    env: dict[str, str | SecretRef] = Field(default_factory=dict)
    """Extra environment; values may be secret references, revealed only for the child."""
    inherit_env: bool = False
    """Pass rollbackd's whole environment on (by default only PATH, LANG and ``env``)."""
    cwd: Path | None = None
    output_limit: int = Field(default=1000, ge=0, le=100_000)
    """Characters of output (the tail, stdout and stderr together) kept in the detail."""

    @field_validator("argv")
    @classmethod
    def _program(cls, argv: list[str]) -> list[str]:
        if not argv[0]:
            raise ValueError("argv[0] (the program) must not be empty")
        return argv


def child_env(options: ExecOptions, ctx: ActionContext) -> dict[str, str]:
    """Build the child's environment: base, configured values, then the incident's fields."""
    if options.inherit_env:
        env = dict(os.environ)
    else:
        env = {"PATH": os.environ.get("PATH", DEFAULT_PATH)}
        for key in ("LANG", "LC_ALL", "TZ"):
            if key in os.environ:
                env[key] = os.environ[key]
    for key, value in options.env.items():
        try:
            env[key] = value.reveal() if isinstance(value, SecretRef) else value
        except SecretError as exc:
            raise ActionError(f"env {key}: {exc}") from exc
    for key, value in fields(ctx).items():
        env[f"ROLLBACKD_{key.upper()}"] = value
    env["ROLLBACKD_STEP"] = str(ctx.step)
    env["ROLLBACKD_ATTEMPT"] = str(ctx.attempt)
    return env


def _tail(output: bytes, limit: int) -> str:
    text = output.decode("utf-8", "replace").strip()
    if len(text) <= limit:
        return text
    return "..." + text[len(text) - limit :] if limit else ""


@dataclass(slots=True)
class ExecAction(OptionsAction[ExecOptions]):
    """Runs one command per attempt (which owns its process); exit status 0 is success."""

    async def run(self, ctx: ActionContext) -> str:
        """Run the command to completion; cancellation (the step's timeout) kills its group.

        With a state directory, a copy an earlier attempt of the same step started (before a
        daemon crash) is waited for first: never two at once.
        """
        o = self.options
        values = fields(ctx)
        argv = [render(arg, values) for arg in o.argv]
        notes = None if ctx.state_dir is None else ChildNotes.under(ctx.state_dir)
        if notes is not None:
            notes.prepare()
            await wait_for_earlier(notes, ctx.idempotency_key, ctx.deadline)
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=child_env(o, ctx),
                cwd=o.cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise ActionError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        try:
            if notes is not None:
                _note(notes, ctx.idempotency_key, process.pid, argv[0])
            output = await _read_tail(process, max(o.output_limit * 4, _CHUNK))
            code = await process.wait()
        except BaseException:
            await _kill(process)
            raise
        finally:
            if notes is not None:  # the child has exited (or was killed and reaped)
                notes.forget(ctx.idempotency_key)
        shown = _tail(output, o.output_limit)
        if code != 0:
            status = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            raise ActionError(f"{argv[0]}: {status}" + (f": {shown}" if shown else ""))
        return f"{argv[0]}: exit status 0" + (f": {shown}" if shown else "")


def _note(notes: ChildNotes, key: str, pid: int, program: str) -> None:
    """Note the child just started; a child that cannot be tracked is not left running."""
    started = start_time(pid)
    if started is None:
        return  # already exited: nothing a restart could collide with
    try:
        notes.record(key, Child(pid, started, program))
    except OSError as exc:
        raise ActionError(
            f"{program}: stopped, because it could not be noted in {notes.directory} "
            f"({exc.strerror}); a restart could otherwise run it twice: make the state "
            "directory writable"
        ) from exc


async def _read_tail(process: asyncio.subprocess.Process, keep: int) -> bytes:
    """Read the child's output to the end, keeping only the last ``keep`` bytes."""
    assert process.stdout is not None
    buffer = bytearray()
    while chunk := await process.stdout.read(_CHUNK):
        buffer += chunk
        if len(buffer) > keep:
            del buffer[: len(buffer) - keep]
    return bytes(buffer)


async def _kill(process: asyncio.subprocess.Process) -> None:
    """Kill the child's process group and reap it, shielded so a second cancel cannot skip it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the group: children it started die with it
        log.warning("exec_killed", pid=process.pid)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.shield(process.wait())


ALERT_LOG = ActionType(options=AlertLogOptions, build=AlertLogAction, resolves=True)
EXEC = ActionType(options=ExecOptions, build=ExecAction)
