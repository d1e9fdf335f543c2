"""rollbackd's own Prometheus metrics, on a registry handed in (tests build a fresh one each).

``Metrics`` is updated from the engine's values: Check, Transition, MonitorState.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.process_collector import ProcessCollector

from rollbackd.config import MonitorConfig
from rollbackd.engine import Check, Event, MonitorState, Outcome, Phase, Transition
from rollbackd.limits import APPROVAL, COOLDOWN
from rollbackd.readings import labels_text
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
        self._series: dict[str, dict[tuple[str, str], Gauge]] = {}
        """Per monitor, the exported rule-value children by (rule, series)."""
        self._per_monitor: dict[str, tuple[dict[Outcome, Counter], Histogram]] = {}
        """Per monitor, the children of checks_total by outcome and of the duration histogram."""
        self._rule_sources: dict[str, dict[str, str]] = {}
        self._shown: dict[str, tuple[int, int, Phase, int]] = {}
        """Per monitor, the counters and phase last exported: unchanged ones are not set again."""
        self.checks = Counter(
            "rollbackd_checks_total",
            "Monitor checks, by outcome (ok, breach, inconclusive).",
            ["monitor", "outcome"],
            registry=registry,
        )
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
        self.rule_value = Gauge(
            "rollbackd_rule_value",
            "Latest value of each series of each rule (series = its label set).",
            ["monitor", "rule", "series"],
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
        self.check_duration = Histogram(
            "rollbackd_check_duration_seconds",
            "Time to read and evaluate one monitor check.",
            ["monitor"],
            buckets=DURATION_BUCKETS,
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
        for outcome in Outcome:
            self.checks.labels(monitor, outcome.value)
        self.check_duration.labels(monitor)
        self.monitor_state(monitor, state)

    def retain(self, monitors: Iterable[str]) -> None:
        """Drop every per-monitor series of monitors not in ``monitors`` (after a reload)."""
        for monitor in self._monitors - set(monitors):
            self._monitors.discard(monitor)
            self._rule_sources.pop(monitor, None)
            self._export_thresholds(monitor, None)
            for rule, series in self._series.pop(monitor, {}):
                self.rule_value.remove(monitor, rule, series)
            self._per_monitor.pop(monitor, None)
            for phase in Phase:
                _remove(self.state, monitor, phase.value)
            _remove(self.consecutive_failures, monitor)
            _remove(self.consecutive_errors, monitor)
            _remove(self.shadow_failures, monitor)
            for outcome in Outcome:
                _remove(self.checks, monitor, outcome.value)
            _remove(self.check_duration, monitor)
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
        children = self._per_monitor.get(monitor)
        if children is None:  # label lookups cost a lock and a tuple: once per monitor
            checks = {o: self.checks.labels(monitor, o.value) for o in Outcome}
            children = self._per_monitor[monitor] = (checks, self.check_duration.labels(monitor))
        children[0][check.outcome].inc()
        children[1].observe(max(seconds, 0.0))
        self.monitor_state(monitor, transition.state)
        self._rule_values(check)
        self._source_errors(check)
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

    def _rule_values(self, check: Check) -> None:
        monitor = check.monitor
        before = self._series.get(monitor, {})
        current: dict[tuple[str, str], Gauge] = {}
        per_rule: dict[str, int] = {}
        for result in check.results:
            if result.value is None:
                continue
            if per_rule.get(result.rule, 0) >= MAX_SERIES_PER_RULE:
                continue
            per_rule[result.rule] = per_rule.get(result.rule, 0) + 1
            key = (result.rule, labels_text(result.labels))
            child = before.get(key) or self.rule_value.labels(monitor, *key)
            child.set(result.value)
            current[key] = child
        # A series that vanished (or has no value now) must not linger at its old value.
        for rule, series in before.keys() - current.keys():
            self.rule_value.remove(monitor, rule, series)
        self._series[monitor] = current

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
