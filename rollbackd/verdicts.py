"""How one rule's series are judged: the verdict per series, with its reason.

Pure, like the engine that decides on the verdicts: no I/O, no clock.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, Protocol

from rollbackd.frozen import fast_init
from rollbackd.readings import Labels, Reading, ReadingStatus, format_value, labels_text


class Verdict(StrEnum):
    """How one series of one rule was judged."""

    OK = "ok"
    BREACH = "breach"
    NO_DATA = "no_data"
    ERROR = "error"
    INSUFFICIENT = "insufficient"  # too few events behind the figure (min_volume): inconclusive


class RuleSpec(Protocol):
    """What the engine needs of a rule (``config.RuleConfig`` is one)."""

    @property
    def name(self) -> str:
        """The rule's name, unique in its monitor."""

    @property
    def threshold(self) -> float:
        """The number a value is compared with."""

    @property
    def direction(self) -> Literal["above", "below"]:
        """Which side of the threshold is a breach."""

    @property
    def unit(self) -> str:
        """Shown after values ("%", "ms"); may be empty."""

    @property
    def no_data(self) -> Literal["inconclusive", "breach", "ok"]:
        """How a series without a value counts."""

    @property
    def min_volume(self) -> float | None:
        """Events a series needs behind its figure to be judged (None: no volume guard)."""


@fast_init
@dataclass(frozen=True, slots=True)
class RuleResult:
    """One series of one rule, judged and explained."""

    rule: str
    labels: Labels
    value: float | None
    threshold: float
    direction: Literal["above", "below"]
    unit: str
    verdict: Verdict
    reason: str
    at: float

    def describe(self) -> str:
        """``rule{labels}: reason``, for logs and incident reasons."""
        return f"{self.rule}{labels_text(self.labels)}: {self.reason}"


_POLICY_VERDICT = {"inconclusive": Verdict.NO_DATA, "breach": Verdict.BREACH, "ok": Verdict.OK}


def evaluate_rule(
    rule: RuleSpec,
    readings: Sequence[Reading],
    at: float = 0.0,
    volumes: Mapping[Labels, Reading] | None = None,
) -> list[RuleResult]:
    """Judge each series on its own; ``at`` dates the single result of an empty reading list.

    A value strictly beyond the threshold breaches (equal is ok); +Inf breaches ``above``
    and -Inf breaches ``below``. Missing values follow ``rule.no_data``; source errors are
    always ERROR (inconclusive), never a breach and never ok. With ``rule.min_volume``, a
    series whose volume (``volumes``, keyed by ``matching`` labels) is missing or lower is
    INSUFFICIENT: inconclusive, whatever its value.
    """
    name, unit, threshold = rule.name, rule.unit, rule.threshold
    direction = rule.direction
    above = direction == "above"
    direction_word: str = direction
    not_word = "not " + direction
    sfx, limit = _limit_text(threshold, unit)
    if not readings:
        return [_no_data(rule, (), "the source returned no series", at)]
    results: list[RuleResult] = []
    append = results.append
    for reading in readings:
        value = reading.value
        if reading.status is ReadingStatus.OK and value is not None and not math.isnan(value):
            if (value > threshold) if above else (value < threshold):
                verdict, word = Verdict.BREACH, direction_word
            else:
                verdict, word = Verdict.OK, not_word
            reason = f"value {format_value(value)}{sfx} {word} {limit}"
            if rule.min_volume is not None and (
                short := _short_volume(rule.min_volume, reading.labels, volumes)
            ):
                verdict, reason = Verdict.INSUFFICIENT, f"{short} ({reason})"
            append(
                RuleResult(
                    name, reading.labels, value, threshold, direction, unit, verdict, reason,
                    reading.at,
                )
            )  # fmt: skip
        elif reading.status is ReadingStatus.ERROR:
            reason = f"source error: {reading.reason or 'unknown'}"
            append(
                RuleResult(
                    name, reading.labels, None, threshold, direction, unit, Verdict.ERROR, reason,
                    reading.at,
                )
            )  # fmt: skip
        else:
            why = reading.reason or ("value is NaN" if value is not None else "no value")
            append(_no_data(rule, reading.labels, why, reading.at))
    return results


@functools.lru_cache(maxsize=1024)
def _limit_text(threshold: float, unit: str) -> tuple[str, str]:
    """``(" %", "threshold 1.0 %")``: a rule's unit suffix and threshold, as reasons show them.

    The same for every check of a rule, so worked out once (about 1 us a check).
    """
    sfx = f" {unit}" if unit else ""
    return sfx, f"threshold {format_value(threshold)}{sfx}"


def matching(labels: Labels) -> Labels:
    """The labels that match a series to its volume: all but the metric name (as PromQL does)."""
    return tuple(pair for pair in labels if pair[0] != "__name__")


def _short_volume(
    least: float, labels: Labels, volumes: Mapping[Labels, Reading] | None
) -> str | None:
    """Why a series has too few events behind it to be judged, or None when it has enough."""
    volume = volumes.get(matching(labels)) if volumes else None
    if volume is None or volume.value is None or math.isnan(volume.value):
        why = volume.reason if volume is not None and volume.reason else "no volume series"
        return f"insufficient volume: {why}"
    if volume.value < least:
        return (
            f"insufficient volume: {format_value(volume.value)} events, "
            f"min_volume {format_value(least)}"
        )
    return None


def _no_data(rule: RuleSpec, labels: Labels, why: str, at: float) -> RuleResult:
    verdict = _POLICY_VERDICT[rule.no_data]
    if verdict is Verdict.NO_DATA:
        reason = f"no data: {why}"
    else:
        reason = f'no data: {why} (counted as {verdict.value}: no_data = "{rule.no_data}")'
    return RuleResult(
        rule.name, labels, None, rule.threshold, rule.direction, rule.unit, verdict, reason, at
    )
