"""A poll source the test scripts: each rule reads ``VALUES[rule.query]`` (or an error).

Shared by the page and contrib tests; registered as ``test.scripted-values`` in ``REGISTRIES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rollbackd import readings
from rollbackd.assemble import Registries
from rollbackd.config import RuleConfig
from rollbackd.options import Frozen
from rollbackd.readings import Reading
from rollbackd.sources import ArrivalListener, SourceType

KIND = "test.scripted-values"

VALUES: dict[str, float] = {}
"""The value each query reads now; a query not in it reads no data."""
FAILING: dict[str, str] = {}
"""Queries whose read fails, with the reason."""


class ScriptedOptions(Frozen):
    """No options: the test sets values in ``VALUES`` / ``FAILING``."""


@dataclass
class PolledStub:
    """A poll source with nothing to subscribe to, connect or close: subclasses ``read``."""

    name: str
    push: bool = False

    def watch(self, monitor: str, rule: RuleConfig) -> None:
        """Nothing to subscribe to."""

    def add_listener(self, listener: ArrivalListener) -> None:
        """Polled: nothing arrives by itself."""

    async def start(self) -> None:
        """Nothing to connect."""

    async def aclose(self) -> None:
        """Nothing to close."""


@dataclass
class ScriptedSource(PolledStub):
    """A poll source answering from ``VALUES`` and ``FAILING``."""

    async def read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        """Answer from the script."""
        query = rule.query or ""
        if query in FAILING:
            return [readings.error(FAILING[query], now)]
        if query not in VALUES:
            return []
        return [readings.ok(VALUES[query], now)]


def reset() -> None:
    """Forget every scripted value and failure."""
    VALUES.clear()
    FAILING.clear()


REGISTRIES = Registries()
REGISTRIES.sources.register(
    KIND,
    SourceType(ScriptedOptions, frozenset({"query"}), lambda name, _options: ScriptedSource(name)),
)
