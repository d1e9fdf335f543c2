"""File actions: flag.file and route.file edit what they must, keep the rest, write atomically."""

from __future__ import annotations

import json
import threading
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from rollbackd.actions.files import (
    FLAG_FILE,
    ROUTE_FILE,
    FlagFileAction,
    FlagFileOptions,
    RouteFileAction,
    RouteFileOptions,
)
from rollbackd.errors import ActionError
from tests import helpers

FLAGS: dict[str, Any] = {
    "$schema": "https://flagd.dev/schema/v0/flags.json",
    "flags": {
        "boop-payments": {
            "state": "ENABLED",
            "variants": {"on": True, "off": False},
            "defaultVariant": "on",
            "targeting": {"if": [{"in": ["@example.com", {"var": "email"}]}, "on", None]},
        },
        "other": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a"},
    },
}

ENV = """# BOOP rollout
BOOP_TRAFFIC_PERCENT=25
; legacy comment style
OTHER_SETTING="keep me"

LOG_LEVEL=info
"""


# The first attempt of step 0 of an armed rollback.
context = partial(
    helpers.context,
    incident_id="20260101T000000Z-payments-abcd",
    started_at=1.0,
    environment="test",
)


def flag_action(path: Path, flag: str = "boop-payments", variant: str = "off") -> FlagFileAction:
    """Build a flag.file action through its registered type."""
    options = FLAG_FILE.options.model_validate(
        {"path": str(path), "flag": flag, "variant": variant}
    )
    action = FLAG_FILE.build("stop-boop-traffic", options)
    assert isinstance(action, FlagFileAction)
    return action


def route_action(
    path: Path, value: str = "0", key: str = "BOOP_TRAFFIC_PERCENT"
) -> RouteFileAction:
    """Build a route.file action through its registered type."""
    options = ROUTE_FILE.options.model_validate({"path": str(path), "key": key, "value": value})
    action = ROUTE_FILE.build("route-legacy", options)
    assert isinstance(action, RouteFileAction)
    return action


@pytest.fixture
def flags_file(tmp_path: Path) -> Path:
    """Write the example flagd file."""
    path = tmp_path / "flags.json"
    path.write_text(json.dumps(FLAGS, indent=4))
    return path


async def test_flag_file_sets_default_variant_and_keeps_everything_else(flags_file: Path) -> None:
    """flag.file changes only the flag's defaultVariant; other keys and flags stay as they were."""
    detail = await flag_action(flags_file).run(context())
    after = json.loads(flags_file.read_text())
    expected = json.loads(json.dumps(FLAGS))
    expected["flags"]["boop-payments"]["defaultVariant"] = "off"
    assert after == expected
    assert "'on' -> 'off'" in detail


async def test_flag_file_repeat_is_a_no_op(flags_file: Path) -> None:
    """A second run (a retried or resumed attempt) finds the variant set and changes nothing."""
    action = flag_action(flags_file)
    await action.run(context())
    before = flags_file.stat()
    detail = await action.run(context())
    assert "already 'off'" in detail
    assert flags_file.stat().st_ino == before.st_ino  # not rewritten


@pytest.mark.parametrize(
    ("flag", "variant", "message"),
    [
        ("missing", "off", "flag 'missing' is not defined in"),
        ("boop-payments", "maybe", "has no variant 'maybe' (variants: off, on)"),
    ],
)
async def test_flag_file_unknown_flag_or_variant_is_a_clear_error(
    flags_file: Path, flag: str, variant: str, message: str
) -> None:
    """An unknown flag or variant fails with a message naming what exists; the file is untouched."""
    before = flags_file.read_bytes()
    with pytest.raises(ActionError) as caught:
        await flag_action(flags_file, flag, variant).run(context())
    assert message in str(caught.value)
    assert flags_file.read_bytes() == before


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), ("{not json", "not valid JSON"), ("[]", 'no "flags" object')],
)
async def test_flag_file_bad_file_is_a_clear_error(
    tmp_path: Path, content: str | None, message: str
) -> None:
    """A missing, unparsable or foreign flag file fails with the reason, writing nothing."""
    path = tmp_path / "flags.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ActionError, match=message):
        await flag_action(path).run(context())
    assert sorted(p.name for p in tmp_path.iterdir()) == (["flags.json"] if content else [])


async def test_route_file_sets_value_and_keeps_other_lines(tmp_path: Path) -> None:
    """route.file replaces the KEY line in place and leaves comments and other lines alone."""
    path = tmp_path / "traffic.env"
    path.write_text(ENV)
    detail = await route_action(path).run(context())
    assert path.read_text() == ENV.replace("BOOP_TRAFFIC_PERCENT=25", "BOOP_TRAFFIC_PERCENT=0")
    assert "BOOP_TRAFFIC_PERCENT=0 set" in detail


async def test_route_file_appends_missing_key_and_handles_export(tmp_path: Path) -> None:
    """A missing key is appended; an ``export KEY=`` line keeps its export; quotes when needed."""
    path = tmp_path / "traffic.env"
    path.write_text("export BOOP_TRAFFIC_PERCENT = 25\nA=1")
    await route_action(path).run(context())
    await route_action(path, key="MESSAGE", value="rolled back $now").run(context())
    assert path.read_text() == (
        'export BOOP_TRAFFIC_PERCENT=0\nA=1\nMESSAGE="rolled back \\$now"\n'
    )


async def test_route_file_creates_missing_file_but_not_directory(tmp_path: Path) -> None:
    """A missing env file is created; a missing directory is an error (likely a typo)."""
    path = tmp_path / "traffic.env"
    assert "created" in await route_action(path).run(context())
    assert path.read_text() == "BOOP_TRAFFIC_PERCENT=0\n"
    with pytest.raises(ActionError, match="does not exist"):
        await route_action(tmp_path / "nope" / "traffic.env").run(context())


def test_route_file_options_reject_bad_key_and_multiline_value() -> None:
    """Keys must be variable names and values single lines, caught when the config loads."""
    with pytest.raises(ValidationError, match="not a variable name"):
        RouteFileOptions(path=Path("/x"), key="BAD KEY", value="0")
    with pytest.raises(ValidationError, match="single line"):
        RouteFileOptions(path=Path("/x"), key="K", value="0\nEVIL=1")
    with pytest.raises(ValidationError, match="Extra inputs"):
        FlagFileOptions.model_validate({"path": "/x", "flag": "f", "variant": "v", "extra": 1})


async def test_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    """A reader parsing the files in a loop never fails while the actions rewrite them often."""
    flags = tmp_path / "flags.json"
    # Large enough that a non-atomic write would be observed half-done.
    big = {**FLAGS, "padding": ["x" * 100] * 2000}
    flags.write_text(json.dumps(big))
    env = tmp_path / "traffic.env"
    env.write_text(ENV)
    stop = threading.Event()
    errors: list[str] = []
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            try:
                document = json.loads(flags.read_text())
                assert document["flags"]["boop-payments"]["defaultVariant"] in {"on", "off"}
                lines = env.read_text().splitlines()
                assert sum(line.startswith("BOOP_TRAFFIC_PERCENT=") for line in lines) == 1
                assert "LOG_LEVEL=info" in lines
            except (ValueError, AssertionError, KeyError) as exc:
                errors.append(repr(exc))
            reads[0] += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        ctx = context()
        for i in range(60):
            await flag_action(flags, variant="off" if i % 2 else "on").run(ctx)
            await route_action(env, value=str(i)).run(ctx)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert reads[0] > 10
    assert json.loads(flags.read_text())["flags"]["boop-payments"]["defaultVariant"] == "off"
    assert "BOOP_TRAFFIC_PERCENT=59" in env.read_text()
