"""Flag documents: flag.file changes one value's bytes in JSON or YAML; check-config reads them."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import pytest

from rollbackd.actions import ActionContext, Event, Incident
from rollbackd.actions.files import FLAG_FILE, FlagFileOptions
from rollbackd.assemble import from_dict
from rollbackd.errors import ConfigError

# Hand-written: two-space and four-space indents mixed, arrays on one line, no trailing
# newline habits of json.dumps; a rewrite by json.dumps would touch most of these lines.
HAND_WRITTEN = """{
  "$schema": "https://flagd.dev/schema/v0/flags.json",
  "flags": {
    "boop-payments": {
      "state": "ENABLED",
      "variants": { "on": true, "off": false },
      "defaultVariant": "on",
      "targeting": { "if": [ { "in": ["@example.com", { "var": "email" }] }, "on", null ] }
    },
    "other": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a"},
    "checkout-v2": {
        "state"   : "DISABLED",
        "variants": {"new": "v2", "old": "v1", "ünïcode": "ü"},
        "defaultVariant":"old"
    }
  },
  "$evaluators": { "emails": { "in": ["@example.com", "@boop.test"] } }
}
"""

YAML_FLAGS = """# BOOP flags, edited by hand; rollbackd flips defaultVariant on rollback.
flags:
  boop-payments:   # the payment integration
    state: ENABLED
    variants:
      on: true
      off: false
    defaultVariant: 'on'  # 'on' during the 5 % stage
  other:
    state: ENABLED
    variants: {a: 1, b: 2}
    defaultVariant: a
"""


def context() -> ActionContext:
    """Build the context of a first attempt of step 0 of an armed rollback."""
    incident = Incident(
        id="20260101T000000Z-payments-abcd",
        monitor="payments",
        event=Event.ROLLBACK,
        reason="5 failing checks",
        started_at=1.0,
        mode="armed",
        environment="test",
    )
    return ActionContext(incident, 0, 1, f"{incident.id}:0")


async def set_variant(path: Path, flag: str, variant: str) -> str:
    """Run flag.file once on ``path`` and return its detail."""
    options = FLAG_FILE.options.model_validate(
        {"path": str(path), "flag": flag, "variant": variant}
    )
    action = FLAG_FILE.build("flag", options)
    try:
        return await action.run(context())
    finally:
        await action.aclose()


def changed_lines(before: str, after: str) -> list[str]:
    """The ``-``/``+`` lines of a unified diff between two texts."""
    diff = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
    return [line for line in diff if line[:1] in "-+" and line[:3] not in ("---", "+++")]


@pytest.mark.parametrize(
    ("flag", "variant", "old_line", "new_line"),
    [
        ("boop-payments", "off", '"defaultVariant": "on",', '"defaultVariant": "off",'),
        ("other", "b", '"defaultVariant": "a"}', '"defaultVariant": "b"}'),
        ("checkout-v2", "ünïcode", '"defaultVariant":"old"', '"defaultVariant":"ünïcode"'),
    ],
)
async def test_json_flag_change_is_a_one_line_diff(
    tmp_path: Path, flag: str, variant: str, old_line: str, new_line: str
) -> None:
    """Setting one variant in a hand-written JSON file changes only that value's bytes."""
    path = tmp_path / "flags.json"
    path.write_text(HAND_WRITTEN, encoding="utf-8")
    await set_variant(path, flag, variant)
    after = path.read_text(encoding="utf-8")
    [removed, added] = changed_lines(HAND_WRITTEN, after)
    assert old_line in removed
    assert added == removed.replace(old_line, new_line).replace("-", "+", 1)
    assert after == HAND_WRITTEN.replace(old_line, new_line)


async def test_json_flag_without_default_variant_gets_one_added(tmp_path: Path) -> None:
    """A flag lacking defaultVariant gets it after its last key; nothing else changes."""
    text = '{\n  "flags": {\n    "f": {\n      "state": "ON",\n      "variants": {"x": 1}\n    }\n'
    text += "  }\n}\n"
    path = tmp_path / "flags.json"
    path.write_text(text)
    await set_variant(path, "f", "x")
    after = path.read_text()
    assert after == text.replace('"x": 1}', '"x": 1},\n      "defaultVariant": "x"')
    assert json.loads(after)["flags"]["f"]["defaultVariant"] == "x"


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
async def test_yaml_flag_change_keeps_comments_and_quoting(tmp_path: Path, suffix: str) -> None:
    """A YAML flag file is edited in place: one line differs, comments and quotes stay."""
    path = tmp_path / f"flags{suffix}"
    path.write_text(YAML_FLAGS)
    detail = await set_variant(path, "boop-payments", "off")
    after = path.read_text()
    assert after == YAML_FLAGS.replace("defaultVariant: 'on'  #", "defaultVariant: 'off'  #")
    assert "'on' -> 'off'" in detail
    await set_variant(path, "other", "b")
    assert sorted(changed_lines(YAML_FLAGS, path.read_text())) == [
        "+    defaultVariant: 'off'  # 'on' during the 5 % stage",
        "+    defaultVariant: b",
        "-    defaultVariant: 'on'  # 'on' during the 5 % stage",
        "-    defaultVariant: a",
    ]


async def test_yaml_plain_value_that_readers_may_take_for_a_boolean_is_quoted(
    tmp_path: Path,
) -> None:
    """A plain ``off`` would be false to YAML 1.1 readers (Go's yaml.v2): it is written quoted."""
    path = tmp_path / "flags.yaml"
    path.write_text("flags:\n  f:\n    variants: {'on': 1, 'off': 0}\n    defaultVariant: 'on'\n")
    path.write_text(path.read_text().replace("defaultVariant: 'on'", "defaultVariant: x"))
    path.write_text(path.read_text().replace("{'on': 1", "{'x': 2, 'on': 1"))
    await set_variant(path, "f", "off")
    assert path.read_text().endswith('defaultVariant: "off"\n')


async def test_yaml_syntax_error_is_named(tmp_path: Path) -> None:
    """A YAML file that does not parse fails the step saying so; the file is untouched."""
    path = tmp_path / "flags.yaml"
    path.write_text("flags: [unclosed\n")
    with pytest.raises(Exception, match="not valid YAML"):
        await set_variant(path, "f", "off")
    assert path.read_text() == "flags: [unclosed\n"


# --- check-config ------------------------------------------------------------------------


def verify(path: Path, flag: str = "boop-payments", variant: str = "off") -> list[str]:
    """The lines FLAG_FILE.verify yields for these options."""
    assert FLAG_FILE.verify is not None
    return list(FLAG_FILE.verify(FlagFileOptions(path=path, flag=flag, variant=variant)))


def test_verify_names_a_missing_flag_or_variant(tmp_path: Path) -> None:
    """check-config reports an existing flag file lacking the flag or the variant."""
    path = tmp_path / "flags.json"
    path.write_text(HAND_WRITTEN)
    assert verify(path) == []
    [line] = verify(path, flag="boop-paymnts")
    assert line.startswith(f"flag: flag 'boop-paymnts' is not defined in {path} (flags: ")
    [line] = verify(path, variant="of")
    assert (
        line == f"variant: flag 'boop-payments' in {path} has no variant 'of' (variants: off, on)"
    )


def test_verify_accepts_a_missing_file_and_names_a_broken_one(tmp_path: Path) -> None:
    """A missing file may be created later; a broken file or a FIFO is named under ``path``."""
    assert verify(tmp_path / "later.json") == []
    broken = tmp_path / "broken.yaml"
    broken.write_text("flags: [\n")
    [line] = verify(broken)
    assert line.startswith("path: flag file")
    assert "not valid YAML" in line
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    assert verify(fifo) == [
        f"path: {fifo} is a FIFO (named pipe), not a regular file: point the action at "
        "the file its readers load"
    ]


def test_check_config_reports_the_flag_file_problem_with_its_key(tmp_path: Path) -> None:
    """Assembling a config runs verify: the problem carries the action's dotted key."""
    path = tmp_path / "flags.json"
    path.write_text(HAND_WRITTEN)
    raw = {
        "daemon": {"state_dir": str(tmp_path / "state"), "listen": ""},
        "actions": {
            "stop": {"type": "flag.file", "path": str(path), "flag": "boop", "variant": "off"}
        },
    }
    with pytest.raises(ConfigError) as caught:
        from_dict(raw, tmp_path / "rollbackd.toml")
    [problem] = caught.value.problems
    assert problem.startswith(f"{tmp_path / 'rollbackd.toml'}: actions.stop.flag: flag 'boop'")
