"""What a source hands the engine: one reading per series (ok, no data or error), never a raise."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from enum import StrEnum

from rollbackd.frozen import fast_init

Labels = tuple[tuple[str, str], ...]


def labels_of(mapping: dict[str, str] | None = None) -> Labels:
    """Canonical, hashable label set: sorted (name, value) pairs."""
    return tuple(sorted((mapping or {}).items()))


class ReadingStatus(StrEnum):
    """Whether a series produced a usable number."""

    OK = "ok"
    NO_DATA = "no_data"
    ERROR = "error"


@fast_init
@dataclass(frozen=True, slots=True)
class Reading:
    """One series' value as read from a source at ``at`` (unix seconds)."""

    status: ReadingStatus
    at: float
    value: float | None = None
    labels: Labels = field(default=())
    reason: str = ""


_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
"""JSON's number grammar, ASCII digits only: no ``+5``, ``9_8``, ``Infinity`` or other digits."""

EXCERPT_CHARS = 200
"""How much of a received text (a query, a topic, a payload) a reason may echo."""


def parse_number(value: object) -> float | None:
    """``value`` as a float if it is a finite JSON number or finite decimal ASCII text, else None.

    Booleans, NaN, infinities, numbers beyond the float range (``1e309``, a 400-digit
    integer), ``9_8`` and non-ASCII digits are not numbers: float() would accept most of them.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            number = float(value)
        except OverflowError:
            return None
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str) and _DECIMAL.fullmatch(value):
        number = float(value)
    else:
        return None
    return number if math.isfinite(number) else None


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to ``limit`` characters, marked with "…" when cut: what a reason may echo."""
    return text if len(text) <= limit else text[:limit] + "…"


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
