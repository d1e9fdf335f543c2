"""MQTT broker connection options and TLS, shared by the mqtt source and the mqtt actions."""

from __future__ import annotations

import ssl

import aiomqtt
from pydantic import Field, ValidationInfo, field_validator

from rollbackd.options import CaFile, Frozen, SecretRef

DEFAULT_KEEPALIVE = 60
"""aiomqtt's own default: seconds between pings when the caller does not choose."""


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

    @field_validator("password")
    @classmethod
    def _needs_username(cls, password: SecretRef | None, info: ValidationInfo) -> SecretRef | None:
        if password is not None and "username" in info.data and info.data["username"] is None:
            raise ValueError("password needs username")
        return password


def tls_context(options: BrokerOptions) -> ssl.SSLContext | None:
    """The broker's TLS context (None without TLS); OSError if ``ca_file`` is unreadable."""
    if not options.tls and options.ca_file is None:
        return None
    return ssl.create_default_context(cafile=options.ca_file)


def client(
    options: BrokerOptions,
    *,
    tls: ssl.SSLContext | None,
    keepalive: int = DEFAULT_KEEPALIVE,
    timeout: float | None = None,
) -> aiomqtt.Client:
    """A client of the broker, not connected yet; SecretError if the password is unreadable."""
    password = options.password.reveal() if options.password is not None else None
    return aiomqtt.Client(
        options.host,
        options.port,
        username=options.username,
        password=password,
        identifier=options.client_id,
        keepalive=keepalive,
        timeout=timeout,
        tls_context=tls,
    )
