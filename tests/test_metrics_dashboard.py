"""The metrics the dashboard needs besides the check counters: thresholds and action latency."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from rollbackd.config import MonitorConfig
from rollbackd.engine import MonitorState
from rollbackd.metrics import Metrics


def _monitor(*rules: dict[str, object]) -> MonitorConfig:
    return MonitorConfig.model_validate({"rules": list(rules)})


ERROR_RATE = {"name": "error-rate", "source": "prom", "query": "x", "above": 1.0}
SUCCESS_RATE = {"name": "success-rate", "source": "bus", "topic": "t", "below": 99.0}


def test_thresholds_follow_the_config_across_a_reload() -> None:
    """Each rule's threshold is exported with its direction; a reload's changes replace them."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, process=False)
    metrics.track("payments", _monitor(ERROR_RATE, SUCCESS_RATE), MonitorState())
    value = registry.get_sample_value
    labels = {"monitor": "payments", "rule": "error-rate", "direction": "above"}
    assert value("rollbackd_rule_threshold", labels) == 1.0
    below = {"monitor": "payments", "rule": "success-rate", "direction": "below"}
    assert value("rollbackd_rule_threshold", below) == 99.0
    metrics.track("payments", _monitor({**ERROR_RATE, "above": 2.5}), MonitorState())
    assert value("rollbackd_rule_threshold", labels) == 2.5
    assert value("rollbackd_rule_threshold", below) is None
    metrics.retain([])
    assert value("rollbackd_rule_threshold", labels) is None


def test_action_duration_is_a_histogram_per_action() -> None:
    """Every attempt's time lands in rollbackd_action_duration_seconds{action}."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, process=False)
    metrics.action_duration("route-legacy", 0.02)
    metrics.action_duration("route-legacy", 45.0)
    count = registry.get_sample_value(
        "rollbackd_action_duration_seconds_count", {"action": "route-legacy"}
    )
    assert count == 2
    fast = registry.get_sample_value(
        "rollbackd_action_duration_seconds_bucket", {"action": "route-legacy", "le": "0.025"}
    )
    assert fast == 1
