"""What actions say about an incident: ``{field}`` templates and the JSON body of alert messages.

Only the known ``{field}`` names are replaced; every other character (JSON braces included) is
sent as written, so a JSON body needs no doubled braces. Unknown names are config errors.
In a URL, each value is percent-encoded as one path segment or one query value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any
from urllib.parse import quote, quote_plus

from pydantic import AfterValidator

from rollbackd.actions import ActionContext
from rollbackd.errors import ActionError

FIELDS = (
    "monitor", "incident", "reason", "event", "idempotency_key", "mode", "environment", "percent",
)  # fmt: skip
"""The names a template may use, e.g. ``"/flags/{monitor}?key={idempotency_key}"``.

``percent`` is known only to a rollout's promotion (its ``set`` action): elsewhere a template
using it fails its step rather than send a made-up number."""

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_URL_KEEP = "!#$%&'()*+,/:;=?@[]~"
"""What the literal text of a URL template keeps as written: delimiters and its own %-escapes."""


def check_template(text: str) -> str:
    """Check that every ``{name}`` in ``text`` is a known field (a pydantic validator)."""
    unknown = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text)} - set(FIELDS))
    if unknown:
        names = ", ".join(f"{{{name}}}" for name in unknown)
        raise ValueError(f"unknown placeholder {names} (known: {', '.join(FIELDS)})")
    return text


Template = Annotated[str, AfterValidator(check_template)]
"""A string that may contain ``{field}`` placeholders, checked when the config loads."""


def check_tree(value: Any) -> Any:
    """Check every string of a table as a template (a pydantic validator)."""
    if isinstance(value, str):
        check_template(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            check_tree(item)
    elif isinstance(value, list | tuple):
        for item in value:
            check_tree(item)
    return value


TemplateTree = Annotated[Template | dict[str, Any], AfterValidator(check_tree)]
"""A template, or a table whose strings are templates (sent as JSON), checked on load."""


def fields(ctx: ActionContext) -> dict[str, str]:
    """Return the values of the template fields for this attempt."""
    incident = ctx.incident
    values = {
        "monitor": incident.monitor,
        "incident": incident.id,
        "reason": incident.reason,
        "event": str(incident.event),
        "idempotency_key": ctx.idempotency_key,
        "mode": incident.mode,
        "environment": incident.environment,
    }
    percent = incident.details.get("percent")
    if isinstance(percent, int) and not isinstance(percent, bool):
        values["percent"] = str(percent)
    # A NUL (from a series label, say) cannot travel in argv, env or a header: spell it.
    return {k: v.replace("\0", "\\0") for k, v in values.items()}


def render(text: str, values: Mapping[str, str], escape: Callable[[str], str] = str) -> str:
    """``text`` with each known ``{field}`` replaced by ``escape(value)``; the rest kept as is."""

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in values:
            return escape(values[name])
        _unknown_here(name)
        return match.group(0)

    return _PLACEHOLDER.sub(substitute, text)


def _unknown_here(name: str) -> None:
    """A known field without a value in this incident (``{percent}`` outside a rollout)."""
    if name in FIELDS:
        raise ActionError(
            f"{{{name}}} has no value here: only a rollout's promotion gives it", transient=False
        )


def path_segment(value: str) -> str:
    """``value`` as exactly one path segment: ``/`` and ``?`` encoded, ``.`` / ``..`` too."""
    if value and value.strip(".") == "":
        return "%2E" * len(value)  # quote() keeps dots, and "/../" would climb a level
    return quote(value, safe="")


def query_value(value: str) -> str:
    """``value`` as one query value: ``&``, ``=``, ``+`` and ``#`` encoded."""
    return quote_plus(value, safe="")


def render_url(text: str, values: Mapping[str, str]) -> str:
    """Render a URL template into a fully encoded URL whose shape no value can change.

    The template's own text is kept (what a URL cannot hold is percent-encoded); a value is a
    path segment before the first ``?`` and a query value after it. Send the result as already
    encoded (``yarl.URL(url, encoded=True)``): normalising it again would decode ``%2E%2E``
    and collapse ``/flags/%2E%2E/admin`` to ``/admin``.
    """
    out: list[str] = []
    pos, in_query = 0, False
    for match in _PLACEHOLDER.finditer(text):
        literal = text[pos : match.start()]
        out.append(quote(literal, safe=_URL_KEEP))
        in_query = in_query or "?" in literal or "#" in literal
        value = values.get(match.group(1))
        if value is None:
            _unknown_here(match.group(1))
            out.append(match.group(0))
        else:
            out.append(query_value(value) if in_query else path_segment(value))
        pos = match.end()
    out.append(quote(text[pos:], safe=_URL_KEEP))
    return "".join(out)


def render_tree(value: Any, values: Mapping[str, str]) -> Any:
    """Render every string inside a TOML table / list (used for JSON bodies given as tables)."""
    if isinstance(value, str):
        return render(value, values)
    if isinstance(value, Mapping):
        return {key: render_tree(item, values) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [render_tree(item, values) for item in value]
    return value


def incident_payload(ctx: ActionContext) -> dict[str, Any]:
    """Build the JSON document alert.webhook and alert.mqtt send about this attempt."""
    incident = ctx.incident
    return {
        "source": "rollbackd",
        "event": str(incident.event),
        "monitor": incident.monitor,
        "incident": incident.id,
        "reason": incident.reason,
        "mode": incident.mode,
        "environment": incident.environment,
        "started_at": incident.started_at,
        "step": ctx.step,
        "attempt": ctx.attempt,
        "idempotency_key": ctx.idempotency_key,
        "details": dict(incident.details),
    }
