"""The running parts of one configuration: its sources, actions and monitors, built together.

A reload builds new parts next to the old ones and keeps each source whose table and readers
are unchanged, so its connection and latest values stay; the rest is retired.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from rollbackd.actions import Action, ReadsSources
from rollbackd.assemble import Assembly
from rollbackd.config import Config, MonitorConfig, RuleConfig
from rollbackd.engine import Phase
from rollbackd.monitor import MonitorRunner
from rollbackd.sources import ArrivalListener, Source

Watches = dict[str, frozenset[tuple[str, RuleConfig]]]
"""Per source, what reads it: ``(monitor, rule)`` and ``("action:NAME", read)`` pairs."""

RunnerFactory = Callable[[str, MonitorConfig, Mapping[str, Source]], MonitorRunner]


@dataclass(slots=True)
class Parts:
    """What runs for one assembly: built by ``start``, closed by ``close``."""

    assembly: Assembly
    sources: dict[str, Source] = field(default_factory=dict)
    actions: dict[str, Action] = field(default_factory=dict)
    monitors: dict[str, MonitorRunner] = field(default_factory=dict)
    watches: Watches = field(default_factory=dict)

    def kept_by(self, newer: Parts) -> list[str]:
        """Names of this set's sources that ``newer`` runs on (a reload kept them)."""
        return sorted(n for n, s in self.sources.items() if newer.sources.get(n) is s)

    def left_by(self, newer: Parts) -> tuple[list[Source], list[Action]]:
        """What ``newer`` does not use: to be closed once plans that hold it have finished."""
        kept = set(self.kept_by(newer))
        return [s for n, s in self.sources.items() if n not in kept], list(self.actions.values())


async def start(
    assembly: Assembly,
    runner: RunnerFactory,
    listener: ArrivalListener,
    running: Parts | None = None,
) -> Parts:
    """Build and start the parts of ``assembly``; all or nothing (what it started, it closes).

    A source of ``running`` is kept when its table and what reads it are unchanged.
    """
    config = assembly.config
    actions = assembly.build_actions()
    watches = watches_of(config, actions)
    reuse = {}
    if running is not None:
        reuse = {
            name: source
            for name, source in running.sources.items()
            if name in config.sources
            and config.sources[name] == running.assembly.config.sources.get(name)
            and watches.get(name) == running.watches.get(name)
        }
    sources: dict[str, Source] = dict(reuse)
    try:
        for name, part in assembly.sources.items():
            if name in reuse:
                continue
            source = sources[name] = part.kind.build(name, part.options)
            for watcher, read in watches.get(name, ()):
                source.watch(watcher, read)
            source.add_listener(listener)
            await source.start()
    except BaseException:
        await close([s for n, s in sources.items() if n not in reuse], list(actions.values()))
        raise
    monitors = {name: runner(name, monitor, sources) for name, monitor in config.monitors.items()}
    return Parts(assembly, sources, actions, monitors, watches)


async def close(sources: list[Source], actions: list[Action]) -> None:
    """Close sources, then actions."""
    for source in sources:
        await source.aclose()
    for action in actions:
        await action.aclose()


def watches_of(config: Config, actions: Mapping[str, Action]) -> Watches:
    """Per source, the monitors' rules and the actions' reads that it answers."""
    found: dict[str, set[tuple[str, RuleConfig]]] = {}
    for name, monitor in config.monitors.items():
        for rule in monitor.rules:
            found.setdefault(rule.source, set()).add((name, rule))
            if (volume := rule.volume_read()) is not None:  # from the same payloads, on push
                found.setdefault(rule.source, set()).add((name, volume))
    for name, action in actions.items():
        for read in action.watches() if isinstance(action, ReadsSources) else ():
            found.setdefault(read.source, set()).add((f"action:{name}", read))
    return {name: frozenset(pairs) for name, pairs in found.items()}


def holder(
    held_by: Sequence[str], monitors: Callable[[], Mapping[str, MonitorRunner]]
) -> Callable[[], str | None]:
    """What holds a monitor's rollback now (``held_by``): the first named one not ok."""

    def held() -> str | None:
        running = monitors()
        for name in held_by:
            runner = running.get(name)
            if runner is not None and runner.state.phase is not Phase.OK:
                return f"{name} ({runner.state.phase})"
        return None

    return held
