"""Puts a config together with the plugin registries: typed options, their checks, built parts.

``config.py`` knows the TOML's shape; this module knows which source and action types exist.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from rollbackd.actions import Action, ActionType, ReadsSources, action_types
from rollbackd.config import Config, PluginTable, cross_check, parse
from rollbackd.config import from_dict as parse_dict
from rollbackd.errors import ActionError, ConfigError, PluginError, SecretError
from rollbackd.options import secret_refs
from rollbackd.plugins import Registry
from rollbackd.problems import dotted, lines
from rollbackd.sources import Source, SourceType, source_types

K = TypeVar("K", SourceType, ActionType)


@dataclass(frozen=True, slots=True)
class Registries:
    """The source and action types a config may name; tests hand in their own."""

    sources: Registry[SourceType] = field(default_factory=source_types)
    actions: Registry[ActionType] = field(default_factory=action_types)


@dataclass(frozen=True, slots=True)
class Part(Generic[K]):
    """One ``[sources.NAME]`` or ``[actions.NAME]`` table: its type and validated options."""

    kind: K
    options: Any
    """The type's options model, validated (``kind.options``)."""


@dataclass(frozen=True, slots=True)
class Assembly:
    """A checked config with every source and action resolved to its type and options."""

    config: Config
    sources: Mapping[str, Part[SourceType]]
    actions: Mapping[str, Part[ActionType]]

    def build_sources(self) -> dict[str, Source]:
        """Build every configured source (no I/O until each starts)."""
        return {name: part.kind.build(name, part.options) for name, part in self.sources.items()}

    def build_actions(self) -> dict[str, Action]:
        """Build every configured action (no I/O until each runs)."""
        return {name: part.kind.build(name, part.options) for name, part in self.actions.items()}

    def build_action(self, name: str) -> Action:
        """Build one action; ActionError when there is none of that name."""
        part = self.actions.get(name)
        if part is None:
            raise ActionError(f"no action named {name!r} in [actions]")
        return part.kind.build(name, part.options)

    def sources_for(self, action: Action) -> dict[str, Source]:
        """Build the sources an action reads (``wait``), each told what to watch; most read none."""
        sources: dict[str, Source] = {}
        for read in action.watches() if isinstance(action, ReadsSources) else ():
            part = self.sources.get(read.source)
            if part is None:
                raise ActionError(
                    f"action {action.name} reads source {read.source!r}, which is not configured"
                )
            if read.source not in sources:
                sources[read.source] = part.kind.build(read.source, part.options)
            sources[read.source].watch(f"action:{action.name}", read)
        return sources

    def secret_values(self) -> list[str]:
        """Every secret the plugin options name, read now (unreadable ones are left out)."""
        found = []
        password = self.config.daemon.state_password
        if password is not None:  # the state store's password (PostgreSQL)
            with contextlib.suppress(SecretError):
                found.append(password.reveal())
        for section, parts in (("sources", self.sources), ("actions", self.actions)):
            for name, part in parts.items():
                for _, ref in secret_refs(part.options, (section, name)):
                    try:
                        found.append(ref.reveal())
                    except SecretError:
                        continue
        return found

    def with_state_dir(self, state_dir: Path) -> Assembly:
        """The same assembly with ``daemon.state_dir`` replaced (a reload cannot move it)."""
        daemon = self.config.daemon.model_copy(update={"state_dir": state_dir})
        return replace(self, config=self.config.model_copy(update={"daemon": daemon}))

    def resolves(self, action: str) -> bool:
        """The action's type tells people (an alert), so it hears of a re-arm."""
        part = self.actions.get(action)
        return part is not None and part.kind.resolves


def load(
    path: Path | str, *, secrets: bool = True, registries: Registries | None = None
) -> Assembly:
    """Read, validate and cross-check a config file; ConfigError lists every problem.

    ``secrets=False`` skips reading the secrets (``status`` and ``rearm`` need none).
    """
    return assemble(parse(path), secrets=secrets, registries=registries)


def from_dict(
    raw: dict[str, Any],
    path: Path | None = None,
    sha256: str = "",
    *,
    secrets: bool = True,
    registries: Registries | None = None,
) -> Assembly:
    """Validate and assemble an already-parsed TOML document (tests and the demo)."""
    return assemble(parse_dict(raw, path, sha256), secrets=secrets, registries=registries)


def assemble(
    config: Config, *, secrets: bool = True, registries: Registries | None = None
) -> Assembly:
    """Resolve every plugin table of ``config``; ConfigError lists every problem."""
    registries = registries or Registries()
    sources: dict[str, Part[SourceType]] = {}
    actions: dict[str, Part[ActionType]] = {}
    problems = list(cross_check(config))
    problems += _resolve(config.sources, "sources", registries.sources, sources)
    problems += _resolve(config.actions, "actions", registries.actions, actions)
    assembly = Assembly(config, sources, actions)
    problems += _check_reads(assembly)
    problems += _verify(assembly)
    if secrets:
        problems += _check_secrets(assembly)
    if problems:
        where = str(config.path) if config.path else "<config>"
        raise ConfigError([f"{where}: {line}" for line in problems])
    return assembly


def _resolve(
    tables: Mapping[str, PluginTable],
    section: str,
    registry: Registry[K],
    into: dict[str, Part[K]],
) -> Iterator[str]:
    """Look each table's type up and validate its options against the type's model."""
    for name, table in tables.items():
        try:
            kind = registry.get(table.type)
        except PluginError as exc:
            yield f"{section}.{name}.type: {exc}"
            continue
        model: type[BaseModel] = kind.options
        try:
            into[name] = Part(kind, model.model_validate(table.options()))
        except ValidationError as exc:
            for line in lines("", exc, prefix=(section, name)):
                yield line.removeprefix(": ")


def _check_reads(assembly: Assembly) -> Iterator[str]:
    """Rules, and actions reading a source (``wait``): the source exists, the keys fit it."""
    for name, monitor in assembly.config.monitors.items():
        for i, rule in enumerate(monitor.rules):
            yield from _check_read(assembly, f"monitors.{name}.rules[{i}]", rule)
    for name, part in assembly.actions.items():
        yield from _check_read(assembly, f"actions.{name}", part.options)


def _check_read(assembly: Assembly, at: str, read: object) -> Iterator[str]:
    source = getattr(read, "source", None)
    if not isinstance(source, str):
        return
    if source not in assembly.config.sources:
        yield f"{at}.source: no source named {source!r} in [sources]"
        return
    part = assembly.sources.get(source)
    if part is None:
        return  # the source's own problem is already reported
    required = part.kind.rule_keys
    kind = assembly.config.sources[source].type
    for key in ("query", "topic"):
        present = getattr(read, key, None) is not None
        if key in required and not present:
            yield f"{at}.{key}: required for {kind} sources"
        elif key not in required and present:
            yield f"{at}.{key}: not used by {kind} sources"
    for key, needs in (("json_field", "topic"), ("volume_field", "topic"), ("volume", "query")):
        if getattr(read, key, None) is not None and needs not in required:
            yield f"{at}.{key}: only used with {needs}-based sources"


def _verify(assembly: Assembly) -> Iterator[str]:
    """Each action type's own look at the world (a flag file that lacks the flag)."""
    for name, part in assembly.actions.items():
        if part.kind.verify is not None:
            for line in part.kind.verify(part.options):
                yield f"actions.{name}.{line}"


def _check_secrets(assembly: Assembly) -> Iterator[str]:
    password = assembly.config.daemon.state_password
    if password is not None:
        try:
            password.reveal()
        except SecretError as exc:
            yield f"daemon.state_password: {exc}"
    groups = (("sources", assembly.sources), ("actions", assembly.actions))
    for section, parts in groups:
        for name, part in parts.items():
            for loc, ref in secret_refs(part.options, (section, name)):
                try:
                    ref.reveal()
                except SecretError as exc:
                    yield f"{dotted(loc)}: {exc}"
