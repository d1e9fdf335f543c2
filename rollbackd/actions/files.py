"""File actions: ``flag.file`` (flagd/OpenFeature JSON) and ``route.file`` (env-style KEY=VALUE).

Both rewrite their file atomically with ``atomic_write``, so a reader never sees half a file.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from rollbackd.actions import ActionContext, ActionType, OptionsAction
from rollbackd.atomic import atomic_write
from rollbackd.errors import ActionError
from rollbackd.options import Frozen

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_./:@%+,=-]*")

_path_locks: dict[Path, threading.Lock] = {}
_path_locks_guard = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    """One lock per file, so two actions editing the same file never lose each other's edit."""
    key = Path(os.path.realpath(path))
    with _path_locks_guard:
        return _path_locks.setdefault(key, threading.Lock())


async def _edit(path: Path, change: Callable[[str | None], tuple[str, str]]) -> str:
    """Read ``path`` (None if missing), apply ``change`` -> (text, detail), write atomically."""

    def work() -> str:
        with _lock_for(path):
            try:
                old: str | None = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                old = None
            except (OSError, UnicodeDecodeError) as exc:
                raise ActionError(f"cannot read {path}: {exc}") from exc
            new, detail = change(old)
            if new != old:
                try:
                    atomic_write(path, new.encode("utf-8"))
                except OSError as exc:
                    raise ActionError(f"cannot write {path}: {exc}") from exc
            return detail

    return await asyncio.to_thread(work)


# --- flag.file ---------------------------------------------------------------------------


class FlagFileOptions(Frozen):
    """``flag.file``: set a flagd/OpenFeature flag's ``defaultVariant`` in a flag file."""

    path: Path
    flag: str = Field(min_length=1)
    variant: str = Field(min_length=1)


def set_default_variant(text: str | None, path: Path, flag: str, variant: str) -> tuple[str, str]:
    """Return the flag file ``text`` with ``flag``'s defaultVariant set, and a detail."""
    if text is None:
        raise ActionError(f"flag file {path} does not exist")
    try:
        document: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ActionError(f"flag file {path} is not valid JSON: {exc}") from exc
    flags = document.get("flags") if isinstance(document, dict) else None
    if not isinstance(flags, dict):
        raise ActionError(f'flag file {path} has no "flags" object')
    definition = flags.get(flag)
    if not isinstance(definition, dict):
        known = ", ".join(sorted(flags)) or "none"
        raise ActionError(f"flag {flag!r} is not defined in {path} (flags: {known})")
    variants = definition.get("variants")
    if not isinstance(variants, dict) or variant not in variants:
        known = ", ".join(sorted(variants)) if isinstance(variants, dict) else "none"
        raise ActionError(f"flag {flag!r} in {path} has no variant {variant!r} (variants: {known})")
    before = definition.get("defaultVariant")
    if before == variant:
        return text, f"flag {flag} already {variant!r} in {path}"
    definition["defaultVariant"] = variant
    new = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    return new, f"flag {flag}: {before!r} -> {variant!r} in {path}"


@dataclass(slots=True)
class FlagFileAction(OptionsAction[FlagFileOptions]):
    """Switches one flag's default variant in a flagd flag file."""

    async def run(self, ctx: ActionContext) -> str:
        """Set the variant (a no-op if already set, so a repeated attempt changes nothing)."""
        o = self.options
        return await _edit(
            o.path, lambda text: set_default_variant(text, o.path, o.flag, o.variant)
        )


# --- route.file --------------------------------------------------------------------------


class RouteFileOptions(Frozen):
    """``route.file``: set ``KEY=VALUE`` in an env-style file (systemd ``EnvironmentFile=``)."""

    path: Path
    key: str
    value: str

    @field_validator("key")
    @classmethod
    def _valid_key(cls, key: str) -> str:
        if not _KEY.fullmatch(key):
            raise ValueError(f"{key!r} is not a variable name (letters, digits, _)")
        return key

    @field_validator("value")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if "\n" in value or "\r" in value:
            raise ValueError("the value must be a single line")
        return value


def _quote(value: str) -> str:
    if _PLAIN_VALUE.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def set_env_value(text: str | None, path: Path, key: str, value: str) -> tuple[str, str]:
    """Return the env file ``text`` with every ``KEY=`` line set (appended if missing)."""
    line_re = re.compile(rf"^(\s*)(export\s+)?{re.escape(key)}\s*=.*?(\r?\n)?\Z")
    wanted = f"{key}={_quote(value)}"
    lines = (text or "").splitlines(keepends=True)
    found = False
    for i, line in enumerate(lines):
        match = line_re.match(line)
        if match:
            found = True
            lines[i] = f"{match.group(1)}{match.group(2) or ''}{wanted}{match.group(3) or ''}"
    if not found:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(wanted + "\n")
    new = "".join(lines)
    if new == text:
        return new, f"{key} already {value!r} in {path}"
    verb = "created" if text is None else "set"
    return new, f"{key}={value} {verb} in {path}"


@dataclass(slots=True)
class RouteFileAction(OptionsAction[RouteFileOptions]):
    """Sets one variable in an env-style file, keeping every other line and comment."""

    async def run(self, ctx: ActionContext) -> str:
        """Write ``KEY=VALUE`` (a no-op if already so); the file is created if missing."""
        o = self.options
        if not o.path.parent.is_dir():
            raise ActionError(f"directory {o.path.parent} of {o.path} does not exist")
        return await _edit(o.path, lambda text: set_env_value(text, o.path, o.key, o.value))


FLAG_FILE = ActionType(options=FlagFileOptions, build=FlagFileAction)
ROUTE_FILE = ActionType(options=RouteFileOptions, build=RouteFileAction)
