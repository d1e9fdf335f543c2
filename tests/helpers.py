"""What several test files build the same way: action contexts, async waits, config files.

The real servers live in ``tests/servers.py``; this module starts nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from rollbackd.actions import ActionContext, Event, Incident
from rollbackd.assemble import Assembly, Registries
from rollbackd.daemon import Daemon
from rollbackd.sources import Source


def context(
    *,
    incident_id: str = "20261125T120000Z-payments-ab12",
    event: Event = Event.ROLLBACK,
    reason: str = "5 failing checks",
    started_at: float = 1_795_000_000.0,
    environment: str = "staging",
    details: Mapping[str, Any] | None = None,
    step: int = 0,
    attempt: int = 1,
    sources: Mapping[str, Source] | None = None,
    deadline: float | None = None,
) -> ActionContext:
    """One attempt of plan step ``step`` of an armed incident of monitor payments.

    The idempotency key is ``{incident_id}:{step}``, as the plan runner makes it.
    """
    incident = Incident(
        id=incident_id,
        monitor="payments",
        event=event,
        reason=reason,
        started_at=started_at,
        mode="armed",
        environment=environment,
        details=details or {},
    )
    return ActionContext(
        incident,
        step,
        attempt,
        f"{incident_id}:{step}",
        sources=sources or {},
        deadline=deadline,
    )


async def wait_until(
    condition: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``condition`` on the event loop until it is truthy; fail the test at ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.01)


def daemon_table(
    state_dir: Path | str,
    *,
    mode: str | None = "armed",
    environment: str | None = "staging",
    listen: str | None = "",
) -> dict[str, Any]:
    """The ``[daemon]`` table; a key given as None is left out, so its default applies."""
    keys = {"mode": mode, "environment": environment, "state_dir": str(state_dir), "listen": listen}
    return {key: value for key, value in keys.items() if value is not None}


def payment_error_rate(
    source: str, query: str, *, above: float = 0.1, unit: str | None = "%"
) -> dict[str, Any]:
    """The payments monitor's ``payment-error-rate`` rule, read from ``source``."""
    rule = {"name": "payment-error-rate", "source": source, "query": query, "above": above}
    return rule if unit is None else {**rule, "unit": unit}


def stop_traffic(flags: Path) -> dict[str, Any]:
    """The ``flag.file`` action that turns the ``boop-payments`` flag off in ``flags``."""
    return {"type": "flag.file", "path": str(flags), "flag": "boop-payments", "variant": "off"}


def route_legacy(env_file: Path) -> dict[str, Any]:
    """The ``route.file`` action that sets ``BOOP_TRAFFIC_PERCENT=0`` in ``env_file``."""
    return {
        "type": "route.file",
        "path": str(env_file),
        "key": "BOOP_TRAFFIC_PERCENT",
        "value": "0",
    }


def to_toml(raw: Mapping[str, Any]) -> str:
    """A tiny TOML writer for config documents: tables, ``rules`` arrays, inline tables."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return str(v)

    def table(prefix: str, data: dict[str, Any]) -> None:
        scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and k != "rules"}
        lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for key, sub in data.items():
            if isinstance(sub, dict):
                table(f"{prefix}.{json.dumps(key)}", sub)
        for rule in data.get("rules", []):
            lines.append(f"[[{prefix}.rules]]")
            lines.extend(f"{k} = {value(v)}" for k, v in rule.items())

    for section, data in raw.items():
        if section == "daemon":
            table("daemon", data)
        else:
            for name, sub in data.items():
                table(f"{section}.{json.dumps(name)}", sub)
    return "\n".join(lines) + "\n"


def config_file(directory: Path, config: str | Mapping[str, Any]) -> Path:
    """Write ``config`` (TOML text, or a document for :func:`to_toml`) to ``rollbackd.toml``."""
    path = directory / "rollbackd.toml"
    text = config if isinstance(config, str) else to_toml(config)
    path.write_text(text, encoding="utf-8")
    return path


async def running(
    assembly: Assembly,
    body: Callable[[Daemon], Awaitable[None]],
    registries: Registries | None = None,
) -> None:
    """Serve an in-process daemon on ``assembly``, run ``body`` against it, stop it cleanly."""
    daemon = Daemon(assembly, registry=CollectorRegistry(), registries=registries)
    serving = asyncio.create_task(daemon.serve())
    try:
        await asyncio.wait_for(daemon.ready.wait(), 10)
        await body(daemon)
    finally:
        daemon.stop()
        assert await asyncio.wait_for(serving, 30) == 0
