"""Building blocks of option models, for config.py and every plugin.

Frozen models, durations, secret references, CA files, URLs without credentials.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from rollbackd.errors import SecretError

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_LONGEST_TEXT = "3650d"
LONGEST_DURATION = 3650 * 86400.0
"""No duration in rollbackd is longer than ten years; ``parse_duration`` refuses more."""


def parse_duration(text: object) -> float:
    """Seconds in a duration string such as ``"500ms"``, ``"30s"``, ``"5m"``, ``"1h30m"``.

    A figure too long to mean anything (over ``LONGEST_DURATION``) is a ValueError, never an
    infinity or an OverflowError later.
    """
    if isinstance(text, bool) or not isinstance(text, str):
        raise ValueError(f'a duration is a string such as "30s" or "5m", not {text!r}')  # noqa: TRY004 - pydantic reports ValueError
    spec = text.strip()
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(spec):
        if match.start() != pos:
            break
        number, unit = match.group(1), _UNIT_SECONDS[match.group(2)]
        # Compare before multiplying: a 400-digit number is inf as a float.
        if float(number) > LONGEST_DURATION / unit:
            raise ValueError(f"duration {text!r} is too long: at most {_LONGEST_TEXT}")
        total += float(number) * unit
        pos = match.end()
    if pos == 0 or pos != len(spec):
        raise ValueError(
            f'invalid duration {text!r}: use a number and a unit (ms, s, m, h, d), e.g. "30s"'
        )
    if total > LONGEST_DURATION:
        raise ValueError(f"duration {text!r} is too long: at most {_LONGEST_TEXT}")
    return total


def bounded(low: str, high: str) -> BeforeValidator:
    """Validator of a duration key that must lie within ``low``..``high`` (both included).

    Use as ``interval: Annotated[float, bounded("50ms", "24h")] = 30.0``; the error names the
    bounds, pydantic names the key.
    """
    lowest, highest = parse_duration(low), parse_duration(high)

    def check(text: object) -> float:
        seconds = parse_duration(text)
        if not lowest <= seconds <= highest:
            raise ValueError(f"duration {text!r} is out of range: give {low} to {high}")
        return seconds

    return BeforeValidator(check)


Duration = Annotated[float, bounded("1ms", "30d")]
"""Seconds, written in TOML as a string like ``"30s"``; 1ms to 30d unless a key says otherwise.

Plugin option models use it as is; a key with tighter bounds declares them with ``bounded``.
"""


def _readable_ca_file(path: Path) -> Path:
    # Checked when the config loads: a typo is a check-config error, not a failed connection
    # or a failed step during an incident.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:  # an OSError too: caught first
        raise ValueError(f"{path} holds no PEM certificate ({exc.reason})") from exc
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return path


CaFile = Annotated[Path, AfterValidator(_readable_ca_file)]
"""Path of a PEM CA bundle that exists, is readable and holds a certificate (checked on load)."""


UrlT = TypeVar("UrlT")


def _no_userinfo(url: UrlT) -> UrlT:
    # A password in a URL lands wherever the URL is shown (logs, /status, records). Checked
    # on the text as written, so a URL template is checked before anything is rendered in.
    if "@" in urlsplit(str(url)).netloc:
        raise ValueError(
            "credentials in a URL are refused (they would be shown wherever the URL is): "
            'remove "user:password@" and give them as a secret reference, e.g. '
            'basic_auth = { username = "u", password = { env = "VAR" } }'
        )
    return url


NoUserinfo = AfterValidator(_no_userinfo)
"""Validator for URL fields (``str`` or pydantic URL types): ``user:password@host`` is a config
error naming the key; the message never repeats the URL."""


class Frozen(BaseModel):
    """Base of the config models: immutable, unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class SecretRef(Frozen):
    """Where a secret lives: an environment variable, a file, or a systemd credential.

    The TOML holds only the reference (``{ env = "PROM_TOKEN" }``), never the secret.
    """

    env: str | None = None
    file: Path | None = None
    credential: str | None = Field(
        default=None, description="name of a file in $CREDENTIALS_DIRECTORY (LoadCredential=)"
    )

    @model_validator(mode="before")
    @classmethod
    def _not_inline(cls, data: object) -> object:
        if isinstance(data, str):
            raise ValueError(  # noqa: TRY004 - pydantic turns ValueError into a key's error
                'secrets are never written in the config: use { env = "VAR" }, '
                '{ file = "/path" } or { credential = "name" }'
            )
        return data

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        given = [k for k in ("env", "file", "credential") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of env, file, credential")
        return self

    def reveal(self) -> str:
        """The secret's value (trailing newline stripped); SecretError if it cannot be read.

        No SecretError message holds the value, nor any part of it.
        """
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise SecretError(f"environment variable {self.env} is not set")
            if not _is_utf8(value):  # os.environ keeps undecodable bytes as surrogates
                raise SecretError(
                    f"environment variable {self.env} is not UTF-8 text: set it as UTF-8"
                )
            return value
        path = self._path()
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise SecretError(f"cannot read secret file {path}: {exc.strerror}") from exc
        try:
            return raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise SecretError(
                f"secret file {path} is not UTF-8 text (at byte {exc.start}): "
                "write the secret as UTF-8"
            ) from None  # the exception holds the file's bytes

    def where(self) -> str:
        """Where the secret lives, for messages: never its value."""
        if self.env is not None:
            return f"environment variable {self.env}"
        if self.file is not None:
            return f"secret file {self.file}"
        return f"credential {self.credential!r}"

    def _path(self) -> Path:
        if self.file is not None:
            return self.file
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if directory is None:
            raise SecretError(
                f"credential {self.credential!r} needs $CREDENTIALS_DIRECTORY "
                "(set by systemd's LoadCredential=)"
            )
        return Path(directory) / str(self.credential)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class HttpSecretRef(SecretRef):
    """A secret sent in an HTTP header (a token, a header value, a basic-auth password).

    Revealed only as one line of Latin-1 text without control characters, as HTTP carries
    it; otherwise a SecretError says where the secret lives and what is wrong, never the value.
    """

    def reveal(self) -> str:
        """The secret's value, checked to fit in an HTTP header; SecretError if it does not."""
        value = super().reveal()
        if "\r" in value or "\n" in value:
            problem = "has a line break inside the value (only a trailing one is allowed)"
        elif any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
            problem = "has a control character inside the value"
        elif any(ord(c) > 0xFF for c in value):
            problem = "has a character outside Latin-1 (such as €)"
        else:
            return value
        raise SecretError(
            f"{self.where()} {problem}: a value sent in an HTTP header or as a basic-auth "
            "password is one line of Latin-1 text; fix the secret"
        )


def secret_refs(
    value: object, loc: tuple[str | int, ...]
) -> Iterator[tuple[tuple[str | int, ...], SecretRef]]:
    """Every SecretRef inside a validated options model, with its dotted location."""
    if isinstance(value, SecretRef):
        yield loc, value
    elif isinstance(value, BaseModel):
        for key in type(value).model_fields:
            yield from secret_refs(getattr(value, key), (*loc, key))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from secret_refs(item, (*loc, str(key)))
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from secret_refs(item, (*loc, i))
