"""MQTT actions against a real Mosquitto: the retained flag message and the incident alert."""

from __future__ import annotations

import asyncio
import json

import aiomqtt
import pytest
from pydantic import ValidationError

from rollbackd.actions import ActionContext, Event, Incident
from rollbackd.actions.mqtt import ALERT_MQTT, FLAG_MQTT, FlagMqttOptions
from rollbackd.errors import ActionError
from tests.servers import Mosquitto, free_port


def context() -> ActionContext:
    """Build the first attempt of step 0 of an armed rollback of monitor payments."""
    incident = Incident(
        id="20261125T120000Z-payments-ab12",
        monitor="payments",
        event=Event.ROLLBACK,
        reason="5 failing checks",
        started_at=1_795_000_000.0,
        mode="armed",
        environment="staging",
        details={"trigger": {"outcome": "breach"}},
    )
    return ActionContext(incident, 0, 1, f"{incident.id}:0")


async def next_message(client: aiomqtt.Client, seconds: float = 5.0) -> aiomqtt.Message:
    """Return the next message the client receives, or fail after ``seconds``."""
    async with asyncio.timeout(seconds):
        return await anext(client.messages)


@pytest.mark.slow
async def test_flag_mqtt_leaves_a_retained_message(mosquitto: Mosquitto) -> None:
    """flag.mqtt's message is retained: a client subscribing afterwards receives it."""
    options = FLAG_MQTT.options.model_validate(
        {
            "port": mosquitto.port,
            "topic": "boop/flags/{monitor}",
            "payload": {"flag": "boop-payments", "variant": "off", "incident": "{incident}"},
        }
    )
    action = FLAG_MQTT.build("stop-boop-traffic", options)
    detail = await action.run(context())
    await action.aclose()
    assert "retained" in detail
    assert "boop/flags/payments" in detail
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.subscribe("boop/flags/#", qos=1)
        message = await next_message(client)
    assert message.retain
    assert str(message.topic) == "boop/flags/payments"
    assert isinstance(message.payload, bytes)
    assert json.loads(message.payload) == {
        "flag": "boop-payments",
        "variant": "off",
        "incident": "20261125T120000Z-payments-ab12",
    }


@pytest.mark.slow
async def test_alert_mqtt_publishes_the_incident(mosquitto: Mosquitto) -> None:
    """alert.mqtt publishes the incident document, not retained by default."""
    options = ALERT_MQTT.options.model_validate({"port": mosquitto.port, "topic": "ops/alerts"})
    action = ALERT_MQTT.build("notify", options)
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.subscribe("ops/alerts", qos=1)
        await action.run(context())
        message = await next_message(client)
    assert not message.retain
    assert isinstance(message.payload, bytes)
    document = json.loads(message.payload)
    assert (document["monitor"], document["event"]) == ("payments", "rollback")
    assert document["idempotency_key"] == "20261125T120000Z-payments-ab12:0"


async def test_broker_down_is_an_action_error() -> None:
    """Nothing listening on the broker port fails the attempt with the reason."""
    port = free_port()
    options = FLAG_MQTT.options.model_validate({"port": port, "topic": "f", "payload": "off"})
    with pytest.raises(ActionError, match=rf"publish to mqtt://127.0.0.1:{port}/f failed"):
        await FLAG_MQTT.build("flag", options).run(context())


async def test_missing_password_secret_is_an_error_without_the_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unset password variable fails before connecting and names the variable only."""
    monkeypatch.delenv("MQTT_PASSWORD", raising=False)
    options = FLAG_MQTT.options.model_validate(
        {"topic": "f", "payload": "off", "username": "u", "password": {"env": "MQTT_PASSWORD"}}
    )
    with pytest.raises(ActionError, match="MQTT_PASSWORD is not set"):
        await FLAG_MQTT.build("flag", options).run(context())


def test_topic_with_wildcards_is_rejected() -> None:
    """One cannot publish to a wildcard topic; the config says so."""
    with pytest.raises(ValidationError, match="no wildcards"):
        FlagMqttOptions.model_validate({"topic": "boop/#", "payload": "off"})
    with pytest.raises(ValidationError, match="secrets are never written in the config"):
        FlagMqttOptions.model_validate({"topic": "t", "payload": "off", "password": "hunter2"})
