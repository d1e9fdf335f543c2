"""Secrets and credentials: unreadable or unusable values are clear errors that never show them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rollbackd.actions import ActionContext, Event, Incident
from rollbackd.actions.web import FLAG_HTTP, HttpRequestAction
from rollbackd.assemble import from_dict
from rollbackd.config import RuleConfig
from rollbackd.errors import ActionError, ConfigError, SecretError
from rollbackd.options import HttpSecretRef, SecretRef
from rollbackd.readings import ReadingStatus
from rollbackd.sources.prometheus import PrometheusOptions, PrometheusSource
from tests.servers import free_port

CANARY = "CANARY-s3cr3t"


def problems(raw: dict[str, Any], *, secrets: bool = True) -> list[str]:
    """check-config's problems for a config document."""
    with pytest.raises(ConfigError) as caught:
        from_dict(raw, secrets=secrets)
    return caught.value.problems


def secret_file(tmp_path: Path, content: bytes) -> Path:
    """Write a secret file holding ``content``."""
    path = tmp_path / "secret"
    path.write_bytes(content)
    return path


def test_non_utf8_secret_file_is_a_secret_error(tmp_path: Path) -> None:
    """A secret file with bytes that are not UTF-8 is a SecretError naming the file, no crash."""
    path = secret_file(tmp_path, b"abc\xff\xfe" + CANARY.encode())
    with pytest.raises(SecretError) as caught:
        SecretRef(file=path).reveal()
    message = str(caught.value)
    assert str(path) in message
    assert "UTF-8" in message
    assert CANARY not in message


def test_non_utf8_secret_environment_variable_is_a_secret_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An environment variable whose bytes are not UTF-8 is a SecretError naming the variable."""
    monkeypatch.setenv("ROLLBACKD_TEST_SECRET", "abc\udcff" + CANARY)
    with pytest.raises(SecretError) as caught:
        SecretRef(env="ROLLBACKD_TEST_SECRET").reveal()
    assert "ROLLBACKD_TEST_SECRET" in str(caught.value)
    assert CANARY not in str(caught.value)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (f"Bearer x\n{CANARY}\n".encode(), "line break inside the value"),
        (f"x\r{CANARY}".encode(), "line break inside the value"),
        (f"x\x00{CANARY}".encode(), "control character"),
        (f"x€{CANARY}".encode(), "outside Latin-1"),
    ],
)
def test_http_secret_must_be_one_line_of_latin1(tmp_path: Path, content: bytes, says: str) -> None:
    """A secret sent in an HTTP header is one line of Latin-1; else an error without the value."""
    path = secret_file(tmp_path, content)
    assert CANARY in SecretRef(file=path).reveal()  # an exec environment may hold anything
    with pytest.raises(SecretError) as caught:
        HttpSecretRef(file=path).reveal()
    assert says in str(caught.value)
    assert str(path) in str(caught.value)
    assert CANARY not in str(caught.value)
    assert HttpSecretRef(file=secret_file(tmp_path, b"token\n")).reveal() == "token"


def _prometheus(auth: dict[str, Any]) -> dict[str, Any]:
    return {"sources": {"prom": {"type": "prometheus", "url": "http://127.0.0.1:1", **auth}}}


@pytest.mark.parametrize(
    ("auth", "content", "key"),
    [
        ({"bearer_token": "F"}, f"tok\n{CANARY}", "sources.prom.bearer_token"),
        (
            {"basic_auth": {"username": "u", "password": "F"}},
            f"pa€ss{CANARY}",
            "sources.prom.basic_auth.password",
        ),
    ],
)
async def test_prometheus_credentials_fail_by_key_without_showing_the_value(
    tmp_path: Path, auth: dict[str, Any], content: str, key: str
) -> None:
    """check-config and every read name the credential's key, and the value appears in neither."""
    path = secret_file(tmp_path, content.encode())
    if "bearer_token" in auth:
        auth = {"bearer_token": {"file": str(path)}}
    else:
        auth = {"basic_auth": {"username": "u", "password": {"file": str(path)}}}
    [problem] = problems(_prometheus(auth))
    assert problem.startswith(f"<config>: {key}: ")
    assert CANARY not in problem

    options = PrometheusOptions.model_validate({"url": f"http://127.0.0.1:{free_port()}", **auth})
    source = PrometheusSource("prom", options)
    await source.start()
    try:
        [reading] = await source.read(
            RuleConfig(name="r", source="prom", query="up", above=1.0), 0.0
        )
    finally:
        await source.aclose()
    assert reading.status is ReadingStatus.ERROR
    assert key.removeprefix("sources.prom.") in reading.reason
    assert CANARY not in reading.reason


def context() -> ActionContext:
    """The first attempt of a rollback of monitor payments."""
    incident = Incident("i-1", "payments", Event.ROLLBACK, "breach", 0.0, "armed", "staging")
    return ActionContext(incident, 0, 1, "i-1:0")


async def test_header_secret_with_a_line_break_fails_by_key_without_showing_it(
    tmp_path: Path,
) -> None:
    """A header secret with a line break fails check-config and each attempt, naming the header."""
    path = secret_file(tmp_path, f"Bearer t\n{CANARY}\n".encode())
    raw = {
        "type": "flag.http",
        "url": f"http://127.0.0.1:{free_port()}/flags",
        "headers": {"Authorization": {"file": str(path)}},
    }
    [problem] = problems({"actions": {"flag": raw}})
    assert problem.startswith("<config>: actions.flag.headers.Authorization: ")
    assert "line break" in problem
    assert CANARY not in problem

    options = FLAG_HTTP.options.model_validate({k: v for k, v in raw.items() if k != "type"})
    action = HttpRequestAction("flag", options)
    try:
        with pytest.raises(ActionError) as caught:
            await action.run(context())
    finally:
        await action.aclose()
    assert "header Authorization" in str(caught.value)
    assert CANARY not in str(caught.value)


URL_KEYS = [
    ({"type": "prometheus"}, "sources", "url"),
    ({"type": "flag.http"}, "actions", "url"),
    ({"type": "route.http"}, "actions", "url"),
    ({"type": "alert.webhook"}, "actions", "url"),
    ({"type": "alert.alertmanager"}, "actions", "url"),
    ({"type": "alert.alertmanager", "url": "http://am:9093"}, "actions", "generator_url"),
]


@pytest.mark.parametrize(("table", "section", "key"), URL_KEYS)
@pytest.mark.parametrize(
    "url", [f"http://u:{CANARY}@host:9090/x", f"https://{CANARY}@host/{{monitor}}"]
)
def test_credentials_in_any_url_are_refused_by_key(
    table: dict[str, Any], section: str, key: str, url: str
) -> None:
    """A URL with user:password@ fails check-config naming the key; the error hides the value."""
    if key == "url" and "{" in url and table["type"] not in {"flag.http", "route.http"}:
        url = url.replace("/{monitor}", "/")
    found = problems({section: {"x": {**table, key: url}}}, secrets=False)
    assert [p for p in found if f"{section}.x.{key}: " in p and "secret reference" in p]
    assert not [p for p in found if CANARY in p]
