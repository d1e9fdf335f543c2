"""The daemon's own metrics, each test on a fresh CollectorRegistry."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from rollbackd import metrics as metrics_module
from rollbackd.config import MonitorConfig
from rollbackd.engine import Check, Event, MonitorState, Outcome, Phase, Transition
from rollbackd.metrics import Metrics
from rollbackd.readings import Labels, labels_of
from rollbackd.verdicts import RuleResult, Verdict

MONITOR = MonitorConfig.model_validate(
    {
        "rules": [
            {"name": "error-rate", "source": "prom", "query": "x", "above": 1.0},
            {"name": "success-rate", "source": "bus", "topic": "t", "below": 99.0},
        ]
    }
)


@pytest.fixture
def registry() -> CollectorRegistry:
    """Build a registry of this test only."""
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    """Metrics on the test's registry, with the payments monitor tracked."""
    m = Metrics(registry, process=False)
    m.info("1.2.3", "armed", "staging")
    m.track("payments", MONITOR, MonitorState())
    return m


def _result(
    rule: str, value: float | None, verdict: Verdict = Verdict.OK, labels: Labels = ()
) -> RuleResult:
    return RuleResult(rule, labels, value, 1.0, "above", "%", verdict, "why", 100.0)


def _check(outcome: Outcome, *results: RuleResult) -> Check:
    return Check("payments", 100.0, outcome, tuple(results))


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_info(registry: CollectorRegistry, metrics: Metrics) -> None:
    """rollbackd_info carries version, mode and environment; a reload replaces them."""
    assert _sample(registry, "rollbackd_info", version="1.2.3", mode="armed", environment="staging")
    metrics.info("1.2.3", "dry-run", "staging")
    assert _sample(
        registry, "rollbackd_info", version="1.2.3", mode="dry-run", environment="staging"
    )
    assert (
        _sample(registry, "rollbackd_info", version="1.2.3", mode="armed", environment="staging")
        is None
    )


def test_track_starts_counters_at_zero(registry: CollectorRegistry, metrics: Metrics) -> None:
    """A tracked monitor exports zeroed check counters and its state before its first check."""
    for outcome in ("ok", "breach", "inconclusive"):
        assert _sample(registry, "rollbackd_checks_total", monitor="payments", outcome=outcome) == 0
    assert _sample(registry, "rollbackd_monitor_state", monitor="payments", state="ok") == 1
    assert _sample(registry, "rollbackd_consecutive_failures", monitor="payments") == 0


def test_observe_check_counts_and_state(registry: CollectorRegistry, metrics: Metrics) -> None:
    """A breach counts one check, sets the failure counter and makes 'failing' the one state."""
    state = MonitorState(phase=Phase.FAILING, consecutive_failures=2, consecutive_errors=0)
    check = _check(Outcome.BREACH, _result("error-rate", 3.0, Verdict.BREACH))
    metrics.observe_check(check, Transition(state, (), "r"), 0.004)
    assert _sample(registry, "rollbackd_checks_total", monitor="payments", outcome="breach") == 1
    assert _sample(registry, "rollbackd_consecutive_failures", monitor="payments") == 2
    states = {
        phase.value: _sample(
            registry, "rollbackd_monitor_state", monitor="payments", state=phase.value
        )
        for phase in Phase
    }
    assert states == {"ok": 0, "failing": 1, "blind": 0, "rolled_back": 0}
    assert _sample(registry, "rollbackd_check_duration_seconds_count", monitor="payments") == 1
    assert (
        _sample(registry, "rollbackd_check_duration_seconds_bucket", monitor="payments", le="0.005")
        == 1
    )


def test_rule_values_follow_the_series(registry: CollectorRegistry, metrics: Metrics) -> None:
    """Each series gets its canonical label string; a series that vanishes is removed."""
    eu, us = labels_of({"region": "eu"}), labels_of({"region": "us", "az": "1"})
    first = _check(
        Outcome.OK, _result("error-rate", 0.5, labels=eu), _result("error-rate", 0.7, labels=us)
    )
    metrics.observe_check(first, Transition(MonitorState(), (), "r"), 0.0)
    value = "rollbackd_rule_value"
    assert (
        _sample(registry, value, monitor="payments", rule="error-rate", series='{region="eu"}')
        == 0.5
    )
    us_series = '{az="1",region="us"}'
    assert _sample(registry, value, monitor="payments", rule="error-rate", series=us_series) == 0.7
    second = _check(Outcome.OK, _result("error-rate", 0.6, labels=eu))
    metrics.observe_check(second, Transition(MonitorState(), (), "r"), 0.0)
    assert (
        _sample(registry, value, monitor="payments", rule="error-rate", series='{region="eu"}')
        == 0.6
    )
    assert _sample(registry, value, monitor="payments", rule="error-rate", series=us_series) is None


def test_a_series_without_value_is_not_exported(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    """A rule that had a value and now has no data drops its gauge, not keeping the old value."""
    ok = _check(Outcome.OK, _result("error-rate", 0.5))
    metrics.observe_check(ok, Transition(MonitorState(), (), "r"), 0.0)
    assert (
        _sample(registry, "rollbackd_rule_value", monitor="payments", rule="error-rate", series="")
        == 0.5
    )
    blind = _check(Outcome.INCONCLUSIVE, _result("error-rate", None, Verdict.NO_DATA))
    metrics.observe_check(blind, Transition(MonitorState(consecutive_errors=1), (), "r"), 0.0)
    assert (
        _sample(registry, "rollbackd_rule_value", monitor="payments", rule="error-rate", series="")
        is None
    )
    assert _sample(registry, "rollbackd_consecutive_errors", monitor="payments") == 1


def test_series_per_rule_are_capped(
    registry: CollectorRegistry, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most MAX_SERIES_PER_RULE series of one rule are exported (bounded cardinality)."""
    monkeypatch.setattr(metrics_module, "MAX_SERIES_PER_RULE", 2)
    results = [_result("error-rate", float(i), labels=labels_of({"pod": str(i)})) for i in range(5)]
    metrics.observe_check(_check(Outcome.OK, *results), Transition(MonitorState(), (), "r"), 0.0)
    exported = [
        s
        for family in registry.collect()
        if family.name == "rollbackd_rule_value"
        for s in family.samples
    ]
    assert len(exported) == 2


def test_decisions_count_rollbacks_and_alerts(
    registry: CollectorRegistry, metrics: Metrics
) -> None:
    """ROLLBACK counts under the current mode; ALERT and BLIND count as alert events."""
    latched = MonitorState(phase=Phase.ROLLED_BACK, consecutive_failures=5)
    check = _check(Outcome.BREACH, _result("error-rate", 3.0, Verdict.BREACH))
    metrics.observe_check(check, Transition(latched, (Event.ALERT, Event.ROLLBACK), "r"), 0.0)
    metrics.observe_check(check, Transition(latched, (Event.BLIND,), "r"), 0.0)
    assert _sample(registry, "rollbackd_rollbacks_total", monitor="payments", mode="armed") == 1
    assert _sample(registry, "rollbackd_alerts_total", monitor="payments", event="alert") == 1
    assert _sample(registry, "rollbackd_alerts_total", monitor="payments", event="blind") == 1
    assert (
        _sample(registry, "rollbackd_monitor_state", monitor="payments", state="rolled_back") == 1
    )


def test_source_errors_are_counted_by_source(registry: CollectorRegistry, metrics: Metrics) -> None:
    """An ERROR result counts against the source its rule reads; no data does not."""
    check = _check(
        Outcome.INCONCLUSIVE,
        _result("error-rate", None, Verdict.ERROR),
        _result("success-rate", None, Verdict.NO_DATA),
    )
    metrics.observe_check(check, Transition(MonitorState(consecutive_errors=1), (), "r"), 0.0)
    assert _sample(registry, "rollbackd_source_errors_total", source="prom") == 1
    assert _sample(registry, "rollbackd_source_errors_total", source="bus") is None
    metrics.source_error("bus", 2)
    assert _sample(registry, "rollbackd_source_errors_total", source="bus") == 2


def test_action_attempts(registry: CollectorRegistry, metrics: Metrics) -> None:
    """action_attempt counts by action and result."""
    metrics.action_attempt("route-legacy", "failed")
    metrics.action_attempt("route-legacy", "ok")
    metrics.action_attempt("route-legacy", "ok")
    assert (
        _sample(registry, "rollbackd_action_attempts_total", action="route-legacy", result="ok")
        == 2
    )
    assert (
        _sample(registry, "rollbackd_action_attempts_total", action="route-legacy", result="failed")
        == 1
    )


def test_retain_drops_removed_monitors(registry: CollectorRegistry, metrics: Metrics) -> None:
    """After a reload without a monitor, none of its gauges or counters linger."""
    metrics.track("auth", MONITOR, MonitorState())
    check = _check(Outcome.OK, _result("error-rate", 0.5))
    metrics.observe_check(check, Transition(MonitorState(), (), "r"), 0.0)
    metrics.retain(["auth"])
    leftovers = [
        s
        for family in registry.collect()
        for s in family.samples
        if s.labels.get("monitor") == "payments"
    ]
    assert leftovers == []
    assert _sample(registry, "rollbackd_monitor_state", monitor="auth", state="ok") == 1


def test_process_metrics_are_optional() -> None:
    """process=True adds the process_* collector (RSS, CPU) to the given registry only."""
    with_process, without = CollectorRegistry(), CollectorRegistry()
    Metrics(with_process)
    Metrics(without, process=False)
    assert with_process.get_sample_value("process_resident_memory_bytes")
    assert without.get_sample_value("process_resident_memory_bytes") is None
