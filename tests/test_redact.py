"""The redactor: known secret values in any spelling, credential shapes, documents."""

from __future__ import annotations

import json

from rollbackd.redact import REDACTED, Redactor


def test_known_secret_in_every_spelling() -> None:
    """A learned value is hidden as is, JSON- or repr-escaped, percent-encoded, line by line."""
    secret = 'p\u20ac"ss\nw0rd-line'
    redactor = Redactor([secret])
    texts = [
        f"raw {secret} end",
        json.dumps({"x": secret}),
        repr(secret),
        str(secret.encode()),
        "query=p%E2%82%AC%22ss%0Aw0rd-line",
        "first line only: w0rd-line",
    ]
    for text in texts:
        out = redactor.text(text)
        assert "w0rd-line" not in out, (text, out)
        assert REDACTED in out


def test_credential_shapes_without_knowing_the_value() -> None:
    """Authorization schemes, API-key headers, URL passwords and password= pairs are hidden."""
    redactor = Redactor()
    out = redactor.text(
        "Authorization: Token abc123 X-Api-Key: k9 http://u:pw1@h/x password=hunter2&a=1 "
        "Bearer eyJhbGciOi.x.y"
    )
    for secret in ("abc123", "k9", "pw1", "hunter2", "eyJhbGciOi"):
        assert secret not in out
    assert "Authorization: Token ***" in out
    assert "http://u:***@h/x" in out


def test_ordinary_text_and_short_values_are_left_alone() -> None:
    """Text without secrets is unchanged; values under four characters are not searched for."""
    redactor = Redactor(["ab", "token-long-enough"])
    text = "value 0.5 % above threshold 0.1 % (labels ab)"
    assert redactor.text(text) == text


def test_documents_keep_their_shape() -> None:
    """Strings inside a document are redacted; secret-named keys lose their value; rest kept."""
    redactor = Redactor(["s3cret-value"])
    doc = {"a": ["x s3cret-value y", 1.5, None], "password": "anything", "n": {"k": "v"}}
    assert redactor.value(doc) == {
        "a": ["x *** y", 1.5, None],
        "password": REDACTED,
        "n": {"k": "v"},
    }


def test_learning_later_secrets() -> None:
    """Secrets learned after a reload join the earlier ones; none is forgotten."""
    redactor = Redactor(["first-secret"])
    redactor.learn(["second-secret"])
    assert redactor.text("first-secret second-secret") == "*** ***"
