"""File actions: flag.file and route.file edit what they must, keep the rest, write atomically."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
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
from rollbackd.plan import attempt_once
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


# --- a target that blocks (issue 11, item 3) ----------------------------------------------


def _release_readers(fifo: Path) -> None:
    """Give any thread stuck opening ``fifo`` for reading a writer, so it sees EOF and ends."""
    for _ in range(100):
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody is waiting to read any more
            return
        os.close(fd)
        time.sleep(0.01)


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    """A FIFO where a flag or env file should be (a reader of it blocks until a writer comes)."""
    path = tmp_path / "flags.json"
    os.mkfifo(path)
    yield path
    _release_readers(path)


@pytest.mark.parametrize("kind", ["flag.file", "route.file"])
async def test_fifo_target_fails_fast_and_threads_do_not_grow(fifo: Path, kind: str) -> None:
    """A FIFO target is refused at once, naming it; repeated attempts leave no thread behind."""
    action = flag_action(fifo) if kind == "flag.file" else route_action(fifo)
    before = threading.active_count()
    for _ in range(8):
        started = time.monotonic()
        ok, detail, _ = await attempt_once(action, context(), 1.0)  # type: ignore[arg-type]
        assert (ok, detail) == (
            False,
            f"{fifo} is a FIFO (named pipe), not a regular file: point the action at the "
            "file its readers load",
        )
        assert time.monotonic() - started < 0.5
    assert threading.active_count() <= before + 1  # at most the action's own worker
    await action.aclose()
    assert fifo.exists()  # not replaced by a regular file either


@pytest.fixture
def hung_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Make every file write hang like one to a dead NFS mount, until the test releases it."""
    release = threading.Event()
    monkeypatch.setattr("rollbackd.actions.files.atomic_write", lambda path, data: release.wait(60))
    yield release
    release.set()


async def test_hung_file_system_holds_one_thread_and_starves_nothing(
    tmp_path: Path, hung_writes: threading.Event
) -> None:
    """A write stuck in the kernel holds one thread: later attempts fail fast, saying so.

    No thread is added per attempt, and the loop's default executor stays free.
    """
    path = tmp_path / "traffic.env"
    path.write_text(ENV)
    action = route_action(path)
    action.pool.stuck_after = 0.2
    before = threading.active_count()
    ok, detail, _ = await attempt_once(action, context(), 0.3)
    assert (ok, detail) == (False, "timed out after 0.3s")
    await asyncio.sleep(0.2)  # the stuck write is now older than stuck_after
    for _ in range(10):
        ok, detail, _ = await attempt_once(action, context(), 0.3)
        assert not ok
        assert "still blocked in an earlier call: edit of" in detail
        assert "the file system may be hung" in detail
    assert threading.active_count() <= before + 1
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.run_in_executor(None, lambda: "free"), 1.0) == "free"
    await action.aclose()


STOP_SCRIPT = """
import asyncio, sys, threading
from pathlib import Path
import rollbackd.actions.files as files
from rollbackd.plan import attempt_once
from tests.test_actions_files import context, route_action

files.atomic_write = lambda path, data: threading.Event().wait()  # a write that never returns

async def main():
    action = route_action(Path(sys.argv[1]))
    print(await attempt_once(action, context(), 0.5), flush=True)
    await action.aclose()

asyncio.run(main())
print("stopped", flush=True)
"""


def test_process_with_a_stuck_file_write_still_exits(tmp_path: Path) -> None:
    """A stopping daemon is not held by a file action's thread stuck in a write."""
    path = tmp_path / "traffic.env"
    path.write_text(ENV)
    result = subprocess.run(
        [sys.executable, "-c", STOP_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
        cwd=Path(__file__).parent.parent,
    )
    assert result.stdout.splitlines() == ["(False, 'timed out after 0.5s', True)", "stopped"]
    assert result.returncode == 0, result.stderr


async def test_route_file_value_already_set_in_quotes_is_left_alone(tmp_path: Path) -> None:
    """A KEY line that already holds the value, however quoted, is not rewritten (no diff)."""
    path = tmp_path / "traffic.env"
    text = "# stage\nBOOP_TRAFFIC_PERCENT=\"0\"\nOTHER='x y'\n"
    path.write_text(text)
    inode = path.stat().st_ino
    detail = await route_action(path).run(context())
    assert detail == f"BOOP_TRAFFIC_PERCENT already '0' in {path}"
    assert (path.read_text(), path.stat().st_ino) == (text, inode)
    await route_action(path, key="OTHER", value="x y").run(context())
    assert path.read_text() == text
