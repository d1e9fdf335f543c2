"""The configuration contract: the example loads, and every class of bad input names its key."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollbackd import assemble, cli
from rollbackd.assemble import Assembly, Registries, from_dict
from rollbackd.config import Config
from rollbackd.errors import ConfigError, SecretError
from rollbackd.options import Frozen, SecretRef, parse_duration
from rollbackd.sources import SourceType
from tests.helpers import config_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"

MINIMAL = """
[daemon]
mode = "dry-run"
state_dir = "{state}"

[sources.prom]
type = "prometheus"
url = "http://127.0.0.1:9090"

[monitors.payments]
interval = "30s"
rollback_after = 5
on_rollback = ["route-legacy"]

[[monitors.payments.rules]]
name = "payment-error-rate"
source = "prom"
query = "sum(rate(boop_payment_failures_total[5m]))"
above = 0.1

[actions.route-legacy]
type = "route.file"
path = "{state}/traffic.env"
key = "BOOP_TRAFFIC_PERCENT"
value = "0"
"""


class _SecretOptions(Frozen):
    token: SecretRef


REGISTRIES = Registries()
REGISTRIES.sources.register(
    "test.secret",
    SourceType(options=_SecretOptions, rule_keys=frozenset({"query"}), build=lambda n, o: o),
)


def assembled(path: Path, *, secrets: bool = True) -> Assembly:
    """Load and assemble ``path`` with the installed types and this file's test types."""
    return assemble.load(path, secrets=secrets, registries=REGISTRIES)


def load(path: Path, *, secrets: bool = True) -> Config:
    """The checked Config of ``path`` (every check, plugin options included)."""
    return assembled(path, secrets=secrets).config


def write(tmp_path: Path, text: str) -> Path:
    """Write a config into tmp_path, with {state} replaced by tmp_path."""
    return config_file(tmp_path, text.replace("{state}", str(tmp_path)))


def problems_of(path: Path) -> list[str]:
    """The problem lines load() reports for path."""
    with pytest.raises(ConfigError) as caught:
        load(path)
    return caught.value.problems


def test_example_config_loads_with_every_seed_threshold() -> None:
    """The shipped example is valid and carries the seed's eight thresholds in three monitors."""
    config = load(EXAMPLE)
    assert set(config.monitors) == {"authentication", "payments", "infrastructure"}
    thresholds = {
        (rule.name, rule.direction, rule.threshold)
        for monitor in config.monitors.values()
        for rule in monitor.rules
    }
    assert thresholds == {
        ("auth-error-rate", "above", 1.0),
        ("auth-response-time", "above", 3000.0),
        ("auth-success-rate", "below", 99.0),
        ("payment-error-rate", "above", 0.1),
        ("payment-response-time", "above", 2000.0),
        ("payment-success-rate", "below", 99.5),
        ("uptime", "below", 99.0),
        ("connection-failures", "above", 5.0),
    }
    assert all(m.rollback_after == 5 for m in config.monitors.values())
    assert config.daemon.mode == "dry-run"
    assert len(config.sha256) == 64


def test_minimal_config_loads(tmp_path: Path) -> None:
    """A small valid file loads with typed durations and validated plugin options."""
    assembly = assembled(write(tmp_path, MINIMAL))
    assert assembly.config.monitors["payments"].interval == 30.0
    assert set(assembly.sources) == {"prom"}
    assert set(assembly.actions) == {"route-legacy"}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("24h", 86400.0), ("1h30m", 5400.0)],
)
def test_durations_parse(text: str, seconds: float) -> None:
    """Duration strings of the contract become seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["30", "5 minutes", "-5s", "s", "", "1m30", 30])
def test_bad_durations_are_rejected(bad: object) -> None:
    """Anything but number+unit strings is refused with a hint."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("old", "new", "key", "reason"),
    [
        pytest.param(
            'interval = "30s"',
            'interval = "30s"\nintervall = "1m"',
            "monitors.payments.intervall",
            "unknown key",
            id="unknown-key",
        ),
        pytest.param(
            "rollback_after = 5",
            'rollback_after = "five"',
            "monitors.payments.rollback_after",
            "integer",
            id="wrong-type",
        ),
        pytest.param(
            'interval = "30s"',
            'interval = "30 seconds"',
            "monitors.payments.interval",
            "invalid duration",
            id="bad-duration",
        ),
        pytest.param(
            'on_rollback = ["route-legacy"]',
            'on_rollback = ["route-legacy", "route-leagcy"]',
            "monitors.payments.on_rollback[1]",
            "no action named 'route-leagcy'",
            id="dangling-action",
        ),
        pytest.param(
            'source = "prom"',
            'source = "promm"',
            "monitors.payments.rules[0].source",
            "no source named 'promm'",
            id="dangling-source",
        ),
        pytest.param(
            "above = 0.1",
            "above = 0.1\nbelow = 99.5",
            "monitors.payments.rules[0]",
            "exactly one of above / below",
            id="both-above-below",
        ),
        pytest.param(
            "above = 0.1",
            'unit = "%"',
            "monitors.payments.rules[0]",
            "exactly one of above / below",
            id="neither-above-below",
        ),
        pytest.param(
            "rollback_after = 5",
            "rollback_after = -1",
            "monitors.payments.rollback_after",
            "greater than or equal to 1",
            id="negative-count",
        ),
        pytest.param(
            "rollback_after = 5",
            "rollback_after = 0",
            "monitors.payments.rollback_after",
            "greater than or equal to 1",
            id="zero-count",
        ),
        pytest.param(
            'value = "0"',
            'value = "0"\nretries = -2',
            "actions.route-legacy.retries",
            "greater than or equal to 0",
            id="negative-retries",
        ),
        pytest.param(
            'type = "route.file"',
            'type = "route.carrier-pigeon"',
            "actions.route-legacy.type",
            "unknown type",
            id="unknown-action-type",
        ),
        pytest.param(
            'query = "sum(rate(boop_payment_failures_total[5m]))"',
            'topic = "boop/payments"',
            "monitors.payments.rules[0].query",
            "required for prometheus",
            id="rule-key-for-type",
        ),
        pytest.param(
            'mode = "dry-run"',
            'mode = "live"',
            "daemon.mode",
            "'dry-run' or 'armed'",
            id="bad-mode",
        ),
        pytest.param(
            'value = "0"',
            'value = "0"\n\n[actions.drain]\ntype = "wait"\nsource = "prom"\ntopic = "boop/x"',
            "actions.drain.query",
            "required for prometheus",
            id="wait-key-for-source-type",
        ),
        pytest.param(
            'value = "0"',
            'value = "0"\n\n[actions.drain]\ntype = "wait"\nsource = "promm"\nquery = "x"',
            "actions.drain.source",
            "no source named 'promm'",
            id="wait-dangling-source",
        ),
        pytest.param(
            'url = "http://127.0.0.1:9090"',
            'url = "https://127.0.0.1:9090"\nca_file = "/nonexistent/ca.pem"',
            "sources.prom.ca_file",
            "cannot read /nonexistent/ca.pem",
            id="missing-ca-file",
        ),
    ],
)
def test_bad_input_names_the_key(tmp_path: Path, old: str, new: str, key: str, reason: str) -> None:
    """Each class of bad input gives a line with the file, the dotted key and the reason."""
    assert old in MINIMAL
    path = write(tmp_path, MINIMAL.replace(old, new, 1))
    problems = problems_of(path)
    assert any(line.startswith(f"{path}: {key}: ") and reason in line for line in problems), (
        problems
    )


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    """Independent problems are listed together, one line each."""
    text = MINIMAL.replace('source = "prom"', 'source = "nowhere"').replace(
        'on_rollback = ["route-legacy"]', 'on_rollback = ["gone"]'
    )
    problems = problems_of(write(tmp_path, text))
    assert len(problems) == 2


def test_broken_toml_gives_line_and_column(tmp_path: Path) -> None:
    """Invalid TOML is one line with the position, not a traceback."""
    path = write(tmp_path, MINIMAL.replace('interval = "30s"', "interval = 30s"))
    (line,) = problems_of(path)
    assert line.startswith(f"{path}: invalid TOML")
    assert "line 11" in line
    assert "column" in line


def test_missing_file_is_named(tmp_path: Path) -> None:
    """A missing config file is reported with its path and the OS reason."""
    path = tmp_path / "nope.toml"
    (line,) = problems_of(path)
    assert line == f"{path}: cannot read config file: No such file or directory"


def test_secret_must_not_be_inline(tmp_path: Path) -> None:
    """A secret written inline in TOML is refused, with the key and what to use instead."""
    text = MINIMAL + '\n[sources.vault]\ntype = "test.secret"\ntoken = "hunter2"\n'
    problems = problems_of(write(tmp_path, text))
    assert any(p.split(": ")[1] == "sources.vault.token" and "never written" in p for p in problems)
    assert not any("hunter2" in p for p in problems)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_secret_file_unprivileged(tmp_path: Path) -> None:
    """A secret file without read permission is named with its key (non-root run)."""
    secret = tmp_path / "token"
    secret.write_text("s3cret")
    secret.chmod(0)
    text = MINIMAL + f'\n[sources.vault]\ntype = "test.secret"\ntoken = {{ file = "{secret}" }}\n'
    problems = problems_of(write(tmp_path, text))
    assert any("sources.vault.token: cannot read secret file" in p for p in problems)


def test_unreadable_secret_file(tmp_path: Path) -> None:
    """A secret file that cannot be read (here: it is a directory) is named with its key."""
    secret = tmp_path / "token-dir"
    secret.mkdir()
    text = MINIMAL + f'\n[sources.vault]\ntype = "test.secret"\ntoken = {{ file = "{secret}" }}\n'
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert (
        f"{path}: sources.vault.token: cannot read secret file {secret}: Is a directory" in problems
    )


def test_secret_from_env_and_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Secrets resolve from the environment and from $CREDENTIALS_DIRECTORY, and fail clearly."""
    monkeypatch.setenv("ROLLBACKD_TEST_TOKEN", "abc")
    assert SecretRef(env="ROLLBACKD_TEST_TOKEN").reveal() == "abc"
    (tmp_path / "prom-token").write_text("xyz\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert SecretRef(credential="prom-token").reveal() == "xyz"
    monkeypatch.delenv("ROLLBACKD_TEST_TOKEN")
    with pytest.raises(SecretError, match="ROLLBACKD_TEST_TOKEN is not set"):
        SecretRef(env="ROLLBACKD_TEST_TOKEN").reveal()


def test_armed_production_needs_confirmation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Armed in production is refused unless confirmed in the file or the environment."""
    monkeypatch.delenv("ROLLBACKD_CONFIRM_PRODUCTION", raising=False)
    path = write(tmp_path, MINIMAL.replace('mode = "dry-run"', 'mode = "armed"'))
    assert any("daemon.mode: armed in production" in p for p in problems_of(path))
    monkeypatch.setenv("ROLLBACKD_CONFIRM_PRODUCTION", "true")
    assert load(path).daemon.armed


def test_environment_overrides_daemon_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ROLLBACKD_<KEY> overrides the [daemon] table of the file."""
    monkeypatch.setenv("ROLLBACKD_LISTEN", "127.0.0.1:19999")
    monkeypatch.setenv("ROLLBACKD_ENVIRONMENT", "staging")
    config = load(write(tmp_path, MINIMAL))
    assert config.daemon.listen == "127.0.0.1:19999"
    assert config.daemon.environment == "staging"


def test_check_config_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config exits 0 on the example, 1 naming keys on a bad file, 2 on bad usage."""
    assert cli.main(["check-config", str(EXAMPLE)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = write(tmp_path, MINIMAL.replace("rollback_after = 5", "rollback_after = 0"))
    assert cli.main(["check-config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: monitors.payments.rollback_after:" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as usage:
        cli.main(["check-config"])
    assert usage.value.code == 2


def test_config_is_immutable(tmp_path: Path) -> None:
    """Loaded configs are frozen values."""
    config = load(write(tmp_path, MINIMAL))
    with pytest.raises(ValueError, match="frozen"):
        config.monitors["payments"].rollback_after = 3  # type: ignore[misc]
    assert isinstance(config, Config)


def test_bad_environment_override_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad ROLLBACKD_* value is reported once, on its key, naming the variable."""
    monkeypatch.setenv("ROLLBACKD_MODE", "bogus")
    path = write(tmp_path, MINIMAL)
    problems = problems_of(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}: daemon.mode: ")
    assert problems[0].endswith("(from $ROLLBACKD_MODE)")


@pytest.mark.parametrize("environment", ["production", "Production", "prod", " PROD "])
def test_production_guard_is_not_fooled_by_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, environment: str
) -> None:
    """Armed is refused in production however the environment name is capitalised."""
    monkeypatch.delenv("ROLLBACKD_CONFIRM_PRODUCTION", raising=False)
    text = MINIMAL.replace('mode = "dry-run"', f'mode = "armed"\nenvironment = "{environment}"')
    assert any("armed in production" in p for p in problems_of(write(tmp_path, text)))


def test_secrets_can_be_skipped_for_read_only_commands(tmp_path: Path) -> None:
    """Status and rearm load the config without reading secrets they do not use."""
    text = MINIMAL + '\n[sources.vault]\ntype = "test.secret"\ntoken = { env = "ROLLBACKD_NOPE" }\n'
    path = write(tmp_path, text)
    assert any("ROLLBACKD_NOPE is not set" in p for p in problems_of(path))
    assert "vault" in load(path, secrets=False).sources


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_no_input_gives_anything_but_config_error(data: st.DataObject) -> None:
    """Any value at any key of a valid config is accepted or a ConfigError: never a traceback."""
    raw = tomllib.loads(EXAMPLE.read_text())
    node: Any = raw
    path: list[str | int] = []
    while isinstance(node, dict | list) and node and data.draw(st.booleans(), "deeper"):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = data.draw(st.sampled_from(keys), "key")
        path.append(key)
        if not isinstance(node[key], dict | list):
            break
        node = node[key]
    target: Any = raw
    for key in path[:-1]:
        target = target[key]
    value = data.draw(_VALUES, "value")
    if path:
        target[path[-1]] = value
    else:
        raw[data.draw(st.text(max_size=8), "new key")] = value
    problems = ["<config>: accepted"]
    try:
        from_dict(raw)
    except ConfigError as exc:
        problems = exc.problems
    assert problems
    assert all(line.startswith("<config>: ") for line in problems)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ('volume = "sum(x)"', "volume (or volume_field) and min_volume go together"),
        ("min_volume = 10", "volume (or volume_field) and min_volume go together"),
        ('volume_field = "n"\nmin_volume = 10', "volume_field: only used with topic-based"),
        ('volume = "x"\nmin_volume = -1', "min_volume: Input should be greater than or equal"),
    ],
)
def test_volume_guard_keys_are_checked(tmp_path: Path, change: str, problem: str) -> None:
    """A volume guard needs both its keys, on the kind of source it fits."""
    text = MINIMAL.replace("above = 0.1", f"above = 0.1\n{change}")
    assert any(problem in p for p in problems_of(write(tmp_path, text))), problems_of(
        write(tmp_path, text)
    )


def test_held_by_names_existing_monitors_without_a_cycle(tmp_path: Path) -> None:
    """held_by names a monitor that exists; a cycle of holds is refused, naming it."""
    text = MINIMAL.replace("rollback_after = 5", 'rollback_after = 5\nheld_by = ["nope"]')
    assert any(
        "held_by[0]: no monitor named 'nope'" in p for p in problems_of(write(tmp_path, text))
    )
    looped = MINIMAL.replace("rollback_after = 5", 'rollback_after = 5\nheld_by = ["payments"]')
    assert any("a cycle (payments -> payments)" in p for p in problems_of(write(tmp_path, looped)))


def test_example_config_uses_the_guards() -> None:
    """The example holds payments and authentication on infrastructure and guards rate rules."""
    config = load(EXAMPLE)
    for name in ("payments", "authentication"):
        assert config.monitors[name].held_by == ["infrastructure"]
    guarded = {
        rule.name
        for monitor in config.monitors.values()
        for rule in monitor.rules
        if rule.volume is not None and rule.min_volume is not None
    }
    assert guarded == {"auth-error-rate", "payment-error-rate", "payment-success-rate"}
