"""Sparklines for the operator page: one series' recent values against its threshold, as SVG.

Pure: numbers in, drawing instructions out (the template writes the SVG elements).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

WIDTH = 160.0
HEIGHT = 36.0
PAD = 3.0
MAX_POINTS = 240
"""More checks than this are drawn as this many buckets, each its value worst for the rule."""


@dataclass(frozen=True, slots=True)
class Point:
    """One check's value of the series (``value`` None: no usable value at that check)."""

    value: float | None
    breach: bool = False


@dataclass(frozen=True, slots=True)
class Sparkline:
    """What the template draws: a path, the threshold line, the breach zone and marks."""

    path: str
    """SVG path data (``M x y L x y ...``); a gap where a check had no value."""
    threshold_y: float
    zone_y: float
    """The breach zone is the band between ``zone_y`` and ``zone_y + zone_height``."""
    zone_height: float
    breaches: tuple[tuple[float, float], ...]
    last: tuple[float, float] | None
    """The newest point drawn, or None when no check had a value."""
    title: str
    width: float = WIDTH
    height: float = HEIGHT


def draw(
    points: Sequence[Point],
    threshold: float,
    direction: Literal["above", "below"],
    *,
    slots: int,
    title: str,
) -> Sparkline:
    """Lay ``points`` (oldest first) over ``slots`` places, newest at the right edge.

    The vertical scale spans the values and the threshold, so the distance between the line
    and the threshold reads as how close the rule is to breaching.
    """
    points = bucketed(points, direction)
    slots = max(min(slots, MAX_POINTS), len(points), 2)
    finite = [p.value for p in points if p.value is not None and math.isfinite(p.value)]
    low, high = _span([*finite, threshold] if math.isfinite(threshold) else finite)
    step = (WIDTH - 2 * PAD) / (slots - 1)

    def y(value: float) -> float:
        clamped = min(max(value, low), high)
        return round(HEIGHT - PAD - (clamped - low) / (high - low) * (HEIGHT - 2 * PAD), 2)

    commands: list[str] = []
    breaches: list[tuple[float, float]] = []
    last: tuple[float, float] | None = None
    pen_down = False
    first = slots - len(points)
    for index, point in enumerate(points):
        if point.value is None or math.isnan(point.value):
            pen_down = False
            continue
        spot = (round(PAD + (first + index) * step, 2), y(point.value))
        commands.append(f"{'L' if pen_down else 'M'}{spot[0]} {spot[1]}")
        pen_down, last = True, spot
        if point.breach:
            breaches.append(spot)
    line = y(threshold) if math.isfinite(threshold) else (PAD if threshold > 0 else HEIGHT - PAD)
    zone_y, zone_height = (0.0, line) if direction == "above" else (line, HEIGHT - line)
    return Sparkline(
        path=" ".join(commands),
        threshold_y=line,
        zone_y=zone_y,
        zone_height=round(zone_height, 2),
        breaches=tuple(breaches),
        last=last,
        title=title,
    )


def bucketed(points: Sequence[Point], direction: Literal["above", "below"]) -> list[Point]:
    """At most ``MAX_POINTS`` points: consecutive checks grouped, each group its worst value."""
    if len(points) <= MAX_POINTS:
        return list(points)
    worst = max if direction == "above" else min
    size = math.ceil(len(points) / MAX_POINTS)
    out = []
    for start in range(0, len(points), size):
        group = points[start : start + size]
        values = [p.value for p in group if p.value is not None and not math.isnan(p.value)]
        out.append(Point(worst(values) if values else None, breach=any(p.breach for p in group)))
    return out


def _span(values: Sequence[float]) -> tuple[float, float]:
    """The vertical range: the values' extent, widened when flat so a line is still drawn."""
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    if high - low < 1e-12:
        margin = abs(high) * 0.1 or 1.0
        return low - margin, high + margin
    margin = (high - low) * 0.08
    return low - margin, high + margin
