"""ROLLBACKD_<KEY> over the [daemon] table: the behaviour pydantic-settings gave, without it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from rollbackd.config import DaemonConfig, RateLimit, from_dict
from rollbackd.errors import ConfigError
from rollbackd.options import SecretRef
from rollbackd.overrides import overridden
from tests.helpers import loaded_by_import

WHERE = Path("/etc/rollbackd/rollbackd.toml")
POSTGRES = {"state": "postgresql://db.example:5432/rollbackd", "state_user": "rollbackd"}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ROLLBACKD_* variable of the calling shell leaks into these tests."""
    for name in [n for n in os.environ if n.upper().startswith("ROLLBACKD_")]:
        monkeypatch.delenv(name)


def daemon(table: dict[str, Any]) -> DaemonConfig:
    """The [daemon] table as ``parse`` reads it (the environment applied)."""
    return from_dict({"daemon": table}, path=WHERE).daemon


def problems(table: dict[str, Any]) -> list[str]:
    """The problem lines of a [daemon] table."""
    with pytest.raises(ConfigError) as caught:
        daemon(table)
    return caught.value.problems


def test_variable_names_match_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """rollbackd_mode and ROLLBACKD_MODE both name daemon.mode, and win over the file."""
    monkeypatch.setenv("rollbackd_mode", "armed")
    monkeypatch.setenv("Rollbackd_Environment", "staging")
    config = daemon({"mode": "dry-run", "environment": "production"})
    assert (config.mode, config.environment) == ("armed", "staging")
    assert config.model_fields_set == {"mode", "environment"}


def test_file_keys_match_in_any_case_and_unknown_ones_are_refused() -> None:
    """A [daemon] key written MODE is mode, as before; a key naming no field is an error."""
    assert daemon({"MODE": "armed", "environment": "staging"}).mode == "armed"
    assert problems({"bogus": 1}) == [f"{WHERE}: daemon.bogus: unknown key"]


def test_unknown_variables_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """ROLLBACKD_MONITOR (set for exec actions' children) and the like change nothing."""
    monkeypatch.setenv("ROLLBACKD_MONITOR", "payments")
    monkeypatch.setenv("ROLLBACKD_", "x")
    assert daemon({}) == DaemonConfig.model_validate({})


def test_plain_keys_take_the_text_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only table keys read JSON: a quoted environment name keeps its quotes."""
    monkeypatch.setenv("ROLLBACKD_ENVIRONMENT", '"staging"')
    monkeypatch.setenv("ROLLBACKD_HISTORY", "20")
    monkeypatch.setenv("ROLLBACKD_STATUS_TOKEN", "yes")
    monkeypatch.setenv("ROLLBACKD_REARM_COOLDOWN", "30s")
    config = daemon({})
    assert config.environment == '"staging"'
    assert (config.history, config.status_token, config.rearm_cooldown) == (20, True, 30.0)


def test_a_json_table_is_merged_into_the_file_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """ROLLBACKD_MAX_ROLLBACKS='{"count": 1}' keeps the file's per; keys match in any case."""
    table = {"max_rollbacks": {"count": 3, "per": "1h"}}
    monkeypatch.setenv("ROLLBACKD_MAX_ROLLBACKS", '{"count": 1}')
    assert daemon(table).max_rollbacks == RateLimit(count=1, per="1h")
    monkeypatch.setenv("ROLLBACKD_MAX_ROLLBACKS", '{"COUNT": 2, "Per": "10m"}')
    assert daemon(table).max_rollbacks == RateLimit(count=2, per="10m")
    monkeypatch.setenv("ROLLBACKD_MAX_ROLLBACKS", "null")  # JSON null leaves the file's value
    assert daemon(table).max_rollbacks == RateLimit(count=3, per="1h")


@pytest.mark.parametrize("text", ["3/h", "", "[1, 2]", "5"])
def test_a_table_that_is_not_one_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    """Text that is no JSON object reaches the key's validator, which names the variable."""
    monkeypatch.setenv("ROLLBACKD_MAX_ROLLBACKS", text)
    (problem,) = problems({})
    assert problem.startswith(f"{WHERE}: daemon.max_rollbacks: give a table such as")
    assert problem.endswith("(from $ROLLBACKD_MAX_ROLLBACKS)")


def test_a_secret_reference_comes_as_json_never_as_the_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ROLLBACKD_STATE_PASSWORD is a reference as JSON; a bare password is refused by name."""
    monkeypatch.setenv("ROLLBACKD_STATE_PASSWORD", '{"ENV": "RBD_PG_PASSWORD"}')
    assert daemon(POSTGRES).state_password == SecretRef(env="RBD_PG_PASSWORD")
    monkeypatch.setenv("ROLLBACKD_STATE_PASSWORD", "hunter2")
    (problem,) = problems(POSTGRES)
    assert "daemon.state_password: secrets are never written in the config" in problem
    assert problem.endswith("(from $ROLLBACKD_STATE_PASSWORD)")
    assert "hunter2" not in problem


def test_several_bad_variables_are_each_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bad variable gets its own line naming it."""
    monkeypatch.setenv("ROLLBACKD_MODE", "bogus")
    monkeypatch.setenv("ROLLBACKD_HISTORY", "0")
    found = problems({})
    assert len(found) == 2
    assert found[0].startswith(f"{WHERE}: daemon.mode: ")
    assert found[0].endswith("(from $ROLLBACKD_MODE)")
    assert found[1].startswith(f"{WHERE}: daemon.history: ")
    assert found[1].endswith("(from $ROLLBACKD_HISTORY)")


def test_validation_reads_the_environment_construct_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DaemonConfig(...) and model_validate read ROLLBACKD_*; model_construct does not."""
    monkeypatch.setenv("ROLLBACKD_LISTEN", "127.0.0.1:19999")
    assert DaemonConfig().listen == "127.0.0.1:19999"
    assert DaemonConfig(listen="127.0.0.1:1").listen == "127.0.0.1:19999"
    assert DaemonConfig.model_validate({}).listen == "127.0.0.1:19999"
    assert DaemonConfig.model_construct().listen == "127.0.0.1:9877"


def test_overridden_reads_the_given_environment() -> None:
    """The environment is a parameter (os.environ by default); nested tables merge."""
    given = {"State_Password": {"env": "A"}, "mode": "armed"}
    environ = {"X_STATE_PASSWORD": '{"env": "B"}', "x_mode": "dry-run", "OTHER": "1"}
    assert overridden(DaemonConfig, given, "X_", environ) == {
        "state_password": {"env": "B"},
        "mode": "dry-run",
    }
    assert overridden(DaemonConfig, given, "X_", {}) == {
        "state_password": {"env": "A"},
        "mode": "armed",
    }


def test_the_config_imports_no_pydantic_settings() -> None:
    """Loading the config model leaves pydantic-settings (and dotenv) out of the process."""
    assert loaded_by_import("rollbackd.config", ("pydantic_settings", "dotenv")) == []
