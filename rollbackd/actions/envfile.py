"""Env-style files (systemd ``EnvironmentFile=``): set one ``KEY=VALUE``, keep every other line.

Only the key's own line changes; a line that already holds the value (however quoted) is
left as it is, so a repeated rollback changes nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_./:@%+,=-]*")
_DOUBLE_ESCAPE = re.compile(r"\\(.)")


def quote(value: str) -> str:
    """``value`` as written after ``KEY=``: bare when safe, else double-quoted and escaped."""
    if _PLAIN_VALUE.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def unquote(written: str) -> str:
    """The value a reader gets from what follows ``KEY=`` (quotes removed, escapes undone)."""
    text = written.strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1]
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return _DOUBLE_ESCAPE.sub(r"\1", text[1:-1])
    return text


def set_env_value(text: str | None, path: Path, key: str, value: str) -> tuple[str, str]:
    """Return the env file ``text`` with every ``KEY=`` line set (appended if missing)."""
    line_re = re.compile(rf"^(\s*)(export\s+)?{re.escape(key)}\s*=(.*?)(\r?\n)?\Z")
    wanted = f"{key}={quote(value)}"
    lines = (text or "").splitlines(keepends=True)
    found = False
    for i, line in enumerate(lines):
        match = line_re.match(line)
        if match:
            found = True
            if unquote(match.group(3)) != value:
                lines[i] = f"{match.group(1)}{match.group(2) or ''}{wanted}{match.group(4) or ''}"
    if not found:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(wanted + "\n")
    new = "".join(lines)
    if new == text:
        return new, f"{key} already {value!r} in {path}"
    verb = "created" if text is None else "set"
    return new, f"{key}={value} {verb} in {path}"
