"""The Source protocol and the registry of source types (entry points ``rollbackd.sources``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from rollbackd.plugins import Registry

if TYPE_CHECKING:
    from rollbackd.config import RuleConfig
    from rollbackd.readings import Reading


@dataclass(frozen=True, slots=True)
class Arrival:
    """One value a push source received, for one monitor: judged as one check, on its own.

    The value travels with the arrival, so a check waiting behind others still judges its own
    sample, not whatever arrived last.
    """

    monitor: str
    source: str
    topic: str
    """Where the value came from (the concrete topic, for logs)."""
    readings: Mapping[str, Reading]
    """Per rule name of ``monitor``: the arrived series' reading (a wildcard's carries labels)."""


ArrivalListener = Callable[[Arrival], None]
"""Called once per received value and monitor whose rules it answers, in arrival order."""


class Source(Protocol):
    """A place numbers come from. ``read`` never raises: failures are readings with a reason.

    Optional: a class attribute ``local = True`` declares that ``read`` does no I/O (the
    synthetic and MQTT sources), so a monitor reads its rules in turn instead of in tasks.
    """

    name: str
    push: bool
    """True when values arrive by themselves (MQTT); such monitors evaluate on arrival."""

    def watch(self, monitor: str, rule: RuleConfig) -> None:
        """Declare, before ``start``, that ``monitor``'s ``rule`` reads this source."""

    def add_listener(self, listener: ArrivalListener) -> None:
        """Be told of each value a watched rule receives (an ``Arrival``); no-op for polls."""

    async def start(self) -> None:
        """Connect / subscribe; must return promptly even if the server is down."""

    async def aclose(self) -> None:
        """Stop every task and connection this source owns."""

    async def read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        """One reading per series the rule's query or topic yields at ``now``."""


@dataclass(frozen=True, slots=True)
class SourceType:
    """What a ``rollbackd.sources`` entry point names: an options model and a builder."""

    options: type[BaseModel]
    """Pydantic model of the type's keys in ``[sources.NAME]`` (without ``type``)."""
    rule_keys: frozenset[str]
    """Rule keys this type requires, e.g. ``{"query"}`` or ``{"topic"}``."""
    build: Callable[[str, Any], Source]
    """``build(name, validated_options)`` -> Source; no I/O until ``start``."""


def source_types() -> Registry[SourceType]:
    """A fresh registry of the installed source types (entry points ``rollbackd.sources``)."""
    return Registry("rollbackd.sources")
