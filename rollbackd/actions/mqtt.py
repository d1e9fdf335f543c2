"""MQTT actions (aiomqtt): ``flag.mqtt`` publishes a retained flag value, ``alert.mqtt`` alerts.

Each attempt opens its own connection and waits for the broker's acknowledgement (QoS 1 by
default), so a success means the broker holds the message. TLS is as in the mqtt source.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, field
from typing import Any, Literal

import aiomqtt
from pydantic import Field, ValidationInfo, field_validator

from rollbackd.actions import ActionContext, ActionType
from rollbackd.actions.templates import (
    Template,
    check_tree,
    fields,
    incident_payload,
    render,
    render_tree,
)
from rollbackd.config import CaFile, Frozen, SecretRef
from rollbackd.errors import ActionError, SecretError


class BrokerOptions(Frozen):
    """Where the broker is and how to log in; the password is a secret reference."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: SecretRef | None = None
    tls: bool = False
    ca_file: CaFile | None = None
    """PEM bundle to verify the broker with (implies ``tls``); default: the system's."""
    client_id: str | None = None
    topic: Template
    qos: Literal[0, 1, 2] = 1

    @field_validator("password")
    @classmethod
    def _needs_username(cls, password: SecretRef | None, info: ValidationInfo) -> SecretRef | None:
        if password is not None and "username" in info.data and info.data["username"] is None:
            raise ValueError("password needs username")
        return password

    @field_validator("topic")
    @classmethod
    def _publishable(cls, topic: str) -> str:
        if not topic or "#" in topic or "+" in topic:
            raise ValueError("a topic to publish to is not empty and has no wildcards (#, +)")
        return topic


class FlagMqttOptions(BrokerOptions):
    """``flag.mqtt``: publish ``payload`` retained on ``topic`` (a table is sent as JSON)."""

    payload: Template | dict[str, Any]

    @field_validator("payload")
    @classmethod
    def _templates(cls, payload: str | dict[str, Any]) -> str | dict[str, Any]:
        check_tree(payload)
        return payload


class AlertMqttOptions(BrokerOptions):
    """``alert.mqtt``: publish the incident as JSON on ``topic``."""

    retain: bool = False


def tls_context(options: BrokerOptions) -> ssl.SSLContext | None:
    """The broker's TLS context, like the mqtt source's; OSError if ``ca_file`` is unreadable."""
    if not options.tls and options.ca_file is None:
        return None
    return ssl.create_default_context(cafile=options.ca_file)


@dataclass(slots=True)
class Broker:
    """Publishes to the configured broker; its TLS context is built once, at the first publish."""

    options: BrokerOptions
    _tls: ssl.SSLContext | None = field(default=None, init=False)
    _tls_built: bool = field(default=False, init=False)

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self._tls_built:
            try:
                self._tls = tls_context(self.options)
            except OSError as exc:
                raise ActionError(f"ca_file {self.options.ca_file}: {exc.strerror or exc}") from exc
            self._tls_built = True
        return self._tls

    async def publish(self, topic: str, payload: str, *, retain: bool) -> str:
        """Connect, publish one message, wait for the acknowledgement, disconnect."""
        return await publish(self.options, topic, payload, retain=retain, tls=self._tls_context())


async def publish(
    options: BrokerOptions,
    topic: str,
    payload: str,
    *,
    retain: bool,
    tls: ssl.SSLContext | None = None,
) -> str:
    """Connect (with ``tls`` if given), publish one message, wait for the ack, disconnect."""
    try:
        password = options.password.reveal() if options.password is not None else None
    except SecretError as exc:
        raise ActionError(f"mqtt password: {exc}") from exc
    where = f"mqtt://{options.host}:{options.port}/{topic}"
    try:
        async with aiomqtt.Client(
            options.host,
            options.port,
            username=options.username,
            password=password,
            identifier=options.client_id,
            tls_context=tls,
        ) as client:
            await client.publish(topic, payload.encode("utf-8"), qos=options.qos, retain=retain)
    except (aiomqtt.MqttError, OSError) as exc:
        raise ActionError(f"publish to {where} failed: {exc}") from exc
    kind = "retained" if retain else "published"
    return f"{kind} {len(payload)} bytes on {where}"


@dataclass(slots=True)
class FlagMqttAction:
    """Sets a flag by publishing its value as a retained message."""

    name: str
    options: FlagMqttOptions
    broker: Broker = field(init=False)

    def __post_init__(self) -> None:
        self.broker = Broker(self.options)

    async def run(self, ctx: ActionContext) -> str:
        """Publish the rendered payload, retained."""
        o = self.options
        values = fields(ctx)
        payload = (
            render(o.payload, values)
            if isinstance(o.payload, str)
            else json.dumps(render_tree(o.payload, values))
        )
        return await self.broker.publish(render(o.topic, values), payload, retain=True)

    async def aclose(self) -> None:
        """Nothing to release: each attempt owns its connection."""


@dataclass(slots=True)
class AlertMqttAction:
    """Publishes the incident document (``templates.incident_payload``) as JSON."""

    name: str
    options: AlertMqttOptions
    broker: Broker = field(init=False)

    def __post_init__(self) -> None:
        self.broker = Broker(self.options)

    async def run(self, ctx: ActionContext) -> str:
        """Publish the incident."""
        o = self.options
        payload = json.dumps(incident_payload(ctx))
        return await self.broker.publish(render(o.topic, fields(ctx)), payload, retain=o.retain)

    async def aclose(self) -> None:
        """Nothing to release: each attempt owns its connection."""


def _build_flag(name: str, options: Any) -> FlagMqttAction:
    return FlagMqttAction(name, options)


def _build_alert(name: str, options: Any) -> AlertMqttAction:
    return AlertMqttAction(name, options)


FLAG_MQTT = ActionType(options=FlagMqttOptions, build=_build_flag)
ALERT_MQTT = ActionType(options=AlertMqttOptions, build=_build_alert, resolves=True)
