"""The Action protocol and the registry of action types (entry points ``rollbackd.actions``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from rollbackd.engine import Event
from rollbackd.plugins import Registry

if TYPE_CHECKING:
    from rollbackd.config import RuleConfig
    from rollbackd.sources import Source


@dataclass(frozen=True, slots=True)
class Incident:
    """What an action needs to know about the situation it acts on."""

    id: str
    monitor: str
    event: Event
    reason: str
    started_at: float
    mode: str  # "dry-run" or "armed"
    environment: str
    details: Mapping[str, Any] = field(default_factory=dict)
    """Triggering checks and other JSON-able context (alert bodies include it)."""


@dataclass(frozen=True, slots=True)
class ActionContext:
    """One attempt of one action: the incident, the plan step and an idempotency key."""

    incident: Incident
    step: int
    attempt: int
    idempotency_key: str  # f"{incident.id}:{step}": the same across retries and restarts
    sources: Mapping[str, Source] = field(default_factory=dict)
    deadline: float | None = None
    """Event-loop time (``loop.time()``) at which the plan runner cancels this attempt."""
    state_dir: Path | None = None
    """The daemon's state directory, for an action that must leave a note that outlives the
    process (e.g. the pid of a command still running); None outside the daemon."""


class Action(Protocol):
    """Something a plan step does. ``run`` returns a short detail or raises ActionError."""

    name: str

    async def run(self, ctx: ActionContext) -> str:
        """Do the thing once; raise ``ActionError`` with the reason when it did not happen."""

    async def aclose(self) -> None:
        """Release connections and sessions this action owns."""


@runtime_checkable
class ReadsSources(Protocol):
    """Optional, for actions that read sources (``wait``): push sources subscribe to these."""

    def watches(self) -> Sequence[RuleConfig]:
        """Rule-like reads, each naming its source."""


@dataclass(frozen=True, slots=True)
class ActionType:
    """What a ``rollbackd.actions`` entry point names: an options model and a builder."""

    options: type[BaseModel]
    """Pydantic model of the type's keys in ``[actions.NAME]`` (without type/timeout/retries)."""
    build: Callable[[str, Any], Action]
    """``build(name, validated_options)`` -> Action; no I/O until ``run``."""
    resolves: bool = False
    """It tells people (an alert): it hears of a re-arm, so the alert it raised resolves."""
    verify: Callable[[Any], Iterator[str]] | None = None
    """Optional ``check-config`` look at the world: ``verify(options)`` yields one problem per
    line as ``key: reason`` (e.g. ``flag: no flag 'x' in /etc/boop/flags.json``); it may read
    files but must not change anything."""


OptionsT = TypeVar("OptionsT", bound=BaseModel)


@dataclass(slots=True)
class OptionsAction(Generic[OptionsT]):
    """The shape most actions share: a name, validated options, nothing to release.

    Built as ``Cls(name, options)``, so the class itself can be its ``ActionType.build``.
    """

    name: str
    options: OptionsT

    async def aclose(self) -> None:
        """Nothing to release: each attempt owns what it opens."""


def action_types() -> Registry[ActionType]:
    """A fresh registry of the installed action types (entry points ``rollbackd.actions``)."""
    return Registry("rollbackd.actions")


__all__ = [
    "Action",
    "ActionContext",
    "ActionType",
    "Event",
    "Incident",
    "OptionsAction",
    "ReadsSources",
    "action_types",
]
