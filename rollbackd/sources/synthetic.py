"""The ``synthetic`` source: seeded BOOP-like traffic following a scripted scenario of stages.

Values are a pure function of (seed, metric, offset), where the offset is ``now`` minus the
scenario's start: the ``start`` option (unix seconds) or, without it, the ``now`` of the
source's first read. The same seed and offset always give the same value.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from rollbackd.config import RuleConfig
from rollbackd.options import Duration, Frozen
from rollbackd.readings import Reading, error, excerpt, no_data, ok
from rollbackd.sources import ArrivalListener, SourceType

StageKind = Literal["healthy", "degrading", "outage", "silent"]

DRAIN_SECONDS = 10.0
"""In an outage, in-flight transactions fall linearly to exactly 0 over this many seconds."""


@dataclass(frozen=True, slots=True)
class Profile:
    """How one metric behaves: its healthy and broken levels and its noise (± ``spread``)."""

    healthy: float
    broken: float
    spread: float
    high: float = math.inf
    integer: bool = False
    drains: bool = False
    """Falls to 0 during an outage (in-flight work completing) instead of jumping to ``broken``."""


METRICS: dict[str, Profile] = {
    # Healthy levels stay inside the seed guide's thresholds whatever the noise; broken ones
    # are well past them (auth: error > 1 %, latency > 3000 ms, success < 99 %;
    # payments: > 0.1 %, > 2000 ms, < 99.5 %; uptime < 99 %, connection failures > 5/min).
    "auth_error_rate": Profile(0.3, 6.0, 0.1, high=100.0),
    "auth_response_time_ms": Profile(450.0, 5200.0, 60.0),
    "auth_success_rate": Profile(99.8, 93.0, 0.08, high=100.0),
    "payment_error_rate": Profile(0.03, 2.5, 0.01, high=100.0),
    "payment_response_time_ms": Profile(600.0, 4500.0, 80.0),
    "payment_success_rate": Profile(99.95, 96.0, 0.02, high=100.0),
    "uptime": Profile(99.99, 97.0, 0.005, high=100.0),
    "connection_failures_per_min": Profile(0.5, 25.0, 0.4),
    "inflight_transactions": Profile(40.0, 0.0, 5.0, integer=True, drains=True),
}
"""Every metric a synthetic rule's ``query`` can name."""


class Stage(Frozen):
    """One stage of the scenario, an item of ``phases``: ``{ kind = "outage", duration = "20s" }``.

    healthy: healthy levels; degrading: a straight line from healthy to broken over the stage;
    outage: broken levels; silent: every metric reads no data. The last stage may omit its
    duration and then lasts forever; every other stage needs one. (Not ``engine.Phase``, a
    monitor's state.)
    """

    kind: StageKind
    duration: Duration | None = None


DEFAULT_STAGES = tuple(
    Stage.model_validate(raw)
    for raw in (
        {"kind": "healthy", "duration": "20s"},
        {"kind": "degrading", "duration": "20s"},
        {"kind": "outage"},
    )
)
"""The default scenario: 20 s healthy, 20 s degrading, then an outage that lasts."""


class SyntheticOptions(Frozen):
    """``[sources.NAME]`` keys of ``type = "synthetic"``."""

    seed: int = 0
    start: float | None = None
    """Unix time of the scenario's offset 0; default: the ``now`` of the first read."""
    noise: float = Field(default=1.0, ge=0.0, le=10.0)
    """Scale of the random noise; 0 gives the exact profile levels."""
    phases: tuple[Stage, ...] = Field(default=DEFAULT_STAGES, min_length=1)
    """The scenario's stages, in order (the TOML key keeps its name)."""

    @model_validator(mode="after")
    def _durations(self) -> SyntheticOptions:
        for i, stage in enumerate(self.phases[:-1]):
            if stage.duration is None:
                raise ValueError(f"phases[{i}] needs a duration: only the last phase may omit it")
        return self


def stage_at(stages: Sequence[Stage], offset: float) -> tuple[Stage, float]:
    """Return the stage running at ``offset`` seconds and the seconds spent in it so far."""
    offset = max(offset, 0.0)
    for stage in stages:
        if stage.duration is None or offset < stage.duration:
            return stage, offset
        offset -= stage.duration
    last = stages[-1]
    return last, offset + (last.duration or 0.0)  # a finite last stage holds at its end


def sample(options: SyntheticOptions, metric: str, offset: float) -> float | None:
    """Return ``metric``'s value at ``offset``, None in a silent stage; KeyError if unknown."""
    profile = METRICS[metric]
    stage, elapsed = stage_at(options.phases, offset)
    if stage.kind == "silent":
        return None
    jitter = options.noise * profile.spread * _noise(options.seed, metric, offset)
    if stage.kind == "healthy":
        level = profile.healthy
    elif stage.kind == "degrading":
        progress = min(elapsed / stage.duration, 1.0) if stage.duration else 1.0
        level = profile.healthy + (profile.broken - profile.healthy) * progress
    elif profile.drains:
        remaining = max(0.0, 1.0 - elapsed / DRAIN_SECONDS)
        level, jitter = profile.healthy * remaining, jitter * remaining
    else:
        level = profile.broken
    value = min(max(level + jitter, 0.0), profile.high)
    return float(round(value)) if profile.integer else value


def _noise(seed: int, metric: str, offset: float) -> float:
    """Uniform in [-1, 1), fixed per (seed, metric, whole second of the offset)."""
    key = f"{seed}:{metric}:{math.floor(offset)}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**63 - 1.0


class SyntheticSource:
    """Reads the scenario; needs no server, so every method is immediate."""

    push = False
    local = True
    """``read`` does no I/O: a monitor reads it without a task per rule."""

    def __init__(self, name: str, options: SyntheticOptions) -> None:
        self.name = name
        self.options = options
        self.started_at = options.start
        """Unix time of offset 0 (set by the first read when the option is absent)."""

    def watch(self, monitor: str, rule: RuleConfig) -> None:
        """Ignore: values are computed on read."""

    def add_listener(self, listener: ArrivalListener) -> None:
        """Ignore listeners: a polled source has no arrivals to report."""

    async def start(self) -> None:
        """Do nothing: the scenario's clock starts at the first read (or at ``start``)."""

    async def aclose(self) -> None:
        """Do nothing: there is nothing to release."""

    def offset(self, now: float) -> float:
        """Return the scenario offset of ``now``, starting the clock on the first call."""
        if self.started_at is None:
            self.started_at = now
        return now - self.started_at

    async def read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        """Return the one value of the metric named by ``rule.query`` at ``now``."""
        metric = (rule.query or "").strip()
        if metric not in METRICS:
            known = ", ".join(sorted(METRICS))
            return [error(f"unknown synthetic metric {excerpt(metric)!r} (known: {known})", now)]
        offset = self.offset(now)
        value = sample(self.options, metric, offset)
        if value is None:
            return [no_data(f"synthetic scenario is silent at {offset:.0f}s", now)]
        return [ok(value, now)]


SYNTHETIC = SourceType(
    options=SyntheticOptions, rule_keys=frozenset({"query"}), build=SyntheticSource
)
"""Entry point ``synthetic`` of ``rollbackd.sources``."""
