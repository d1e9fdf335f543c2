"""What a source hands the engine: one reading per series (ok, no data or error), never a raise."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

Labels = tuple[tuple[str, str], ...]


def labels_of(mapping: dict[str, str] | None = None) -> Labels:
    """Canonical, hashable label set: sorted (name, value) pairs."""
    return tuple(sorted((mapping or {}).items()))


class ReadingStatus(StrEnum):
    """Whether a series produced a usable number."""

    OK = "ok"
    NO_DATA = "no_data"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Reading:
    """One series' value as read from a source at ``at`` (unix seconds)."""

    status: ReadingStatus
    at: float
    value: float | None = None
    labels: Labels = field(default=())
    reason: str = ""


def parse_number(value: object) -> float | None:
    """``value`` as a float if it is a number or a numeric string (JSON booleans are not)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def ok(value: float, at: float, labels: Labels = ()) -> Reading:
    """A series with a value; NaN is not a value, so it reads as no data with a reason."""
    if math.isnan(value):
        return Reading(ReadingStatus.NO_DATA, at, None, labels, "value is NaN")
    return Reading(ReadingStatus.OK, at, value, labels)


def no_data(reason: str, at: float, labels: Labels = ()) -> Reading:
    """The source answered, but with nothing usable for this rule."""
    return Reading(ReadingStatus.NO_DATA, at, None, labels, reason)


def error(reason: str, at: float, labels: Labels = ()) -> Reading:
    """The source failed (unreachable, timeout, bad payload)."""
    return Reading(ReadingStatus.ERROR, at, None, labels, reason)


def format_value(value: float) -> str:
    """Format a value as people read it: ``1.0``, ``2.5``, ``0.3``, ``+Inf``."""
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    if value.is_integer() and abs(value) < 1e15:  # beyond this, exponents read better
        return f"{value:.1f}"
    return f"{value:.6g}"


def labels_text(labels: Labels) -> str:
    """``{region="eu",service="pay"}``, or ``""`` for a series without labels."""
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"
