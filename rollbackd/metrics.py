"""rollbackd's own Prometheus metrics, on a registry handed in (tests build a fresh one each).

``Metrics`` is updated from the engine's values: Check, Transition, MonitorState.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from rollbackd.config import MonitorConfig
from rollbackd.engine import Check, Event, MonitorState, Outcome, Phase, Transition
from rollbackd.limits import APPROVAL, COOLDOWN
from rollbackd.readings import Labels, labels_text
from rollbackd.rollouts import RolloutState
from rollbackd.verdicts import Verdict

MAX_SERIES_PER_RULE = 100
"""Series of one rule exported as ``rollbackd_rule_value``; more are left out (cardinality)."""

WAIT_REASONS = (APPROVAL, COOLDOWN)
"""What a plan can wait for: both always exported (0 when none waits)."""

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ACTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""An attempt of a plan step: a file write takes milliseconds, a ``wait`` minutes."""


class Metrics:
    """The daemon's counters and gauges, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, *, process: bool = True) -> None:
        self.registry = registry
        self._mode = "dry-run"
        self._monitors: set[str] = set()
        self.checks = _Checks()
        """Checks by outcome, their durations and the rules' values: kept per check."""
        registry.register(self.checks)
        self._rule_sources: dict[str, dict[str, str]] = {}
        self._shown: dict[str, tuple[int, int, Phase, int]] = {}
        """Per monitor, the counters and phase last exported: unchanged ones are not set again."""
        self.consecutive_failures = Gauge(
            "rollbackd_consecutive_failures",
            "Consecutive failing checks of a monitor (rolls back at rollback_after).",
            ["monitor"],
            registry=registry,
        )
        self.consecutive_errors = Gauge(
            "rollbackd_consecutive_errors",
            "Consecutive inconclusive checks of a monitor (blind at blind_after).",
            ["monitor"],
            registry=registry,
        )
        self.shadow_failures = Gauge(
            "rollbackd_shadow_failures",
            "Consecutive checks a monitor's shadow rules breached (never rolls back).",
            ["monitor"],
            registry=registry,
        )
        self.state = Gauge(
            "rollbackd_monitor_state",
            "1 for the monitor's current state (ok, failing, blind, rolled_back), else 0.",
            ["monitor", "state"],
            registry=registry,
        )
        self.rollbacks = Counter(
            "rollbackd_rollbacks_total",
            "Rollbacks triggered, by mode (dry-run records them without acting).",
            ["monitor", "mode"],
            registry=registry,
        )
        self.alerts = Counter(
            "rollbackd_alerts_total",
            "Alerts raised before a rollback, by event (alert, blind).",
            ["monitor", "event"],
            registry=registry,
        )
        self.action_attempts = Counter(
            "rollbackd_action_attempts_total",
            "Attempts of plan steps, by action and result.",
            ["action", "result"],
            registry=registry,
        )
        self.source_errors = Counter(
            "rollbackd_source_errors_total",
            "Rule reads that failed at their source (counted as inconclusive, never as ok).",
            ["source"],
            registry=registry,
        )
        self.action_duration_histogram = Histogram(
            "rollbackd_action_duration_seconds",
            "Time one attempt of a plan step took, by action (timeouts included).",
            ["action"],
            buckets=ACTION_BUCKETS,
            registry=registry,
        )
        self.rule_threshold = Gauge(
            "rollbackd_rule_threshold",
            "Threshold of each rule (direction: above or below breaches), next to rule_value.",
            ["monitor", "rule", "direction"],
            registry=registry,
        )
        self._thresholds: dict[str, set[tuple[str, str]]] = {}
        """Per monitor, the (rule, direction) threshold children exported."""
        self.plans_waiting_gauge = Gauge(
            "rollbackd_plans_waiting",
            "Rollback plans not started yet, by what they wait for: approval "
            "(max_rollbacks reached; rollbackd approve runs one) or cooldown (rearm_cooldown).",
            ["reason"],
            registry=registry,
        )
        self.plans_waiting({})
        self.leader = Gauge(
            "rollbackd_leader",
            "1 while this daemon acts (leader; always with SQLite state), 0 as a standby.",
            registry=registry,
        )
        self.rollout_percent = Gauge(
            "rollbackd_rollout_percent",
            "Traffic percentage a rollout has set (0 before its first step and after a rollback).",
            ["rollout"],
            registry=registry,
        )
        self.rollout_step = Gauge(
            "rollbackd_rollout_step",
            "Index in steps of the step a rollout is at or moving to (the first is 0).",
            ["rollout"],
            registry=registry,
        )
        self._rollouts: set[str] = set()
        self._info = Info(
            "rollbackd", "Version, mode and environment of the running daemon.", registry=registry
        )
        if process:
            ProcessCollector(registry=registry)

    def info(self, version: str, mode: str, environment: str) -> None:
        """Set ``rollbackd_info`` (again after a reload); the mode labels later rollbacks."""
        self._mode = mode
        self._info.info({"version": version, "mode": mode, "environment": environment})

    def track(self, monitor: str, config: MonitorConfig, state: MonitorState) -> None:
        """Start exporting a monitor: zeroed counters, its state, which source each rule reads."""
        self._rule_sources[monitor] = {rule.name: rule.source for rule in config.rules}
        self._export_thresholds(monitor, config)
        self.checks.track(monitor)
        self.monitor_state(monitor, state)

    def retain(self, monitors: Iterable[str]) -> None:
        """Drop every per-monitor series of monitors not in ``monitors`` (after a reload)."""
        for monitor in self._monitors - set(monitors):
            self._monitors.discard(monitor)
            self._rule_sources.pop(monitor, None)
            self._export_thresholds(monitor, None)
            self.checks.forget(monitor)
            for phase in Phase:
                _remove(self.state, monitor, phase.value)
            _remove(self.consecutive_failures, monitor)
            _remove(self.consecutive_errors, monitor)
            _remove(self.shadow_failures, monitor)
            self._shown.pop(monitor, None)

    def _export_thresholds(self, monitor: str, config: MonitorConfig | None) -> None:
        """Export ``monitor``'s rule thresholds; drop those its config no longer has."""
        rules = config.rules if config is not None else ()
        current = {(rule.name, rule.direction): rule.threshold for rule in rules}
        for rule, direction in self._thresholds.pop(monitor, set()) - current.keys():
            _remove(self.rule_threshold, monitor, rule, direction)
        for (rule, direction), threshold in current.items():
            self.rule_threshold.labels(monitor, rule, direction).set(threshold)
        if current:
            self._thresholds[monitor] = set(current)

    def action_duration(self, action: str, seconds: float) -> None:
        """Observe how long one attempt of a plan step took."""
        self.action_duration_histogram.labels(action).observe(max(seconds, 0.0))

    def monitor_state(self, monitor: str, state: MonitorState) -> None:
        """Export a monitor's counters and state (after a check, a rearm or at start)."""
        shown = (
            state.consecutive_failures,
            state.consecutive_errors,
            state.phase,
            state.shadow_failures,
        )
        if self._shown.get(monitor) == shown:
            return  # the common healthy case: nothing to update
        self._shown[monitor] = shown
        self._monitors.add(monitor)
        self.consecutive_failures.labels(monitor).set(state.consecutive_failures)
        self.consecutive_errors.labels(monitor).set(state.consecutive_errors)
        self.shadow_failures.labels(monitor).set(state.shadow_failures)
        for phase in Phase:
            self.state.labels(monitor, phase.value).set(1 if phase is state.phase else 0)

    def observe_check(
        self, check: Check, transition: Transition, seconds: float, *, mode: str | None = None
    ) -> None:
        """Record one committed check: outcome, counters, rule values, decisions, duration."""
        monitor = check.monitor
        self.checks.observe(check, seconds)
        self.monitor_state(monitor, transition.state)
        if check.outcome is not Outcome.OK or check.shadow_outcome not in (None, Outcome.OK):
            self._source_errors(check)  # an ok outcome has no error among its results
        for event in transition.events:
            if event is Event.ROLLBACK:
                self.rollbacks.labels(monitor, mode or self._mode).inc()
            else:
                self.alerts.labels(monitor, event.value).inc()

    def rollout(self, name: str, state: RolloutState) -> None:
        """Export a rollout's current step and the percentage it has set."""
        self._rollouts.add(name)
        self.rollout_step.labels(name).set(state.step)
        self.rollout_percent.labels(name).set(state.percent)

    def retain_rollouts(self, names: Iterable[str]) -> None:
        """Forget the rollouts a reload removed."""
        gone, self._rollouts = self._rollouts - set(names), self._rollouts & set(names)
        for name in gone:
            self.rollout_step.remove(name)
            self.rollout_percent.remove(name)

    def plans_waiting(self, counts: Mapping[str, int]) -> None:
        """Export how many plans wait, by reason (``approval``, ``cooldown``); absent is 0."""
        for reason in WAIT_REASONS:
            self.plans_waiting_gauge.labels(reason).set(counts.get(reason, 0))

    def action_attempt(self, action: str, result: str) -> None:
        """Count one attempt of a plan step (result: ok, failed, would_run, ...)."""
        self.action_attempts.labels(action, result).inc()

    def source_error(self, source: str, count: int = 1) -> None:
        """Count failed reads of a source that ``observe_check`` cannot see."""
        self.source_errors.labels(source).inc(count)

    def _source_errors(self, check: Check) -> None:
        sources: Mapping[str, str] = self._rule_sources.get(check.monitor, {})
        for result in check.results:
            if result.verdict is Verdict.ERROR:
                self.source_errors.labels(sources.get(result.rule, "unknown")).inc()


def _remove(metric: Counter | Gauge | Histogram, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:  # never created: nothing to remove
        return


_OUTCOMES = {outcome: i for i, outcome in enumerate(Outcome)}
_LE: tuple[str, ...] = tuple(
    floatToGoString(bound)  # type: ignore[no-untyped-call]
    for bound in (*DURATION_BUCKETS, float("inf"))
)
"""The duration buckets' ``le`` labels, spelled as prometheus_client spells them."""


class _MonitorChecks:
    """One monitor's checks as plain numbers: counts by outcome, durations, latest values."""

    __slots__ = ("buckets", "created", "outcomes", "seconds", "values")

    def __init__(self) -> None:
        self.created = time.time()
        self.outcomes = [0] * len(_OUTCOMES)
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.seconds = 0.0
        self.values: dict[tuple[str, Labels], float] = {}


class _Checks:
    """``rollbackd_checks_total``, ``rollbackd_check_duration_seconds``, ``rollbackd_rule_value``.

    Kept as plain numbers per monitor and turned into samples when scraped: a check costs a
    few additions, no lock and no child lookup. Scrapes render on a worker thread; they read
    snapshots (``list`` of a dict is atomic under the GIL) of numbers only the loop writes.
    """

    def __init__(self) -> None:
        self._monitors: dict[str, _MonitorChecks] = {}

    def track(self, monitor: str) -> None:
        """Export ``monitor`` (zeroed) from now on; kept as it is when already tracked."""
        if monitor not in self._monitors:
            self._monitors[monitor] = _MonitorChecks()

    def forget(self, monitor: str) -> None:
        """Drop every series of ``monitor``."""
        self._monitors.pop(monitor, None)

    def observe(self, check: Check, seconds: float) -> None:
        """Count one check, its duration and the values of its rules' series.

        A series that vanished (or has no value now) does not linger at its old value; past
        ``MAX_SERIES_PER_RULE`` series of one rule, the rest are left out (cardinality).
        """
        found = self._monitors.get(check.monitor)
        if found is None:
            found = self._monitors[check.monitor] = _MonitorChecks()
        found.outcomes[_OUTCOMES[check.outcome]] += 1
        seconds = max(seconds, 0.0)
        found.buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        found.seconds += seconds
        values: dict[tuple[str, Labels], float] = {}
        per_rule: dict[str, int] = {}
        for result in check.results:
            if result.value is None:
                continue
            rule = result.rule
            seen = per_rule.get(rule, 0)
            if seen < MAX_SERIES_PER_RULE:
                per_rule[rule] = seen + 1
                values[rule, result.labels] = result.value
        found.values = values

    def describe(self) -> list[Metric]:
        """The families (for the registry's name check), without samples."""
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        """The three families with every tracked monitor's samples."""
        checks, durations, values = self._families()
        for monitor, found in list(self._monitors.items()):
            created = found.created
            for outcome, index in _OUTCOMES.items():
                checks.add_metric([monitor, outcome.value], found.outcomes[index], created=created)
            counts, total = list(found.buckets), 0
            cumulative = []
            for bound, count in zip(_LE, counts, strict=True):
                total += count
                cumulative.append((bound, float(total)))
            durations.add_metric([monitor], cumulative, found.seconds)
            durations.samples.append(
                Sample(durations.name + "_created", {"monitor": monitor}, created)
            )
            for (rule, labels), value in list(found.values.items()):
                values.add_metric([monitor, rule, labels_text(labels)], value)
        yield checks
        yield durations
        yield values

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, HistogramMetricFamily, GaugeMetricFamily]:
        return (
            CounterMetricFamily(
                "rollbackd_checks_total",
                "Monitor checks, by outcome (ok, breach, inconclusive).",
                labels=["monitor", "outcome"],
            ),
            HistogramMetricFamily(
                "rollbackd_check_duration_seconds",
                "Time to read and evaluate one monitor check.",
                labels=["monitor"],
            ),
            GaugeMetricFamily(
                "rollbackd_rule_value",
                "Latest value of each series of each rule (series = its label set).",
                labels=["monitor", "rule", "series"],
            ),
        )
