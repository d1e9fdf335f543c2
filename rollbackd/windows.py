"""When a rollout may promote: windows (local wall time, DST-aware) and freezes.

Pure: instants are Unix seconds passed in. ``config`` checks them on load; ``rollouts``
asks ``blocked`` before setting a percentage.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(
    r"(?P<days>\S+)\s+(?P<start>\d{1,2}:\d{2})-(?P<end>\d{1,2}:\d{2})(?:\s+(?P<tz>\S+))?"
)
_CLOCK = re.compile(r"(\d{1,2}):(\d{2})")


@dataclass(frozen=True, slots=True)
class Window:
    """``Mon-Thu 09:00-16:00 Europe/Berlin``: when promotion is allowed, in local wall time.

    ``start``/``end`` are minutes after local midnight; an ``end`` before ``start`` spans
    midnight (the window belongs to the day it opens). Local wall time is compared, so a
    daylight saving change moves the UTC instants with it: a time that does not exist that
    day (spring forward) opens the window at the first local time after it, and a time that
    occurs twice (fall back) is inside the window both times.
    """

    text: str
    days: frozenset[int]
    """Weekdays the window opens on, Monday = 0."""
    start: int
    end: int
    zone: str

    def open_at(self, now: float) -> bool:
        """Whether the instant ``now`` (Unix seconds) lies inside the window."""
        local = dt.datetime.fromtimestamp(now, ZoneInfo(self.zone))
        minute = local.hour * 60 + local.minute
        day = local.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # Spans midnight: the evening part of an opening day, or the morning after one.
        return (day in self.days and minute >= self.start) or (
            (day - 1) % 7 in self.days and minute < self.end
        )


def parse_window(text: str) -> Window:
    """Parse ``DAYS HH:MM-HH:MM [ZONE]``; ValueError says what is wrong.

    DAYS: ``Mon-Thu``, ``Mon,Wed,Fri``, ``Mon-Wed,Sat``, ``Fri-Mon`` (wraps) or ``*``;
    ZONE: an IANA time zone (default ``UTC``).
    """
    match = _WINDOW.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f'{text!r} is not a window: write DAYS HH:MM-HH:MM [ZONE], e.g. "Mon-Thu 09:00-16:00 '
            'Europe/Berlin"'
        )
    days = _days(match["days"])
    start, end = _minutes(match["start"]), _minutes(match["end"])
    if start == end:
        raise ValueError(f"{text!r}: the window opens and closes at the same time")
    if start == 24 * 60:
        raise ValueError(f"{text!r}: a window cannot open at 24:00")
    zone = match["tz"] or "UTC"
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"{text!r}: unknown time zone {zone!r} (use an IANA name)") from exc
    return Window(text, days, start, end, zone)


def _days(text: str) -> frozenset[int]:
    if text == "*":
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        a, b = _day(first), _day(last or first)
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


def _day(text: str) -> int:
    key = text.strip().lower()[:3]
    if key not in DAYS or len(text.strip()) < 3:
        raise ValueError(f"{text!r} is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun)")
    return DAYS.index(key)


def _minutes(text: str) -> int:
    match = _CLOCK.fullmatch(text)
    hours, minutes = (int(match[1]), int(match[2])) if match else (99, 99)
    if minutes > 59 or hours > 24 or (hours == 24 and minutes):
        raise ValueError(f"{text!r} is not a time of day (00:00 to 24:00)")
    return hours * 60 + minutes


@dataclass(frozen=True, slots=True)
class Freeze:
    """A period in which nothing is promoted: ``[start, end)`` in Unix seconds."""

    start: float
    end: float

    def active_at(self, now: float) -> bool:
        """Whether ``now`` lies inside the freeze."""
        return self.start <= now < self.end


def parse_instant(value: object) -> dt.datetime:
    """An RFC 3339 date-time with its offset (a string, or a TOML offset date-time)."""
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(
                f"{value!r} is not an RFC 3339 date-time (e.g. 2026-12-20T00:00:00+01:00)"
            ) from exc
    if not isinstance(value, dt.datetime):
        raise ValueError(  # noqa: TRY004 -- pydantic reports ValueError as the key's problem
            "give an RFC 3339 date-time string, e.g. 2026-12-20T00:00:00+01:00"
        )
    if value.tzinfo is None:
        raise ValueError(f"{value.isoformat()} has no offset: add one, e.g. +01:00 or Z")
    return value


def blocked(windows: Sequence[Window], freezes: Sequence[Freeze], now: float) -> str | None:
    """Why a promotion may not happen at ``now`` (a freeze, outside every window), or None."""
    for freeze in freezes:
        if freeze.active_at(now):
            until = dt.datetime.fromtimestamp(freeze.end, dt.UTC).isoformat()
            return f"frozen until {until}"
    if windows and not any(window.open_at(now) for window in windows):
        return "outside the promotion windows (" + "; ".join(w.text for w in windows) + ")"
    return None
