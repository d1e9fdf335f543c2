"""One redactor for everything rollbackd writes or shows: logs, /status, the store, records.

It knows every configured secret value (and the ways a value gets spelled in text: escaped
for JSON or repr, percent-encoded, line by line) and the shapes secrets take in text whatever
their value (``Authorization:`` headers, ``Bearer``/``Basic``/``Token`` credentials, URL
passwords, ``password=...`` pairs).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

REDACTED = "***"
MIN_SECRET_CHARS = 4
"""Shorter configured values are not searched for (they would blot out ordinary text); the
shapes below still catch them where they appear as credentials."""

_SCHEMES = r"Bearer|Basic|Token|Digest|ApiKey|Api-Key|Negotiate"
_SHAPES = re.compile(
    rf"(?P<scheme>\b(?:{_SCHEMES})\s+)[^\s\"',;]+"
    r"|(?P<header>\b(?:authorization|proxy-authorization|x-api-key|api[_-]?key|x-auth-token|"
    r"cookie|set-cookie)\s*[:=]\s*)(?!(?:" + _SCHEMES + r")\s)[^\s\"',;]+"
    r"|(?P<pair>\b(?:password|passwd|pwd|secret|token|access_token|client_secret)=)[^\s&\"',;]+"
    r"|(?P<userinfo>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]*:)[^/@\s]*(?=@)",
    re.IGNORECASE,
)
_SECRET_KEY = re.compile(
    r"token|passw(or)?d|secret|authori[sz]ation|api_?key|cookie|credential", re.IGNORECASE
)


def _spellings(secret: str) -> set[str]:
    """How ``secret`` may appear in text: as is, escaped, encoded, or one line of it."""
    found = {secret, secret.strip()}
    found.update(line.strip() for line in secret.splitlines())
    for value in list(found):
        found.update(
            {
                json.dumps(value)[1:-1],
                repr(value)[1:-1],
                str(value.encode("utf-8"))[2:-1],
                quote(value, safe=""),
                quote_plus(value, safe=""),
            }
        )
    return {s for s in found if len(s) >= MIN_SECRET_CHARS}


class Redactor:
    """Replaces secrets in text and documents with ``***``; ``learn`` adds secret values.

    Secrets are never forgotten: a reload that drops one may still see it in old text.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._known: re.Pattern[str] | None = None
        self.learn(secrets)

    def learn(self, secrets: Iterable[str]) -> None:
        """Also redact these values (and their spellings) from now on."""
        new = set().union(*(_spellings(s) for s in secrets if s)) - self._secrets
        if not new:
            return
        self._secrets |= new
        ordered = sorted(self._secrets, key=len, reverse=True)  # longest spelling first
        self._known = re.compile("|".join(map(re.escape, ordered)))

    def text(self, text: str) -> str:
        """``text`` with every known secret and credential-shaped part replaced."""
        if self._known is not None:
            text = self._known.sub(REDACTED, text)
        return _SHAPES.sub(_keep_label, text)

    def value(self, value: Any, key: object = None) -> Any:
        """A JSON-able document with its strings redacted; secret-named keys lose their value."""
        if isinstance(key, str) and _SECRET_KEY.search(key) and value not in (None, "", {}, []):
            return REDACTED
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.value(v, k) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value


def _keep_label(match: re.Match[str]) -> str:
    """Keep what says it is a credential (``Bearer ``, ``password=``), hide the credential."""
    label = next(g for g in match.groups() if g is not None)
    return f"{label}{REDACTED}"
