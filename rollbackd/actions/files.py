"""File actions: ``flag.file`` (flagd/OpenFeature JSON or YAML) and ``route.file`` (KEY=VALUE).

Both change only what they must and rewrite their file atomically with ``atomic_write``, so
a reader never sees half a file and keeps its access. Their blocking file I/O runs on a
small pool each action owns, and never opens what is not a regular file, so a FIFO or a
hung mount cannot stall anything else.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field, field_validator

from rollbackd.actions import ActionContext, ActionType, OptionsAction, OptionsT, flagdoc
from rollbackd.actions.envfile import KEY, set_env_value
from rollbackd.actions.templates import Template, fields, render
from rollbackd.actions.workers import BlockingPool
from rollbackd.atomic import (
    AccessNotKeptError,
    NotRegularFileError,
    atomic_write,
    require_regular,
)
from rollbackd.errors import ActionError
from rollbackd.options import Frozen

MAX_BYTES = 16 * 1024 * 1024
"""Larger files are refused: no flag or env file is that big, a wrong path may be."""

_path_locks: dict[Path, threading.Lock] = {}
_path_locks_guard = threading.Lock()

Change = Callable[[str | None], tuple[str, str]]
"""The old text (None if missing) -> (new text, detail)."""


def _lock_for(path: Path) -> threading.Lock:
    """One lock per file, so two actions editing the same file never lose each other's edit."""
    key = Path(os.path.realpath(path))
    with _path_locks_guard:
        return _path_locks.setdefault(key, threading.Lock())


def read_regular(path: Path) -> str | None:
    """The UTF-8 text of ``path``, None if missing; ActionError if it is not a regular file.

    Nothing that could block is opened: the kind is checked before opening (a FIFO or a
    device is never opened) and again on the open descriptor, opened non-blocking.
    """
    try:
        require_regular(path, path.stat())
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except NotRegularFileError as exc:
        raise ActionError(str(exc.strerror)) from exc
    except OSError as exc:
        raise ActionError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        require_regular(path, st)  # replaced between the check and the open
        if st.st_size > MAX_BYTES:
            raise ActionError(f"{path} is {st.st_size} bytes, more than a flag or env file holds")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except NotRegularFileError as exc:
        raise ActionError(str(exc.strerror)) from exc
    except OSError as exc:
        raise ActionError(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ActionError(f"cannot read {path}: not UTF-8 text ({exc})") from exc


def edit_file(path: Path, change: Change, deadline: float | None) -> str:
    """Read ``path``, apply ``change``, write atomically if the text changed; the detail.

    ``deadline`` (``time.monotonic()``) bounds the wait for another edit of the same file.
    Blocking: runs on the action's pool.
    """
    lock = _lock_for(path)
    wait = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
    if not lock.acquire(timeout=wait):
        raise ActionError(
            f"{path} is being edited by another action whose edit has not finished (the file "
            "system may be hung): check the file, the step was not applied"
        )
    try:
        old = read_regular(path)
        new, detail = change(old)
        if new != old:
            try:
                atomic_write(path, new.encode("utf-8"))
            except AccessNotKeptError as exc:
                raise ActionError(f"{path} left unchanged: {exc.strerror}") from exc
            except NotRegularFileError as exc:
                raise ActionError(str(exc.strerror)) from exc
            except OSError as exc:
                raise ActionError(
                    f"cannot write {path}: {exc.strerror or exc} (rollbackd's user needs write "
                    f"access to the directory {path.parent})"
                ) from exc
        return detail
    finally:
        lock.release()


@dataclass(slots=True)
class FileEditAction(OptionsAction[OptionsT]):
    """An action that edits one file on a one-thread pool of its own (closed by ``aclose``)."""

    pool: BlockingPool = field(init=False)

    def __post_init__(self) -> None:
        self.pool = BlockingPool(f"action {self.name}")

    async def edit(self, ctx: ActionContext, path: Path, change: Change, *, create: bool) -> str:
        """Apply ``change`` to ``path`` within the attempt's deadline."""
        deadline = None
        if ctx.deadline is not None:
            deadline = time.monotonic() + ctx.deadline - asyncio.get_running_loop().time()

        def work() -> str:
            if create and not path.parent.is_dir():
                raise ActionError(f"directory {path.parent} of {path} does not exist")
            return edit_file(path, change, deadline)

        return await self.pool.run(f"edit of {path}", work)

    async def aclose(self) -> None:
        """Let the pool's thread end (one stuck in the kernel stays until it returns)."""
        self.pool.close()


# --- flag.file ---------------------------------------------------------------------------


class FlagFileOptions(Frozen):
    """``flag.file``: set a flagd/OpenFeature flag's ``defaultVariant`` in a flag file.

    A ``.yaml`` / ``.yml`` path is read as YAML, anything else as JSON.
    """

    path: Path
    flag: str = Field(min_length=1)
    variant: str = Field(min_length=1)


@dataclass(slots=True)
class FlagFileAction(FileEditAction[FlagFileOptions]):
    """Switches one flag's default variant in a flagd flag file."""

    async def run(self, ctx: ActionContext) -> str:
        """Set the variant (a no-op if already set, so a repeated attempt changes nothing)."""
        o = self.options
        return await self.edit(
            ctx,
            o.path,
            lambda text: flagdoc.set_default_variant(text, o.path, o.flag, o.variant),
            create=False,
        )


def verify_flag_file(options: FlagFileOptions) -> Iterator[str]:
    """``check-config``: the flag file, if it exists, defines the flag and the variant."""
    try:
        text = read_regular(options.path)
        document = None if text is None else flagdoc.parse(text, options.path)
    except ActionError as exc:
        yield f"path: {exc}"
        return
    if text is not None:  # a missing file may be created before any rollback
        found = flagdoc.problem(document, options.path, options.flag, options.variant)
        if found is not None:
            yield f"{found[0]}: {found[1]}"


# --- route.file --------------------------------------------------------------------------


class RouteFileOptions(Frozen):
    """``route.file``: set ``KEY=VALUE`` in an env-style file (systemd ``EnvironmentFile=``)."""

    path: Path
    key: str
    value: Template
    """The value, e.g. ``"0"``, or ``"{percent}"`` for a rollout's ``set``."""

    @field_validator("key")
    @classmethod
    def _valid_key(cls, key: str) -> str:
        if not KEY.fullmatch(key):
            raise ValueError(f"{key!r} is not a variable name (letters, digits, _)")
        return key

    @field_validator("value")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if "\n" in value or "\r" in value:
            raise ValueError("the value must be a single line")
        return value


@dataclass(slots=True)
class RouteFileAction(FileEditAction[RouteFileOptions]):
    """Sets one variable in an env-style file, keeping every other line and comment."""

    async def run(self, ctx: ActionContext) -> str:
        """Write ``KEY=VALUE`` (a no-op if already so); the file is created if missing."""
        o = self.options
        value = render(o.value, fields(ctx))
        return await self.edit(
            ctx, o.path, lambda text: set_env_value(text, o.path, o.key, value), create=True
        )


FLAG_FILE = ActionType(options=FlagFileOptions, build=FlagFileAction, verify=verify_flag_file)
ROUTE_FILE = ActionType(options=RouteFileOptions, build=RouteFileAction)
