"""Plugin discovery: source and action types registered under the ``rollbackd.*`` entry points."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from rollbackd.errors import PluginError

T = TypeVar("T")


@dataclass(slots=True)
class Registry(Generic[T]):
    """Types of one entry-point group, by type name; built-ins come through the same door."""

    group: str
    _loaded: dict[str, T] | None = field(default=None, init=False, repr=False)
    _extra: dict[str, T] = field(default_factory=dict, init=False, repr=False)

    def register(self, name: str, plugin: T) -> None:
        """Add a type by hand (tests, embedding); entry points remain the normal way."""
        self._extra[name] = plugin

    def names(self) -> list[str]:
        """Every known type name, sorted."""
        return sorted({*self._entries(), *self._extra})

    def get(self, name: str) -> T:
        """The plugin registered as ``name``, or PluginError naming the known ones."""
        if name in self._extra:
            return self._extra[name]
        plugins = self._entries()
        if name not in plugins:
            known = ", ".join(self.names()) or "none"
            raise PluginError(f"unknown type {name!r} (known: {known})")
        return plugins[name]

    def _entries(self) -> dict[str, T]:
        if self._loaded is None:
            loaded: dict[str, T] = {}
            for ep in entry_points(group=self.group):
                try:
                    loaded[ep.name] = ep.load()
                except (ImportError, AttributeError) as exc:
                    raise PluginError(
                        f"{self.group} plugin {ep.name!r} ({ep.value}) cannot be loaded: {exc}"
                    ) from exc
            self._loaded = loaded
        return self._loaded
