"""flagd / OpenFeature flag documents (JSON or YAML): check a flag and set its default variant.

An edit replaces only the bytes of the ``defaultVariant`` value, so a hand-written file in
git shows a one-line diff; every other byte, comment and key order stays as it was.
"""

from __future__ import annotations

import copy
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, MappingNode, ScalarNode
from ruamel.yaml.error import YAMLError

from rollbackd.errors import ActionError

YAML_SUFFIXES = (".yaml", ".yml")
_JSON = json.JSONDecoder()
_YAML_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
# Words some YAML readers (YAML 1.1: Go's yaml.v2, PyYAML) take for booleans or null.
_YAML_SPECIAL = re.compile(r"(?i)y|n|yes|no|on|off|true|false|null")


def is_yaml(path: Path) -> bool:
    """Tell whether ``path`` names a YAML flag file (by its suffix, as flagd does)."""
    return path.suffix.lower() in YAML_SUFFIXES


def parse(text: str, path: Path) -> Any:
    """The flag document in ``text`` as plain data; ActionError when it does not parse."""
    if is_yaml(path):
        try:
            return YAML(typ="safe", pure=True).load(text)
        except YAMLError as exc:
            raise ActionError(f"flag file {path} is not valid YAML: {exc}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ActionError(f"flag file {path} is not valid JSON: {exc}") from exc


def problem(document: Any, path: Path, flag: str, variant: str) -> tuple[str, str] | None:
    """``(key, reason)`` when the document lacks the flag or the variant, else None."""
    flags = document.get("flags") if isinstance(document, dict) else None
    if not isinstance(flags, dict):
        return "path", f'flag file {path} has no "flags" object'
    definition = flags.get(flag)
    if not isinstance(definition, dict):
        known = ", ".join(sorted(map(str, flags))) or "none"
        return "flag", f"flag {flag!r} is not defined in {path} (flags: {known})"
    variants = definition.get("variants")
    if not isinstance(variants, dict) or variant not in variants:
        known = ", ".join(sorted(map(str, variants))) if isinstance(variants, dict) else "none"
        return "variant", f"flag {flag!r} in {path} has no variant {variant!r} (variants: {known})"
    return None


def set_default_variant(text: str | None, path: Path, flag: str, variant: str) -> tuple[str, str]:
    """Return the flag file ``text`` with ``flag``'s defaultVariant set, and a detail."""
    if text is None:
        raise ActionError(f"flag file {path} does not exist: create it, or fix the action's path")
    document = parse(text, path)
    if found := problem(document, path, flag, variant):
        raise ActionError(found[1])
    before = document["flags"][flag].get("defaultVariant")
    if before == variant:
        return text, f"flag {flag} already {variant!r} in {path}"
    expected = copy.deepcopy(document)
    expected["flags"][flag]["defaultVariant"] = variant
    edit = _edit_yaml if is_yaml(path) else _edit_json
    new = edit(text, flag, variant)
    if new is None or parse(new, path) != expected:
        new = _rewrite_yaml(text, flag, variant) if is_yaml(path) else None
    if new is None or parse(new, path) != expected:
        raise ActionError(
            f"cannot set flag {flag!r} in {path} without changing other values "
            "(an unusual layout, e.g. a YAML alias): set defaultVariant by hand"
        )
    return new, f"flag {flag}: {before!r} -> {variant!r} in {path}"


# --- JSON: edit the text at the value's position ---------------------------------------


@dataclass(frozen=True, slots=True)
class _Member:
    """One ``"key": value`` of a JSON object, by position in the text."""

    key: str
    key_start: int
    separator: str  # between the key's closing quote and the value, e.g. ": "
    start: int
    end: int


def _skip(text: str, i: int) -> int:
    """The index of the first non-whitespace character at or after ``i``."""
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    return i


def _members(text: str, brace: int) -> list[_Member]:
    """The members of the (valid) JSON object whose ``{`` is at ``text[brace]``."""
    members: list[_Member] = []
    i = _skip(text, brace + 1)
    while text[i] != "}":
        key_start = i
        key, key_end = _JSON.raw_decode(text, i)
        start = _skip(text, _skip(text, key_end) + 1)  # past the ":"
        _, end = _JSON.raw_decode(text, start)
        members.append(_Member(key, key_start, text[key_end:start], start, end))
        i = _skip(text, end)
        if text[i] == ",":
            i = _skip(text, i + 1)
    return members


def _member(text: str, brace: int, key: str) -> _Member | None:
    """The member ``key`` of an object (the last one, as a JSON reader keeps duplicates)."""
    found = [m for m in _members(text, brace) if m.key == key]
    return found[-1] if found else None


def _edit_json(text: str, flag: str, variant: str) -> str | None:
    value = json.dumps(variant, ensure_ascii=False)
    flags = _member(text, _skip(text, 0), "flags")
    definition = flags and _member(text, flags.start, flag)
    if not definition:
        return None
    current = _member(text, definition.start, "defaultVariant")
    if current is not None:
        return text[: current.start] + value + text[current.end :]
    # No defaultVariant yet: add one after the last member, laid out like the first.
    members = _members(text, definition.start)
    first, last = members[0], members[-1]
    indent = text[definition.start + 1 : first.key_start]
    added = f",{indent}{json.dumps('defaultVariant')}{first.separator}{value}"
    return text[: last.end] + added + text[last.end :]


# --- YAML: edit the scalar at its position; a round-trip rewrite keeps comments else ---


def _edit_yaml(text: str, flag: str, variant: str) -> str | None:
    try:
        root = YAML(typ="rt", pure=True).compose(text)
    except YAMLError:
        return None
    node: Any = root
    for key in ("flags", flag, "defaultVariant"):
        if not isinstance(node, MappingNode):
            return None
        node = next((v for k, v in reversed(node.value) if k.value == key), None)
    if not isinstance(node, ScalarNode):
        return None  # the result is checked by reading it back: a wrong guess is caught
    start, end = node.start_mark.index, node.end_mark.index
    return text[:start] + _yaml_scalar(variant, node.style) + text[end:]


def _yaml_scalar(value: str, style: str | None) -> str:
    """``value`` as a YAML scalar in the original's quoting style where that is safe."""
    if style == "'":
        return "'" + value.replace("'", "''") + "'"
    if style is None and _YAML_PLAIN.fullmatch(value) and not _YAML_SPECIAL.fullmatch(value):
        return value
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a YAML double-quoted one


def _rewrite_yaml(text: str, flag: str, variant: str) -> str | None:
    """Round-trip the document through ruamel.yaml: comments and order stay, layout may not."""
    yaml = YAML(typ="rt", pure=True)
    yaml.preserve_quotes = True
    try:
        document = yaml.load(text)
        document["flags"][flag]["defaultVariant"] = variant
    except (YAMLError, KeyError, TypeError):
        return None
    out = io.StringIO()
    yaml.dump(document, out)
    return out.getvalue()
