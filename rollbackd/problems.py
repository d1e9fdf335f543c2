"""How a configuration problem is written: ``FILE: dotted.key: reason``, one line each."""

from __future__ import annotations

import json
import re

from pydantic import ValidationError

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def lines(where: str, exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[str]:
    """One ``FILE: dotted.key: reason`` line per error of a pydantic validation."""
    found = []
    for err in exc.errors():
        loc = (*prefix, *err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        found.append(f"{where}: {dotted(loc) or '(top level)'}: {message}")
    return found


def dotted(loc: tuple[str | int, ...]) -> str:
    """``("monitors", "payments", "rules", 2, "above")`` -> ``monitors.payments.rules[2].above``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if _BARE_KEY.fullmatch(part) else json.dumps(part)  # TOML's quoting
            out += f".{key}" if out else key
    return out
