"""A scripted week of BOOP-like payment series, as OpenMetrics (to backfill) and as a live source.

Two incidents, a scrape outage, a NaN stretch and a series that appears mid-week. The live
source answers an instant query at ``now`` as Prometheus does: each series' latest sample at
or before ``now`` within the 5-minute lookback, NaN read as NaN, absent series left out.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from rollbackd.config import RuleConfig
from rollbackd.readings import Labels, Reading, labels_of, ok
from rollbackd.sources import ArrivalListener

START = 1_736_121_600.0
"""2025-01-06T00:00:00Z, a Monday: the first check."""
DAY = 86_400.0
END = START + 7 * DAY
STEP = 60.0
"""Scrape interval and the monitor's check interval."""
OFFSET = 30.0
"""Samples fall between checks, so "the latest sample at or before a check" is unambiguous."""
LOOKBACK = 300.0

ERROR_RATE = "boop_payment_error_rate_percent"
LATENCY = "boop_payment_latency_ms"

INCIDENTS = (
    ("eu", START + DAY + 10 * 3600, START + DAY + 10 * 3600 + 20 * 60, 2.5),
    ("us", START + 5 * DAY + 14 * 3600, START + 5 * DAY + 14 * 3600 + 15 * 60, 3.0),
)
"""(region, first breaching second, end, error rate): both roll back (5 checks or more)."""
OUTAGE = (START + 2 * DAY + 8 * 3600, START + 2 * DAY + 12 * 3600)
"""No sample of any series: the checks are inconclusive, the monitor goes blind."""
NAN_STRETCH = ("eu", START + 4 * DAY, START + 4 * DAY + 3600)
US_APPEARS = START + 3 * DAY + 12 * 3600


@dataclass(frozen=True, slots=True)
class Series:
    """One scripted series: its metric, labels, sample times and values."""

    metric: str
    labels: Labels
    times: list[float]
    values: list[float]


def _error_rate(region: str, t: float, j: int) -> float:
    for where, first, end, value in INCIDENTS:
        if where == region and first <= t < end:
            return value
    where, first, end = NAN_STRETCH
    if where == region and first <= t < end:
        return math.nan
    return 0.2 + 0.05 * (j % 7)


def week() -> list[Series]:
    """The week's series, samples every ``STEP`` from 10 minutes before ``START``."""
    out = []
    plan = [
        (ERROR_RATE, {"region": "eu"}, START - 600),
        (ERROR_RATE, {"region": "us"}, US_APPEARS),
        (LATENCY, {}, START - 600),
    ]
    for metric, labels, first in plan:
        times, values = [], []
        j = 0
        t = first + OFFSET
        while t <= END:
            if not OUTAGE[0] <= t < OUTAGE[1]:
                times.append(t)
                if metric == LATENCY:
                    values.append(300.0 + 10.0 * (j % 17))
                else:
                    values.append(_error_rate(labels["region"], t, j))
            t += STEP
            j += 1
        out.append(Series(metric, labels_of(labels), times, values))
    return out


def openmetrics(series: Sequence[Series], path: Path) -> Path:
    """Write ``series`` as an OpenMetrics file promtool can backfill (gauges, ``# EOF``)."""

    def lines() -> Iterator[str]:
        for metric in dict.fromkeys(s.metric for s in series):
            yield f"# TYPE {metric} gauge"
            for s in (s for s in series if s.metric == metric):
                labels = ",".join(f'{k}="{v}"' for k, v in s.labels)
                name = f"{metric}{{{labels}}}" if labels else metric
                for t, v in zip(s.times, s.values, strict=True):
                    yield f"{name} {'NaN' if math.isnan(v) else repr(v)} {t:.3f}"
        yield "# EOF"

    path.write_text("\n".join(lines()) + "\n")
    return path


class ScriptedSource:
    """A polled source answering each rule's query (a metric name) from the scripted week."""

    push = False

    def __init__(self, name: str, series: Sequence[Series]) -> None:
        self.name = name
        self.series = series

    def watch(self, monitor: str, rule: RuleConfig) -> None:
        """Nothing to prepare."""

    def add_listener(self, listener: ArrivalListener) -> None:
        """A polled source has no arrivals."""

    async def start(self) -> None:
        """Nothing to start."""

    async def aclose(self) -> None:
        """Nothing to stop."""

    async def read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        """Each series' latest sample within the lookback, as an instant query at ``now``."""
        readings = []
        for s in self.series:
            if s.metric != rule.query:
                continue
            i = bisect.bisect_right(s.times, now) - 1
            if i >= 0 and s.times[i] > now - LOOKBACK:
                labels = labels_of({"__name__": s.metric, **dict(s.labels)})
                readings.append(ok(s.values[i], now, labels))
        return readings
