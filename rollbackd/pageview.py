"""What the operator page shows: views built from the /status document and check history.

Pure; the templates (``pagetemplates``) turn these views into HTML, and the filters here
format values for them.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

from rollbackd.engine import Check
from rollbackd.readings import format_value, labels_text
from rollbackd.records import IncidentRecord
from rollbackd.sparkline import Point, Sparkline, draw

SECTIONS = ("summary", "monitors", "rollouts", "incidents")
"""The parts of ``/`` that the page's script replaces when it polls (``data-section``)."""
INCIDENT_SECTIONS = ("incident",)
MAX_SERIES = 20
"""Series of one rule drawn on the page; the rest are counted (``rollbackd status`` lists all)."""

CONTROLS = {
    "rearm": "/rearm/{}",
    "approve": "/approve/{}",
    "retry": "/retry/{}",
    "pause": "/rollouts/{}/pause",
    "resume": "/rollouts/{}/resume",
}
"""The token-guarded POST each button of the page sends (the API's own endpoints)."""


@dataclass(frozen=True, slots=True)
class SeriesView:
    """One series of one rule: latest value against the threshold, and its sparkline."""

    labels: str
    value: str
    verdict: str
    threshold: str
    reason: str
    spark: Sparkline | None


@dataclass(frozen=True, slots=True)
class RuleView:
    """One rule of a monitor, with its series (at most ``MAX_SERIES``)."""

    name: str
    series: list[SeriesView] = field(default_factory=list)
    more: int = 0
    shadow: bool = False


# --- the main page ----------------------------------------------------------------------


def index_context(
    status: Mapping[str, Any] | None,
    history: Mapping[str, Sequence[Check]],
    *,
    slots: int,
    now: float,
) -> dict[str, Any]:
    """What ``index.html`` and its sections need; ``status`` None: locked (token needed)."""
    if status is None:
        return {"locked": True, "now": now}
    monitors = status.get("monitors", {})
    return {
        "locked": False,
        "now": now,
        "status": status,
        "monitors": [
            _monitor(name, monitors[name], history.get(name, ()), slots) for name in monitors
        ],
        "rollouts": _rollouts(status.get("rollouts")),
        "waiting": status.get("waiting", []),
        "incidents": status.get("incidents", []),
    }


def _monitor(
    name: str, part: Mapping[str, Any], checks: Sequence[Check], slots: int
) -> dict[str, Any]:
    shadow = set(part.get("shadow_rules", ()))
    rules = []
    series_of = _series_history(checks)
    for rule, items in part.get("rules", {}).items():
        views = [_series(rule, item, series_of, slots) for item in items[:MAX_SERIES]]
        rules.append(RuleView(rule, views, max(0, len(items) - MAX_SERIES), rule in shadow))
    return {"name": name, "part": part, "rules": rules}


def _series_history(checks: Sequence[Check]) -> dict[tuple[str, str], list[Point]]:
    """Per (rule, series), one point per check of ``checks`` (None where it had no value)."""
    points: dict[tuple[str, str], list[Point]] = {}
    for index, check in enumerate(checks):
        for result in check.results:
            key = (result.rule, labels_text(result.labels))
            line = points.setdefault(key, [])
            line.extend([Point(None)] * (index - len(line)))  # absent from earlier checks
            if len(line) == index:  # a series appears once per check; a repeat is ignored
                line.append(Point(result.value, breach=result.verdict == "breach"))
    for line in points.values():
        line.extend([Point(None)] * (len(checks) - len(line)))
    return points


def _series(
    rule: str,
    item: Mapping[str, Any],
    history: Mapping[tuple[str, str], list[Point]],
    slots: int,
) -> SeriesView:
    labels = labels_text(tuple(sorted(item.get("labels", {}).items())))
    unit = str(item.get("unit") or "")
    threshold = _float(item.get("threshold"))
    direction: Literal["above", "below"] = "above" if item.get("direction") == "above" else "below"
    side = ">" if direction == "above" else "<"
    points = history.get((rule, labels), [])
    spark = None
    if threshold is not None and any(p.value is not None for p in points):
        latest = number(_float(item.get("value")), unit)
        spark = draw(
            points,
            threshold,
            direction,
            slots=slots,
            title=f"{rule}{labels}: last {len(points)} checks, now {latest}, "
            f"breach if {side} {number(threshold, unit)}",
        )
    return SeriesView(
        labels=labels,
        value=number(_float(item.get("value")), unit),
        verdict=str(item.get("verdict", "")),
        threshold=f"breach if {side} {number(threshold, unit)}",
        reason=str(item.get("reason") or ""),
        spark=spark,
    )


def _rollouts(raw: object) -> list[dict[str, Any]]:
    """The rollouts of /status (once rollouts exist), each with its other keys kept apart."""
    if not isinstance(raw, Mapping):
        return []
    known = {"percent", "step", "state", "hold_remaining_s"}
    views = []
    for name, part in raw.items():
        if not isinstance(part, Mapping):
            continue
        percent = _float(part.get("percent"))
        views.append(
            {
                "name": str(name),
                "state": str(part.get("state", "")),
                "step": part.get("step"),
                "percent": None if percent is None else max(0.0, min(percent, 100.0)),
                "hold_remaining_s": _float(part.get("hold_remaining_s")),
                "other": {k: v for k, v in part.items() if k not in known},
            }
        )
    return views


# --- one incident -------------------------------------------------------------------------


def incident_document(record: IncidentRecord) -> dict[str, Any]:
    """An incident as the page shows it: the stored record, steps with results and times."""
    return {
        "id": record.id,
        "monitor": record.monitor,
        "event": str(record.event),
        "reason": record.reason,
        "mode": record.mode,
        "opened_at": record.opened_at,
        "finished_at": record.finished_at,
        "waiting": record.waiting,
        "approved_at": record.approved_at,
        "details": record.details,
        "steps": [{**step.document(), "status": str(step.status)} for step in record.steps],
    }


def incident_context(
    incident: Mapping[str, Any] | None, incident_id: str, *, locked: bool, now: float
) -> dict[str, Any]:
    """What ``incident.html`` needs: the record, its trigger and the checks behind it."""
    if locked or incident is None:
        return {"locked": locked, "now": now, "id": incident_id, "incident": None}
    details = dict(incident.get("details") or {})
    trigger = details.pop("trigger", None)
    checks = details.pop("checks", None)
    return {
        "locked": False,
        "now": now,
        "id": incident_id,
        "incident": incident,
        "trigger": trigger if isinstance(trigger, Mapping) else None,
        "checks": checks if isinstance(checks, list) else [],
        "details": details,
        "failed": any(s.get("status") == "failed" for s in incident.get("steps", [])),
    }


# --- filters --------------------------------------------------------------------------


def when(epoch: object) -> str:
    """``2026-11-29 08:01:02Z`` (UTC), or ``never``."""
    value = _float(epoch)
    if value is None or not math.isfinite(value):
        return "never"
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def number(value: object, unit: str = "") -> str:
    """A value as people read it, with its unit; ``-`` for none."""
    parsed = _float(value)
    if parsed is None:
        return "-"
    return f"{format_value(parsed)}{unit}"


def duration(seconds: object) -> str:
    """``1h 02m``, ``3m 05s``, ``12s``; ``-`` for none."""
    value = _float(seconds)
    if value is None or not math.isfinite(value):
        return "-"
    total = max(0, round(value))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def took(seconds: object) -> str:
    """A step's run time: ``0.003 s``, ``10.1 s``, ``2m 05s``; empty for none."""
    value = _float(seconds)
    if value is None or not math.isfinite(value):
        return ""
    if value >= 60:
        return duration(value)
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def segment(value: object) -> str:
    """``value`` as one URL path segment (a ``/`` in it stays inside the segment)."""
    return quote(str(value), safe="")


def control(kind: str, subject: object) -> str:
    """The path of the POST behind a button (``rearm`` of ``payments``: ``/rearm/payments``)."""
    return CONTROLS[kind].format(segment(subject))


def pretty(value: object) -> str:
    """Indented JSON of a detail (escaped by the template like any text)."""
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def label_set(labels: object) -> str:
    """``{region="eu"}`` of a labels object from a stored check (empty for none)."""
    if not isinstance(labels, Mapping):
        return ""
    return labels_text(tuple(sorted((str(k), str(v)) for k, v in labels.items())))


def counted(value: object, word: str) -> str:
    """``1 check``, ``3 checks``."""
    return f"{value} {word}" if value == 1 else f"{value} {word}s"


def _float(value: object) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):  # strict JSON spells infinities as strings
        return {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(value)
    return None
