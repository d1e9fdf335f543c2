"""The synthetic source: deterministic per seed and offset, healthy first, then breaching."""

from __future__ import annotations

import pytest

from rollbackd.config import RuleConfig
from rollbackd.readings import ReadingStatus
from rollbackd.sources import source_types
from rollbackd.sources.synthetic import (
    METRICS,
    SYNTHETIC,
    Stage,
    SyntheticOptions,
    SyntheticSource,
    sample,
    stage_at,
)

T0 = 1_700_000_000.0

# The seed guide's thresholds (section 5): metric -> (direction, threshold).
THRESHOLDS = {
    "auth_error_rate": ("above", 1.0),
    "auth_response_time_ms": ("above", 3000.0),
    "auth_success_rate": ("below", 99.0),
    "payment_error_rate": ("above", 0.1),
    "payment_response_time_ms": ("above", 2000.0),
    "payment_success_rate": ("below", 99.5),
    "uptime": ("below", 99.0),
    "connection_failures_per_min": ("above", 5.0),
}


def breaches(metric: str, value: float) -> bool:
    """Tell whether ``value`` is past the guide's threshold for ``metric``."""
    direction, threshold = THRESHOLDS[metric]
    return value > threshold if direction == "above" else value < threshold


def stage(kind: str, duration: str | None = None) -> Stage:
    """Build a stage as the TOML would write it (an item of ``phases``)."""
    raw = {"kind": kind} if duration is None else {"kind": kind, "duration": duration}
    return Stage.model_validate(raw)


def rule(metric: str) -> RuleConfig:
    """Build a rule reading ``metric`` from the synthetic source."""
    return RuleConfig(name="r", source="sim", query=metric, above=1.0)


def make_source(**raw: object) -> SyntheticSource:
    """Build a synthetic source through the registry, as the daemon does."""
    kind = source_types().get("synthetic")
    source = kind.build("sim", kind.options.model_validate(raw))
    assert isinstance(source, SyntheticSource)
    return source


def test_entry_point_is_registered() -> None:
    """The ``synthetic`` entry point resolves to this module's SourceType needing ``query``."""
    assert source_types().get("synthetic") is SYNTHETIC
    assert SYNTHETIC.rule_keys == {"query"}


def test_phases_parse_from_toml_shapes() -> None:
    """Phases are inline tables with a kind and a duration string; only the last may omit it."""
    options = SyntheticOptions.model_validate(
        {"seed": 3, "phases": [{"kind": "healthy", "duration": "5s"}, {"kind": "outage"}]}
    )
    assert options.phases == (stage("healthy", "5s"), stage("outage"))
    with pytest.raises(ValueError, match="only the last phase"):
        SyntheticOptions.model_validate({"phases": [{"kind": "healthy"}, {"kind": "outage"}]})
    with pytest.raises(ValueError, match="Extra inputs"):
        SyntheticOptions.model_validate({"sead": 3})


def test_stage_at_walks_the_scenario() -> None:
    """Offsets map to the running stage and the time spent in it; the last stage holds."""
    stages = (stage("healthy", "10s"), stage("outage", "5s"))
    assert stage_at(stages, -3.0) == (stages[0], 0.0)
    assert stage_at(stages, 9.5) == (stages[0], 9.5)
    assert stage_at(stages, 12.0) == (stages[1], 2.0)
    assert stage_at(stages, 100.0) == (stages[1], 90.0)


def test_same_seed_and_offset_give_the_same_values() -> None:
    """Two generators with one seed agree at every offset; another seed differs somewhere."""
    a, b, c = (SyntheticOptions(seed=s) for s in (7, 7, 8))
    offsets = [i * 0.5 for i in range(120)]
    for metric in METRICS:
        series_a = [sample(a, metric, t) for t in offsets]
        assert series_a == [sample(b, metric, t) for t in offsets]
        assert series_a != [sample(c, metric, t) for t in offsets]


def test_default_scenario_is_healthy_then_breaching() -> None:
    """Healthy offsets never breach the guide's thresholds; the outage breaches every one."""
    for seed in range(5):
        options = SyntheticOptions(seed=seed)
        for metric in THRESHOLDS:
            healthy = [sample(options, metric, t / 4) for t in range(80)]  # 0 .. 19.75 s
            outage = [sample(options, metric, 40 + t / 4) for t in range(80)]
            assert not any(breaches(metric, v) for v in healthy if v is not None), metric
            assert all(v is not None and breaches(metric, v) for v in outage), metric


def test_degrading_moves_from_healthy_to_broken() -> None:
    """Without noise, a degrading phase is a straight line from the healthy to the broken level."""
    options = SyntheticOptions(noise=0, phases=(stage("degrading", "10s"),))
    profile = METRICS["auth_error_rate"]
    assert sample(options, "auth_error_rate", 0.0) == profile.healthy
    assert sample(options, "auth_error_rate", 5.0) == pytest.approx(
        (profile.healthy + profile.broken) / 2
    )
    assert sample(options, "auth_error_rate", 10.0) == profile.broken


def test_inflight_transactions_drain_to_zero_in_an_outage() -> None:
    """In-flight transactions are whole numbers that reach exactly 0 during an outage."""
    options = SyntheticOptions(phases=(stage("healthy", "5s"), stage("outage")))
    healthy = sample(options, "inflight_transactions", 1.0)
    assert healthy is not None
    assert healthy > 0
    assert healthy.is_integer()
    assert sample(options, "inflight_transactions", 5.0 + 10.0) == 0.0
    assert sample(options, "inflight_transactions", 5.0 + 60.0) == 0.0


async def test_read_is_relative_to_the_first_read() -> None:
    """Without ``start``, the first read is offset 0, so the outage arrives on schedule."""
    source = make_source(
        seed=1,
        phases=[{"kind": "healthy", "duration": "10s"}, {"kind": "outage"}],
    )
    await source.start()
    [first] = await source.read(rule("auth_error_rate"), T0)
    [later] = await source.read(rule("auth_error_rate"), T0 + 12)
    assert source.started_at == T0
    assert first.status is ReadingStatus.OK
    assert first.value is not None
    assert later.value is not None
    assert not breaches("auth_error_rate", first.value)
    assert breaches("auth_error_rate", later.value)
    assert later.value == sample(source.options, "auth_error_rate", 12)
    await source.aclose()


async def test_start_option_fixes_offset_zero() -> None:
    """With ``start``, offsets count from that unix time, whatever the first read's time."""
    source = make_source(seed=2, start=T0)
    [reading] = await source.read(rule("payment_success_rate"), T0 + 45)
    assert reading.value == sample(source.options, "payment_success_rate", 45)
    assert reading.at == T0 + 45


async def test_silent_phase_and_unknown_metric() -> None:
    """A silent phase reads no data; an unknown metric reads an error naming the known ones."""
    source = make_source(start=T0, phases=[{"kind": "silent"}])
    [silent] = await source.read(rule("uptime"), T0 + 1)
    assert silent.status is ReadingStatus.NO_DATA
    [unknown] = await source.read(rule("auth_error_ratio"), T0 + 1)
    assert unknown.status is ReadingStatus.ERROR
    assert "auth_error_rate" in unknown.reason


async def test_a_long_unknown_metric_is_echoed_truncated() -> None:
    """A 1 MB unknown metric name is named in the reason by its first 200 characters only."""
    [reading] = await make_source().read(rule("x" * 1_000_000), 0.0)
    assert reading.status is ReadingStatus.ERROR
    assert len(reading.reason) < 1000
    assert "x" * 200 + "…" in reading.reason
