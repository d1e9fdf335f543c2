"""Plugin discovery: source and action types registered under the ``rollbackd.*`` entry points."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from rollbackd.errors import PluginError

T = TypeVar("T")


@dataclass(slots=True)
class Registry(Generic[T]):
    """Types of one entry-point group, by type name; built-ins come through the same door.

    Entry points are loaded one by one when asked for, so a broken third-party plugin only
    affects the configs that use it.
    """

    group: str
    _plugins: dict[str, T] = field(default_factory=dict, init=False, repr=False)
    _entries: dict[str, EntryPoint] | None = field(default=None, init=False, repr=False)

    def register(self, name: str, plugin: T) -> None:
        """Add a type by hand (tests, embedding); entry points remain the normal way."""
        self._plugins[name] = plugin

    def names(self) -> list[str]:
        """Every known type name, sorted."""
        return sorted({*self._entry_points(), *self._plugins})

    def get(self, name: str) -> T:
        """The plugin registered as ``name``, or PluginError naming the known ones."""
        if name in self._plugins:
            return self._plugins[name]
        entry = self._entry_points().get(name)
        if entry is None:
            known = ", ".join(self.names()) or "none"
            raise PluginError(f"unknown type {name!r} (known: {known})")
        try:
            plugin: T = entry.load()
        except (ImportError, AttributeError) as exc:
            raise PluginError(
                f"{self.group} plugin {name!r} ({entry.value}) cannot be loaded: {exc}"
            ) from exc
        self._plugins[name] = plugin
        return plugin

    def _entry_points(self) -> dict[str, EntryPoint]:
        if self._entries is None:
            self._entries = {ep.name: ep for ep in entry_points(group=self.group)}
        return self._entries
