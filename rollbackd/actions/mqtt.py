"""MQTT actions (aiomqtt): ``flag.mqtt`` publishes a retained flag value, ``alert.mqtt`` alerts.

Each attempt opens its own connection and waits for the broker's acknowledgement (QoS 1 by
default), so a success means the broker holds the message. Broker options and TLS are
``rollbackd.broker``'s, shared with the mqtt source.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import aiomqtt
from pydantic import field_validator

from rollbackd import broker
from rollbackd.actions import ActionContext, ActionType, OptionsAction, templates
from rollbackd.actions.templates import Template, TemplateTree
from rollbackd.broker import BrokerOptions
from rollbackd.errors import ActionError, SecretError
from rollbackd.readings import excerpt


class PublishOptions(BrokerOptions):
    """The broker, and the topic and QoS every message of the action is published with."""

    topic: Template
    qos: Literal[0, 1, 2] = 1

    @field_validator("topic")
    @classmethod
    def _publishable(cls, topic: str) -> str:
        if not topic or "#" in topic or "+" in topic:
            raise ValueError("a topic to publish to is not empty and has no wildcards (#, +)")
        return topic


class FlagMqttOptions(PublishOptions):
    """``flag.mqtt``: publish ``payload`` retained on ``topic`` (a table is sent as JSON)."""

    payload: TemplateTree


class AlertMqttOptions(PublishOptions):
    """``alert.mqtt``: publish the incident as JSON on ``topic``."""

    retain: bool = False


@dataclass(slots=True)
class Publisher:
    """Publishes to the configured broker; its TLS context is built once, at the first publish."""

    options: PublishOptions
    _tls: ssl.SSLContext | None = field(default=None, init=False)
    _tls_built: bool = field(default=False, init=False)

    def _tls_context(self) -> ssl.SSLContext | None:
        if not self._tls_built:
            try:
                self._tls = broker.tls_context(self.options)
            except OSError as exc:
                raise ActionError(f"ca_file {self.options.ca_file}: {exc.strerror or exc}") from exc
            self._tls_built = True
        return self._tls

    async def publish(self, topic: str, payload: str, *, retain: bool) -> str:
        """Connect, publish one message, wait for the acknowledgement, disconnect."""
        options = self.options
        tls = self._tls_context()
        where = f"mqtt://{options.host}:{options.port}/{excerpt(topic)}"
        try:
            async with broker.client(options, tls=tls) as client:
                await client.publish(topic, payload.encode("utf-8"), qos=options.qos, retain=retain)
        except SecretError as exc:
            raise ActionError(f"mqtt password: {exc}") from None  # no secret in the chain
        except ValueError as exc:  # paho refuses the rendered topic (wildcards, too long)
            raise ActionError(
                f"publish to {where} refused: {excerpt(str(exc))} "
                "(a {field} in topic rendered something MQTT cannot publish to)"
            ) from None
        except (aiomqtt.MqttError, OSError) as exc:
            raise ActionError(f"publish to {where} failed: {excerpt(str(exc))}") from exc
        kind = "retained" if retain else "published"
        return f"{kind} {len(payload)} bytes on {where}"


PublishT = TypeVar("PublishT", bound=PublishOptions)


@dataclass(slots=True)
class MqttAction(OptionsAction[PublishT]):
    """An action that publishes; each attempt owns its connection, so nothing stays open."""

    publisher: Publisher = field(init=False)

    def __post_init__(self) -> None:
        self.publisher = Publisher(self.options)


@dataclass(slots=True)
class FlagMqttAction(MqttAction[FlagMqttOptions]):
    """Sets a flag by publishing its value as a retained message."""

    async def run(self, ctx: ActionContext) -> str:
        """Publish the rendered payload, retained."""
        o = self.options
        values = templates.fields(ctx)
        payload = (
            templates.render(o.payload, values)
            if isinstance(o.payload, str)
            else json.dumps(templates.render_tree(o.payload, values))
        )
        return await self.publisher.publish(templates.render(o.topic, values), payload, retain=True)


@dataclass(slots=True)
class AlertMqttAction(MqttAction[AlertMqttOptions]):
    """Publishes the incident document (``templates.incident_payload``) as JSON."""

    async def run(self, ctx: ActionContext) -> str:
        """Publish the incident."""
        o = self.options
        payload = json.dumps(templates.incident_payload(ctx))
        return await self.publisher.publish(
            templates.render(o.topic, templates.fields(ctx)), payload, retain=o.retain
        )


FLAG_MQTT = ActionType(options=FlagMqttOptions, build=FlagMqttAction)
ALERT_MQTT = ActionType(options=AlertMqttOptions, build=AlertMqttAction, resolves=True)
