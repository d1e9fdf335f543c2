"""What the config lets in: bounded durations, names that can be re-armed, a BOM, exposure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import TypeAdapter, ValidationError

from rollbackd import cli
from rollbackd.config import exposure_warnings, parse
from rollbackd.errors import ConfigError
from rollbackd.options import LONGEST_DURATION, Duration, bounded, parse_duration
from tests.test_config import MINIMAL, load, problems_of, write

# --- durations ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["99999999999999d", "1" + "0" * 400 + "s", "3651d", "87600h1h", "5000000000000000m"]
)
def test_huge_durations_are_refused_not_overflowed(text: str) -> None:
    """A duration too long to mean anything is a ValueError naming the cap, never inf."""
    with pytest.raises(ValueError, match="too long: at most 3650d"):
        parse_duration(text)


def test_the_longest_duration_parses() -> None:
    """Ten years exactly is still a duration."""
    assert parse_duration("3650d") == LONGEST_DURATION


@pytest.mark.parametrize(
    ("text", "ok"),
    [("1ms", True), ("30d", True), ("0.0000001s", False), ("0s", False), ("31d", False)],
)
def test_plugin_durations_are_bounded_generically(text: str, ok: bool) -> None:
    """``Duration`` (plugin options) takes 1ms to 30d."""
    adapter = TypeAdapter(Duration)
    if ok:
        assert adapter.validate_python(text) == parse_duration(text)
    else:
        with pytest.raises(ValidationError, match="out of range: give 1ms to 30d"):
            adapter.validate_python(text)


def test_bounded_is_a_building_block() -> None:
    """A plugin can give one of its keys its own bounds with ``bounded``."""
    adapter = TypeAdapter(Annotated[float, bounded("1s", "1h")])
    assert adapter.validate_python("1h") == 3600.0
    with pytest.raises(ValidationError, match="'2h' is out of range: give 1s to 1h"):
        adapter.validate_python("2h")


@pytest.mark.parametrize(
    ("old", "new", "key", "bounds"),
    [
        ('interval = "30s"', 'interval = "1ms"', "monitors.payments.interval", "50ms to 24h"),
        (
            'interval = "30s"',
            'interval = "0.0000001s"',
            "monitors.payments.interval",
            "50ms to 24h",
        ),
        ('interval = "30s"', 'interval = "25h"', "monitors.payments.interval", "50ms to 24h"),
        (
            "rollback_after = 5",
            'rollback_after = 5\nfailure_window = "500ms"',
            "monitors.payments.failure_window",
            "1s to 30d",
        ),
        (
            'value = "0"',
            'value = "0"\ntimeout = "10ms"',
            "actions.route-legacy.timeout",
            "100ms to 1h",
        ),
        (
            'value = "0"',
            'value = "0"\ntimeout = "2h"',
            "actions.route-legacy.timeout",
            "100ms to 1h",
        ),
    ],
)
def test_duration_keys_have_their_bounds(
    tmp_path: Path, old: str, new: str, key: str, bounds: str
) -> None:
    """Each duration key outside its documented bounds is one line naming the key and bounds."""
    path = write(tmp_path, MINIMAL.replace(old, new, 1))
    problems = problems_of(path)
    assert any(p.startswith(f"{path}: {key}: ") and bounds in p for p in problems), problems


def test_huge_interval_fails_check_config_not_run(tmp_path: Path) -> None:
    """``99999999999999d`` is a check-config error (it used to crash ``run`` with OverflowError)."""
    path = write(tmp_path, MINIMAL.replace('"30s"', '"99999999999999d"', 1))
    (line,) = problems_of(path)
    assert line.startswith(f"{path}: monitors.payments.interval: ")
    assert "too long" in line


# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("[monitors.payments]", '[monitors.".."]', 'monitors."..".'),
        ("[monitors.payments]", '[monitors.""]', 'monitors."".'),
        ("[monitors.payments]", '[monitors."a/b"]', 'monitors."a/b".'),
        ("[monitors.payments]", '[monitors.".hidden"]', 'monitors.".hidden".'),
        ("[monitors.payments]", f"[monitors.{'m' * 65}]", f"monitors.{'m' * 65}."),
        ("[sources.prom]", '[sources."p q"]', 'sources."p q".'),
        ("[actions.route-legacy]", '[actions."route legacy"]', 'actions."route legacy".'),
        ('name = "payment-error-rate"', 'name = "ü"', "monitors.payments.rules[0].name."),
    ],
)
def test_names_are_checked_naming_the_key(tmp_path: Path, old: str, new: str, key: str) -> None:
    """Names are 1-64 of [A-Za-z0-9_.-], not starting with a dot; the line names the key."""
    text = MINIMAL.replace(old, new, 1)
    if old == "[monitors.payments]":
        text = text.replace("[[monitors.payments.rules]]", f"[[{new[1:-1]}.rules]]")
    elif old == "[sources.prom]":
        text = text.replace('source = "prom"', f"source = {new[9:-1]}")
    elif old == "[actions.route-legacy]":
        text = text.replace('on_rollback = ["route-legacy"]', f"on_rollback = [{new[9:-1]}]")
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert any(
        p.startswith(f"{path}: {key[:-1]}: ") and "A-Z a-z 0-9 _ . -" in p for p in problems
    ), problems


def test_good_names_pass(tmp_path: Path) -> None:
    """Dots (not leading), dashes, underscores and 64 characters are fine."""
    name = "pay.ments_v2-" + "x" * 51
    text = MINIMAL.replace("monitors.payments", f"monitors.{name!r}".replace("'", '"'))
    assert len(name) == 64
    assert name in load(write(tmp_path, text)).monitors


# --- a BOM ----------------------------------------------------------------------------------


def test_bom_is_named_with_the_fix(tmp_path: Path) -> None:
    """A file starting with a UTF-8 BOM says so and how to remove it (not 'Invalid statement')."""
    path = tmp_path / "rollbackd.toml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.replace("{state}", str(tmp_path)).encode())
    with pytest.raises(ConfigError) as caught:
        parse(path)
    (line,) = caught.value.problems
    assert line.startswith(f"{path}: starts with a UTF-8 byte-order mark (BOM)")
    assert "sed -i" in line
    assert "Invalid statement" not in line


# --- exposure ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "status_token", "warned"),
    [
        ("0.0.0.0:9877", False, True),
        ("[::]:9877", False, True),
        ("10.1.2.3:9877", False, True),
        ("rollbackd.example:9877", False, True),
        ("0.0.0.0:9877", True, False),
        ("127.0.0.1:9877", False, False),
        ("127.0.0.2:9877", False, False),
        ("[::1]:9877", False, False),
        ("localhost:9877", False, False),
        ("", False, False),
    ],
)
def test_exposure_warnings(tmp_path: Path, listen: str, status_token: bool, warned: bool) -> None:
    """A non-loopback listen with an open /status warns, unless status_token = true."""
    extra = f'listen = "{listen}"\nstatus_token = {str(status_token).lower()}\n'
    text = MINIMAL.replace('mode = "dry-run"\n', f'mode = "dry-run"\n{extra}', 1)
    warnings = exposure_warnings(load(write(tmp_path, text)))
    assert bool(warnings) is warned
    if warned:
        assert warnings[0].startswith(f"daemon.listen: {listen} is not a loopback address")
        assert "status_token = true" in warnings[0]


def test_check_config_prints_the_exposure_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config prints the warning on stderr and still exits 0."""
    text = MINIMAL.replace('mode = "dry-run"\n', 'mode = "dry-run"\nlisten = "0.0.0.0:9877"\n')
    path = write(tmp_path, text)
    assert cli.main(["check-config", str(path)]) == 0
    captured = capsys.readouterr()
    assert f"{path}: ok" in captured.out
    assert f"{path}: warning: daemon.listen: 0.0.0.0:9877 is not a loopback" in captured.err


def test_demo_speed_is_bounded() -> None:
    """A demo --speed whose interval would be under the 50ms minimum is a usage error."""
    result = subprocess.run(
        [sys.executable, "-m", "rollbackd", "demo", "--speed", "1000"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--speed" in result.stderr
    assert "Traceback" not in result.stderr
