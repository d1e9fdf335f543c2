"""The TOML configuration contract as pydantic models; ``parse(path)`` returns its shape.

Every problem becomes one line naming the file, the dotted key and the reason. This module
knows no plugin: ``assemble`` resolves the source and action types and their options.
"""

from __future__ import annotations

import codecs
import datetime as dt
import hashlib
import ipaddress
import math
import os
import re
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from rollbackd.errors import ConfigError
from rollbackd.options import CaFile, Frozen, SecretRef, bounded
from rollbackd.overrides import overridden
from rollbackd.problems import dotted, lines
from rollbackd.rollouts import Spec
from rollbackd.windows import Freeze, Window, parse_instant, parse_window

NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
"""Names of monitors, rules, sources and actions: they travel in URLs, file names and logs."""

NAME_RULE = "1 to 64 of A-Z a-z 0-9 _ . - and not starting with a dot"


# Per-key bounds (README, "Durations"): below the minimum a key does harm (a check loop
# that only logs warnings), above the maximum it is a typo that would never fire.
Interval = Annotated[float, bounded("50ms", "24h")]
FailureWindow = Annotated[float, bounded("1s", "30d")]
ActionTimeout = Annotated[float, bounded("100ms", "1h")]
GiveUpAfter = Annotated[float, bounded("1ms", "7d")]
RateWindow = Annotated[float, bounded("1m", "30d")]
RearmCooldown = Annotated[float, bounded("1s", "7d")]


class RateLimit(Frozen):
    """``max_rollbacks = { count = 3, per = "1h" }``: past ``count`` plans in ``per``, they wait."""

    count: int = Field(ge=1, le=1000, strict=True)
    per: RateWindow


class DaemonConfig(BaseModel):
    """``[daemon]``; every key can be overridden by ``ROLLBACKD_<KEY>`` in the environment."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    mode: Literal["dry-run", "armed"] = "dry-run"
    environment: str = "production"
    confirm_production: bool = False
    state_dir: Path = Path("/var/lib/rollbackd")
    listen: str = "127.0.0.1:9877"
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    history: int = Field(default=50, ge=1, le=10_000)
    """Recent checks kept per monitor (status, incident records)."""
    status_token: bool = False
    """/status and /metrics need the control token too (/health stays open)."""
    max_rollbacks: RateLimit | None = None
    """Rollback plans allowed to run by themselves within a window; later ones wait for
    ``rollbackd approve``. From the environment as JSON: ``{"count": 3, "per": "1h"}``."""
    rearm_cooldown: RearmCooldown | None = None
    """After a re-arm, a rollback incident opened within this long waits for it to pass."""
    state: str = ""
    """Shared state of a high-availability group: ``postgresql://host:port/db?sslmode=...``
    (no credentials in it); "" keeps the SQLite store in ``state_dir``."""
    state_user: str = ""
    """The PostgreSQL role (``state`` only)."""
    state_password: SecretRef | None = None
    """The role's password, a secret reference (``{ env = "RBD_PG_PASSWORD" }``)."""
    state_ca_file: CaFile | None = None
    """CA bundle verifying the server (``sslmode=verify-full``/``verify-ca``)."""

    def __init__(self, **values: Any) -> None:
        """The TOML table's keys (any case) with ``ROLLBACKD_<KEY>`` variables over them.

        pydantic runs this for ``model_validate`` too; ``model_construct`` reads nothing.
        """
        super().__init__(**overridden(type(self), values, "ROLLBACKD_"))

    @property
    def is_production(self) -> bool:
        """``environment`` names production (``production`` or ``prod``, any case)."""
        return self.environment.strip().lower() in {"production", "prod"}

    @property
    def armed(self) -> bool:
        """True when actions really run."""
        return self.mode == "armed"

    def listen_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the HTTP surface, or None when ``listen = ""``."""
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @field_validator("max_rollbacks", mode="before")
    @classmethod
    def _rate_limit_table(cls, value: object) -> object:
        if value is None or isinstance(value, dict | RateLimit):
            return value
        raise ValueError(
            'give a table such as { count = 3, per = "1h" } '
            '(in the environment, JSON: {"count": 3, "per": "1h"})'
        )

    @model_validator(mode="after")
    def _check_state(self) -> DaemonConfig:
        if not self.state:
            extra = [
                k for k in ("state_user", "state_password", "state_ca_file") if getattr(self, k)
            ]
            if extra:
                given = ", ".join(extra)
                raise ValueError(f'{given} only apply with state = "postgresql://..."')
            return self
        problem = state_url_problem(self.state)
        if problem:
            raise ValueError(f"state: {problem}")
        if not self.state_user:
            raise ValueError('state_user is required with state = "postgresql://..."')
        return self

    @model_validator(mode="after")
    def _check_listen(self) -> DaemonConfig:
        if self.listen:
            host, sep, port = self.listen.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f'listen must be "HOST:PORT" or "", not {self.listen!r}')
        return self


def state_url_problem(url: str) -> str:
    """What is wrong with a ``daemon.state`` URL ("" when nothing); never repeats the URL."""
    parts = urlsplit(url)
    if parts.scheme not in {"postgresql", "postgres"}:
        return 'give a PostgreSQL URL, "postgresql://host:port/database?sslmode=verify-full"'
    if "@" in parts.netloc:
        return (
            "credentials in the URL are refused (they would be shown wherever the URL is): "
            'remove "user:password@" and use state_user and state_password = { env = "VAR" }'
        )
    if not parts.hostname:
        return "the URL names no host"
    try:
        parts.port  # noqa: B018 -- raises on a bad port
    except ValueError:
        return "the URL's port is not a number from 1 to 65535"
    if not parts.path.strip("/"):
        return "the URL names no database (postgresql://host:port/DATABASE)"
    return ""


class HaConfig(Frozen):
    """``[ha]``: how daemons sharing a PostgreSQL ``daemon.state`` elect the one that acts."""

    takeover_after: Annotated[float, bounded("200ms", "10m")] = 5.0
    """A standby takes over within this long of the leader's loss."""
    node: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128)
    """This daemon's name among its peers (/status ``peers``); the host name by default."""


VOLUME = "volume:"
"""Name prefix of a rule's volume read (written names cannot hold ':', so none collides)."""


class RuleConfig(Frozen):
    """One threshold on one metric of one source."""

    name: str
    """Written names follow ``NAME`` (checked on the file; built-in reads use ``wait:NAME``)."""
    source: str
    query: str | None = None
    topic: str | None = None
    json_field: str | None = None
    above: float | None = None
    below: float | None = None
    unit: str = ""
    no_data: Literal["inconclusive", "breach", "ok"] = "inconclusive"
    volume: str | None = None
    """Query giving, per series, the number of events behind the figure (query sources)."""
    volume_field: str | None = None
    """JSON field of the payload holding that number (topic sources)."""
    min_volume: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    """Below it (or without a volume) a series is ``insufficient``: inconclusive, not judged."""
    shadow: bool = False
    """Evaluated and shown, never counted toward a rollback (its own ``shadow_failures``)."""

    @model_validator(mode="after")
    def _one_direction(self) -> RuleConfig:
        if (self.above is None) == (self.below is None):
            raise ValueError("give exactly one of above / below")
        threshold = self.threshold
        if math.isnan(threshold) or math.isinf(threshold):
            raise ValueError("the threshold must be a finite number")
        if self.volume is not None and self.volume_field is not None:
            raise ValueError("give at most one of volume (query) / volume_field (topic)")
        if (self.min_volume is None) != (self.volume is None and self.volume_field is None):
            raise ValueError("volume (or volume_field) and min_volume go together")
        return self

    def volume_read(self) -> RuleConfig | None:
        """The read that gives this rule's volumes (same source, labels, topic), if any."""
        name = VOLUME + self.name
        if self.volume is not None:
            return self.model_copy(update={"name": name, "query": self.volume, "min_volume": None})
        if self.volume_field is not None:
            update = {"name": name, "json_field": self.volume_field, "min_volume": None}
            return self.model_copy(update=update)
        return None

    @property
    def direction(self) -> Literal["above", "below"]:
        """Which side of the threshold is a breach."""
        return "above" if self.above is not None else "below"

    @property
    def threshold(self) -> float:
        """The number a value is compared with."""
        return self.above if self.above is not None else float(self.below)  # type: ignore[arg-type]


class MonitorConfig(Frozen):
    """A category of rules checked together, and what happens when it fails."""

    interval: Interval = 30.0
    rollback_after: int = Field(default=5, ge=1)
    alert_after: int | None = Field(default=None, ge=1)
    blind_after: int = Field(default=10, ge=1)
    """Consecutive inconclusive checks before the monitor is blind."""
    on_blind: Literal["alert", "rollback"] = "alert"
    failure_limit: int | None = Field(default=None, ge=1)
    """Optional: roll back after this many failing checks within ``failure_window``."""
    failure_window: FailureWindow = 3600.0
    on_alert: list[str] = Field(default_factory=list)
    on_rollback: list[str] = Field(default_factory=list)
    shadow: bool = False
    """Every rule in shadow: evaluated and shown, never rolls back (its incidents are alerts)."""
    held_by: list[str] = Field(default_factory=list)
    """Monitors whose failing (failing, blind, rolled back) holds this monitor's rollback."""
    rules: list[RuleConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_rules(self) -> MonitorConfig:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"rule name {rule.name!r} is used twice")
            seen.add(rule.name)
        return self


class PluginTable(BaseModel):
    """Common part of ``[sources.NAME]`` and ``[actions.NAME]``; the rest belongs to the type."""

    model_config = ConfigDict(frozen=True, extra="allow")

    type: str

    def options(self) -> dict[str, Any]:
        """The type-specific keys, as written."""
        return dict(self.model_extra or {})


class SourceConfig(PluginTable):
    """``[sources.NAME]``."""


class ActionConfig(PluginTable):
    """``[actions.NAME]``: every action has a timeout and bounded retries."""

    timeout: ActionTimeout = 30.0
    retries: int = Field(default=2, ge=0, le=20)
    """Attempts after the first that a lasting failure (bad request, 4xx) may use."""
    give_up_after: GiveUpAfter = 600.0
    """How long transient failures (refused, timed out, 5xx, EMFILE) keep being retried."""


Hold = Annotated[float, bounded("100ms", "30d")]


def _window(text: str) -> str:
    parse_window(text)
    return text


WindowText = Annotated[str, AfterValidator(_window)]
"""``"Mon-Thu 09:00-16:00 Europe/Berlin"``, checked when the config loads."""
PERCENT_FIELD = "{percent}"
SET_TYPES = ("route.file", "route.http", "exec")
"""Action types a rollout's ``set`` may name: they take ``{percent}`` in their templates."""


class FreezeConfig(Frozen):
    """``{ from = "2026-12-20T00:00:00+01:00", to = "2027-01-04T00:00:00+01:00" }``."""

    start: dt.datetime = Field(alias="from")
    end: dt.datetime = Field(alias="to")

    @field_validator("start", "end", mode="before")
    @classmethod
    def _instant(cls, value: object) -> dt.datetime:
        return parse_instant(value)

    @model_validator(mode="after")
    def _ordered(self) -> FreezeConfig:
        if self.start >= self.end:
            raise ValueError("from must be before to")
        return self


class RolloutConfig(Frozen):
    """``[rollouts.NAME]``: a ramp of traffic percentages, each held while gates stay green."""

    steps: list[Annotated[int, Field(strict=True)]] = Field(min_length=1)
    hold: Hold | None = None
    holds: list[Hold] | None = None
    gates: list[str] = Field(min_length=1)
    min_checks: int = Field(default=1, ge=1, strict=True)
    set: str
    windows: list[WindowText] = Field(default_factory=list)
    freeze: list[FreezeConfig] = Field(default_factory=list)
    on_promote: list[str] = Field(default_factory=list)
    on_gate_failure: Literal["restart", "pause"] = "restart"

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[int]) -> list[int]:
        for i, percent in enumerate(steps):
            if not 1 <= percent <= 100:
                raise ValueError(f"steps[{i}] = {percent}: a percentage is 1 to 100")
            if i and percent <= steps[i - 1]:
                raise ValueError(f"steps[{i}] = {percent}: steps must strictly increase")
        return steps

    @model_validator(mode="after")
    def _one_hold(self) -> RolloutConfig:
        if (self.hold is None) == (self.holds is None):
            raise ValueError("give exactly one of hold / holds")
        if self.holds is not None and len(self.holds) != len(self.steps):
            raise ValueError(
                f"holds has {len(self.holds)} entries for {len(self.steps)} steps: one per step"
            )
        return self

    def spec(self) -> Spec:
        """What ``rollouts.decide`` needs of this rollout."""
        holds = self.holds if self.holds is not None else [float(self.hold or 0)] * len(self.steps)
        return Spec(
            steps=tuple(self.steps),
            holds=tuple(holds),
            min_checks=self.min_checks,
            on_gate_failure=self.on_gate_failure,
            windows=tuple(self.parsed_windows()),
            freezes=tuple(Freeze(f.start.timestamp(), f.end.timestamp()) for f in self.freeze),
        )

    def parsed_windows(self) -> list[Window]:
        """The windows, parsed (they were checked on load)."""
        return [parse_window(window) for window in self.windows]


class Config(Frozen):
    """The whole configuration as written; ``assemble`` types the plugin tables' options."""

    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    monitors: dict[str, MonitorConfig] = Field(default_factory=dict)
    actions: dict[str, ActionConfig] = Field(default_factory=dict)
    ha: HaConfig = Field(default_factory=HaConfig)
    rollouts: dict[str, RolloutConfig] = Field(default_factory=dict)
    path: Path | None = None
    sha256: str = ""


def parse(path: Path | str) -> Config:
    """Read and validate a config file's shape; ConfigError lists every problem found.

    Plugin options, rule keys per source type and secrets are ``assemble``'s checks.
    """
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from exc
    if raw_bytes.startswith(codecs.BOM_UTF8):
        raise ConfigError(
            [
                f"{path}: starts with a UTF-8 byte-order mark (BOM), which TOML does not allow: "
                f"save it as UTF-8 without BOM, e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' {path}"
            ]
        )
    try:
        raw = tomllib.loads(raw_bytes.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from exc
    digest = hashlib.sha256(raw_bytes).hexdigest()
    return from_dict(raw, path=path, sha256=digest)


def from_dict(raw: dict[str, Any], path: Path | None = None, sha256: str = "") -> Config:
    """Validate an already-parsed TOML document's shape (see ``parse``)."""
    where = str(path) if path else "<config>"
    raw = dict(raw)
    daemon_raw = raw.pop("daemon", {})
    problems: list[str] = []
    try:
        daemon = DaemonConfig(**daemon_raw) if isinstance(daemon_raw, dict) else None
        if daemon is None:
            problems.append(f"{where}: daemon: must be a table")
    except ValidationError as exc:
        daemon = None
        problems.extend(_with_env_names(lines(where, exc, prefix=("daemon",))))
    problems.extend(f"{where}: {line}" for line in _bad_names(raw))
    try:
        # The daemon table is validated above (with the environment); a stand-in here keeps
        # Config from reading the environment a second time.
        stand_in = DaemonConfig.model_construct()
        config = Config.model_validate({**raw, "daemon": stand_in, "path": path, "sha256": sha256})
    except ValidationError as exc:
        problems.extend(lines(where, exc))
        raise ConfigError(problems) from exc
    if daemon is None or problems:
        raise ConfigError(problems)
    return config.model_copy(update={"daemon": daemon})


def _with_env_names(found: list[str]) -> list[str]:
    """Say which ``ROLLBACKD_*`` variable a bad [daemon] value came from, when it did."""
    out = []
    for line in found:
        key = line.split("daemon.", 1)[-1].split(":", 1)[0]
        var = f"ROLLBACKD_{key.upper()}"
        out.append(f"{line} (from ${var})" if key.isidentifier() and var in os.environ else line)
    return out


def cross_check(config: Config) -> Iterator[str]:
    """What the models alone cannot see: references to actions, limits, the production guard."""
    if "ha" in config.model_fields_set and not config.daemon.state:
        yield 'ha: only applies with daemon.state = "postgresql://..." (shared state)'
    for name, monitor in config.monitors.items():
        here = f"monitors.{name}"
        if monitor.alert_after is not None and monitor.alert_after > monitor.rollback_after:
            yield f"{here}.alert_after: must not be greater than rollback_after"
        for key in ("on_alert", "on_rollback"):
            for i, action in enumerate(getattr(monitor, key)):
                if action not in config.actions:
                    yield f"{here}.{key}[{i}]: no action named {action!r} in [actions]"
        for i, other in enumerate(monitor.held_by):
            if other not in config.monitors:
                yield f"{here}.held_by[{i}]: no monitor named {other!r} in [monitors]"
    yield from _rollout_problems(config)
    if cycle := _held_cycle(config):
        yield f"monitors.{cycle[0]}.held_by: a cycle ({' -> '.join(cycle)}): nothing could act"
    daemon = config.daemon
    if daemon.armed and daemon.is_production and not daemon.confirm_production:
        yield (
            "daemon.mode: armed in production needs daemon.confirm_production = true "
            "(or ROLLBACKD_CONFIRM_PRODUCTION=true): acting on production must be explicit"
        )


def _rollout_problems(config: Config) -> Iterator[str]:
    """Rollouts name known gates and actions; only a rollout's actions may use ``{percent}``."""
    percent = {name for name, action in config.actions.items() if _uses_percent(action.options())}
    for name, rollout in config.rollouts.items():
        yield from _one_rollout(config, f"rollouts.{name}", rollout, percent)
    for name, monitor in config.monitors.items():
        for key in ("on_alert", "on_rollback"):
            for i, action in enumerate(getattr(monitor, key)):
                if action in percent:
                    yield (
                        f"monitors.{name}.{key}[{i}]: {action!r} uses {PERCENT_FIELD}, which only "
                        "a rollout's set knows"
                    )


def _one_rollout(
    config: Config, here: str, rollout: RolloutConfig, percent: set[str]
) -> Iterator[str]:
    for i, gate in enumerate(rollout.gates):
        if gate not in config.monitors:
            yield f"{here}.gates[{i}]: no monitor named {gate!r} in [monitors]"
    for i, action in enumerate(rollout.on_promote):
        if action not in config.actions:
            yield f"{here}.on_promote[{i}]: no action named {action!r} in [actions]"
    setter = config.actions.get(rollout.set)
    if setter is None:
        yield f"{here}.set: no action named {rollout.set!r} in [actions]"
    elif setter.type not in SET_TYPES:
        yield f"{here}.set: {rollout.set!r} is {setter.type}; use {', '.join(SET_TYPES)}"
    elif rollout.set not in percent:
        example = f'value = "{PERCENT_FIELD}"'
        yield f"{here}.set: {rollout.set!r} must use {PERCENT_FIELD} (e.g. {example})"
    if rollout.min_checks > config.daemon.history:
        yield (
            f"{here}.min_checks: {rollout.min_checks} is more than daemon.history "
            f"({config.daemon.history}) checks kept per monitor"
        )


def _uses_percent(value: object) -> bool:
    """Whether a table's strings (nested tables and lists included) hold ``{percent}``."""
    if isinstance(value, str):
        return PERCENT_FIELD in value
    if isinstance(value, dict):
        return any(_uses_percent(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_uses_percent(v) for v in value)
    return False


def _held_cycle(config: Config) -> list[str] | None:
    """A chain of ``held_by`` that comes back to where it started, if there is one."""
    held = {name: [m for m in monitor.held_by if m in config.monitors]
            for name, monitor in config.monitors.items()}  # fmt: skip
    done: set[str] = set()

    def walk(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        for other in held[name]:
            if found := walk(other, [*path, name]):
                return found
        done.add(name)
        return None

    for name in sorted(held):
        if found := walk(name, []):
            return found
    return None


def _bad_names(raw: dict[str, Any]) -> Iterator[str]:
    """Names as written follow ``NAME``: every ``[SECTION.NAME]`` and every rule's ``name``."""
    named: list[tuple[tuple[str | int, ...], object]] = []
    for section in ("sources", "monitors", "actions", "rollouts"):
        tables = raw.get(section)
        for name, table in tables.items() if isinstance(tables, dict) else ():
            named.append(((section, name), name))
            rules = (
                table.get("rules") if section == "monitors" and isinstance(table, dict) else None
            )
            for i, rule in enumerate(rules if isinstance(rules, list) else ()):
                if isinstance(rule, dict) and isinstance(rule.get("name"), str):
                    named.append(((section, name, "rules", i, "name"), rule["name"]))
    for loc, name in named:
        if isinstance(name, str) and not NAME.fullmatch(name):
            yield f"{dotted(loc)}: invalid name {name!r}: use {NAME_RULE}"


def exposure_warnings(config: Config) -> list[str]:
    """Warnings about what the HTTP surface shows to other hosts (logged at start, check-config)."""
    daemon = config.daemon
    address = daemon.listen_address()
    if address is None or daemon.status_token or _is_loopback(address[0]):
        return []
    return [
        f"daemon.listen: {daemon.listen} is not a loopback address and /status and /metrics "
        "answer anyone without a token: set daemon.status_token = true (they then need "
        '"Authorization: Bearer <control token>", which rollbackd status sends), '
        'or listen on "127.0.0.1:PORT"'
    ]


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
