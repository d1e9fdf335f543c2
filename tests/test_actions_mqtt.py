"""MQTT actions against a real Mosquitto: the retained flag message and the incident alert."""

from __future__ import annotations

import asyncio
import gc
import json
import ssl
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import aiomqtt
import pytest
from pydantic import ValidationError

from rollbackd.actions import ActionContext, Event, Incident
from rollbackd.actions.mqtt import ALERT_MQTT, FLAG_MQTT, AlertMqttOptions, FlagMqttOptions
from rollbackd.errors import ActionError
from tests import helpers
from tests.servers import Mosquitto, free_port
from tests.test_actions_web import Certificate, self_signed

# The first attempt of step 0 of an armed rollback of monitor payments.
context = partial(helpers.context, details={"trigger": {"outcome": "breach"}})


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


def test_alert_mqtt_resolves_and_flag_mqtt_does_not() -> None:
    """alert.mqtt tells people, so it declares resolves; flag.mqtt does not."""
    assert (ALERT_MQTT.resolves, FLAG_MQTT.resolves) == (True, False)


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


def test_password_without_username_is_rejected_on_password() -> None:
    """A password without a username is a config error on the password key."""
    with pytest.raises(ValidationError) as caught:
        AlertMqttOptions.model_validate({"topic": "t", "password": {"env": "MQTT_PASSWORD"}})
    [error] = caught.value.errors()
    assert error["loc"] == ("password",)
    assert error["msg"] == "Value error, password needs username"
    options = AlertMqttOptions.model_validate(
        {"topic": "t", "username": "u", "password": {"env": "MQTT_PASSWORD"}}
    )
    assert options.username == "u"


def test_missing_ca_file_is_rejected_on_ca_file(tmp_path: Path) -> None:
    """A ca_file that does not exist is a config error on the ca_file key."""
    missing = tmp_path / "broker-ca.pem"
    with pytest.raises(ValidationError) as caught:
        FlagMqttOptions.model_validate(
            {"topic": "t", "payload": "off", "tls": True, "ca_file": str(missing)}
        )
    [error] = caught.value.errors()
    assert error["loc"] == ("ca_file",)
    assert error["msg"] == f"Value error, cannot read {missing}: No such file or directory"


class TlsMosquitto(Mosquitto):
    """Mosquitto with a TLS listener serving ``certificate`` (anonymous, no client certificates)."""

    def __init__(self, workdir: Path, certificate: Certificate) -> None:
        super().__init__(workdir)
        self.certificate = certificate

    def argv(self) -> Sequence[str]:
        """Add the TLS settings to the listener of the plain broker's config."""
        argv = super().argv()
        cert = self.certificate
        with (self.workdir / "mosquitto.conf").open("a") as conf:
            conf.write(f"cafile {cert.cert}\ncertfile {cert.cert}\nkeyfile {cert.key}\n")
        return argv


@pytest.fixture
def tls_mosquitto(tmp_path: Path) -> Iterator[TlsMosquitto]:
    """Run Mosquitto on a loopback TLS listener with a fresh self-signed certificate."""
    certificate = self_signed(tmp_path)
    with TlsMosquitto(tmp_path / "mosquitto", certificate) as broker:
        yield broker


@pytest.mark.slow
async def test_alert_mqtt_over_tls_verifies_the_broker_with_ca_file(
    tls_mosquitto: TlsMosquitto,
) -> None:
    """With tls and ca_file, the alert reaches a TLS broker that verifies against that CA."""
    cert = tls_mosquitto.certificate.cert
    port = tls_mosquitto.port
    verified = ALERT_MQTT.options.model_validate(
        {"port": port, "topic": "ops/alerts", "tls": True, "ca_file": str(cert)}
    )
    context_for_reader = ssl.create_default_context(cafile=cert)
    async with aiomqtt.Client("127.0.0.1", port, tls_context=context_for_reader) as client:
        await client.subscribe("ops/alerts", qos=1)
        action = ALERT_MQTT.build("notify", verified)
        detail = await action.run(context())
        message = await next_message(client)
    assert detail.startswith(f"published {len(message.payload)} bytes on mqtt://127.0.0.1:{port}")
    assert isinstance(message.payload, bytes)
    assert json.loads(message.payload)["monitor"] == "payments"


# paho-mqtt 2.2's _ssl_wrap_socket does not close the socket when the handshake fails: the
# traceback keeps it until the cycle collector closes it with this warning. The test collects
# it here, where the warning is expected, rather than in whichever test runs the collector next.
@pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning")
@pytest.mark.slow
async def test_alert_mqtt_over_tls_without_ca_file_fails_verification(
    tls_mosquitto: TlsMosquitto,
) -> None:
    """With tls but only the system's CAs, a broker with a private CA fails the attempt."""
    port = tls_mosquitto.port
    options = ALERT_MQTT.options.model_validate({"port": port, "topic": "t", "tls": True})
    with pytest.raises(ActionError) as caught:
        await ALERT_MQTT.build("notify", options).run(context())
    message = str(caught.value)
    del caught
    gc.collect()
    assert message.startswith(f"publish to mqtt://127.0.0.1:{port}/t failed: ")
    assert "certificate verify failed: self-signed certificate" in message


@pytest.mark.slow
@pytest.mark.parametrize("reason", ["rate > 5 # eu", "a+b", "x" * 70_000])
async def test_a_topic_the_client_refuses_is_an_action_error_without_the_password(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch, reason: str
) -> None:
    """A rendered topic MQTT cannot publish to fails the attempt with a short reason, no secret."""
    monkeypatch.setenv("ROLLBACKD_TEST_MQTT_PASSWORD", "CANARY-mqtt-pw")
    options = ALERT_MQTT.options.model_validate(
        {
            "port": mosquitto.port,
            "username": "rollbackd",
            "password": {"env": "ROLLBACKD_TEST_MQTT_PASSWORD"},
            "topic": "alerts/{reason}",
        }
    )
    action = ALERT_MQTT.build("page", options)
    base = context()
    incident = Incident(
        base.incident.id, "payments", Event.ROLLBACK, reason, 0.0, "armed", "staging"
    )
    try:
        with pytest.raises(ActionError) as caught:
            await action.run(ActionContext(incident, 0, 1, base.idempotency_key))
    finally:
        await action.aclose()
    message = str(caught.value)
    assert "CANARY-mqtt-pw" not in message
    assert len(message) < 600
    assert "alerts/" in message
