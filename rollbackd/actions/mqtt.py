"""MQTT actions (aiomqtt): ``flag.mqtt`` publishes a retained flag value, ``alert.mqtt`` alerts.

Each attempt opens its own connection and waits for the broker's acknowledgement (QoS 1 by
default), so a success means the broker holds the message.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from typing import Any, Literal

import aiomqtt
from pydantic import Field, field_validator

from rollbackd.actions import ActionContext, ActionType
from rollbackd.actions.templates import (
    Template,
    check_tree,
    fields,
    incident_payload,
    render,
    render_tree,
)
from rollbackd.config import Frozen, SecretRef
from rollbackd.errors import ActionError, SecretError


class BrokerOptions(Frozen):
    """Where the broker is and how to log in; the password is a secret reference."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = None
    password: SecretRef | None = None
    tls: bool = False
    client_id: str | None = None
    topic: Template
    qos: Literal[0, 1, 2] = 1

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


async def publish(options: BrokerOptions, topic: str, payload: str, *, retain: bool) -> str:
    """Connect, publish one message, wait for the acknowledgement, disconnect."""
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
            tls_context=ssl.create_default_context() if options.tls else None,
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

    async def run(self, ctx: ActionContext) -> str:
        """Publish the rendered payload, retained."""
        o = self.options
        values = fields(ctx)
        payload = (
            render(o.payload, values)
            if isinstance(o.payload, str)
            else json.dumps(render_tree(o.payload, values))
        )
        return await publish(o, render(o.topic, values), payload, retain=True)

    async def aclose(self) -> None:
        """Nothing to release: each attempt owns its connection."""


@dataclass(slots=True)
class AlertMqttAction:
    """Publishes the incident document (``templates.incident_payload``) as JSON."""

    name: str
    options: AlertMqttOptions

    async def run(self, ctx: ActionContext) -> str:
        """Publish the incident."""
        o = self.options
        payload = json.dumps(incident_payload(ctx))
        return await publish(o, render(o.topic, fields(ctx)), payload, retain=o.retain)

    async def aclose(self) -> None:
        """Nothing to release: each attempt owns its connection."""


def _build_flag(name: str, options: Any) -> FlagMqttAction:
    return FlagMqttAction(name, options)


def _build_alert(name: str, options: Any) -> AlertMqttAction:
    return AlertMqttAction(name, options)


FLAG_MQTT = ActionType(options=FlagMqttOptions, build=_build_flag)
ALERT_MQTT = ActionType(options=AlertMqttOptions, build=_build_alert)
