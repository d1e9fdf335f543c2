"""The operator page on the API's listener: ``GET /``, ``/incidents/{id}``, their live JSON, assets.

Server-rendered (``pageview``, in the API's render pool), updated by polling ``/page/live``
every few seconds (plain requests: no long-lived connection counts against the listener's
cap). With ``daemon.status_token`` the page shows nothing without the token: its script asks
for it. The page's buttons send the API's own token-guarded POSTs; this module adds none.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from aiohttp import web

from rollbackd import pageview
from rollbackd.codec import dumps
from rollbackd.engine import Check

if TYPE_CHECKING:
    from rollbackd.pagetemplates import Templates

T = TypeVar("T")

POLL_SECONDS = 2.0
"""How often the page's script asks ``/page/live`` (README, "The operator page")."""

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
"""On every answer of the page: no inline script or style, no framing, no sniffing."""

ASSET_MAX_AGE = 3600
"""Seconds a browser keeps the CSS and script (the page links them with their hash)."""

STATIC = {
    "page.css": "text/css; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
    "icon.svg": "image/svg+xml",
}
"""The files under ``rollbackd/web/static`` the page serves, with their types."""


@dataclass(frozen=True, slots=True)
class Asset:
    """A static file of the page, kept in memory with its validator."""

    body: bytes
    content_type: str
    etag: str


def assets() -> dict[str, Asset]:
    """The page's CSS and script, read from the package (``rollbackd/web/static``)."""
    folder = resources.files("rollbackd").joinpath("web", "static")
    found = {}
    for name, kind in STATIC.items():
        body = folder.joinpath(name).read_bytes()
        found[name] = Asset(body, kind, hashlib.sha256(body).hexdigest()[:16])
    return found


@dataclass(frozen=True, slots=True)
class Gathered:
    """What ``/`` shows, read on the loop; ``status`` None when the token is needed."""

    status: dict[str, Any] | None
    history: dict[str, Sequence[Check]]
    slots: int
    now: float


@runtime_checkable
class Records(Protocol):
    """What the page reads beyond /status (the daemon has it; a bare surface may not)."""

    @property
    def history(self) -> int:
        """Checks kept per monitor (``daemon.history``): the sparklines' width in checks."""

    async def recent_checks(self, monitor: str) -> Sequence[Check]:
        """The newest ``history`` checks of ``monitor``, oldest first."""

    async def incident_document(self, incident: str) -> dict[str, Any] | None:
        """One incident as the page shows it (secrets redacted), or None if unknown."""


class Host(Protocol):
    """What the page asks of the API server it is served by (``api.ApiServer``)."""

    @property
    def surface(self) -> Any:
        """The daemon (``api.Surface``; ``Records`` too when it keeps history)."""

    @property
    def status_token(self) -> bool:
        """Whether reading the status needs the control token."""

    def authorized(self, request: web.Request) -> bool:
        """Whether ``request`` carries the control token."""

    def render(self, render: Callable[[Any], T], subject: object) -> Awaitable[T]:
        """Run ``render(subject)`` in the render pool."""


class Page:
    """The page's routes on ``host``'s application."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.assets = assets()
        self._templates: Templates | None = None
        self._loading = threading.Lock()

    def templates(self) -> Templates:
        """The compiled templates, loaded on first use (in the render pool: jinja2 is ~3 MiB)."""
        with self._loading:
            if self._templates is None:
                from rollbackd.pagetemplates import Templates  # noqa: PLC0415 - see docstring

                self._templates = Templates()
            return self._templates

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Register ``/``, ``/incidents/{incident}``, the live JSON and ``/static/{name}``."""
        router.add_get("/", self._index)
        router.add_get("/incidents/{incident}", self._incident)
        router.add_get("/page/live", self._live)
        router.add_get("/page/live/incidents/{incident}", self._incident_live)
        router.add_get("/static/{name}", self._static)

    # --- handlers -----------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.Response:
        html = await self.host.render(self._index_page, await self._gather(request))
        return _html(html)

    async def _live(self, request: web.Request) -> web.Response:
        if self._locked(request):
            return _unauthorized()
        gathered = await self._gather(request)
        sections = await self.host.render(self._index_sections, gathered)
        return _json({"sections": sections, "at": gathered.now})

    async def _incident(self, request: web.Request) -> web.Response:
        context = await self._incident_context(request)
        html = await self.host.render(self._page, ("incident.html", context))
        found = context["locked"] or context["incident"] is not None
        return _html(html, status=200 if found else 404)

    async def _incident_live(self, request: web.Request) -> web.Response:
        if self._locked(request):
            return _unauthorized()
        context = await self._incident_context(request)
        if context["incident"] is None:
            message = f"no incident {context['id']!r}"
            return _json({"error": "unknown_incident", "message": message}, status=404)
        sections = await self.host.render(self._sections, (context, pageview.INCIDENT_SECTIONS))
        return _json({"sections": sections, "at": context["now"]})

    async def _static(self, request: web.Request) -> web.Response:
        asset = self.assets.get(request.match_info["name"])
        if asset is None:
            raise web.HTTPNotFound
        etag = f'"{asset.etag}"'
        headers = {
            **SECURITY_HEADERS,
            "Cache-Control": f"public, max-age={ASSET_MAX_AGE}",
            "ETag": etag,
        }
        if etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=asset.body, headers={**headers, "Content-Type": asset.content_type}
        )

    # --- data and rendering ----------------------------------------------------------------

    def _locked(self, request: web.Request) -> bool:
        return self.host.status_token and not self.host.authorized(request)

    async def _gather(self, request: web.Request) -> Gathered:
        """The data of ``/`` (on the loop: the daemon's state and its store live there)."""
        now = time.time()
        if self._locked(request):
            return Gathered(None, {}, 1, now)
        status = self.host.surface.status()
        history: dict[str, Sequence[Check]] = {}
        slots = 1
        records = self.host.surface
        if isinstance(records, Records):
            slots = records.history
            for name in status.get("monitors", {}):
                history[name] = await records.recent_checks(name)
        return Gathered(status, history, slots, now)

    def _index_context(self, gathered: Gathered) -> dict[str, Any]:
        """The views of ``/`` (in the render pool: sparklines of every series cost CPU)."""
        status, history, slots, now = (
            gathered.status,
            gathered.history,
            gathered.slots,
            gathered.now,
        )
        return self._common(pageview.index_context(status, history, slots=slots, now=now))

    def _index_page(self, gathered: Gathered) -> str:
        return self.templates().page("index.html", self._index_context(gathered))

    def _index_sections(self, gathered: Gathered) -> dict[str, str]:
        return self.templates().sections(self._index_context(gathered), pageview.SECTIONS)

    async def _incident_context(self, request: web.Request) -> dict[str, Any]:
        incident_id = request.match_info["incident"]
        locked = self._locked(request)
        found = None
        records = self.host.surface
        if not locked and isinstance(records, Records):
            found = await records.incident_document(incident_id)
        context = pageview.incident_context(found, incident_id, locked=locked, now=time.time())
        return self._common(context)

    def _common(self, context: dict[str, Any]) -> dict[str, Any]:
        """What every template needs besides its data: asset versions, the poll period."""
        versions = {name: asset.etag for name, asset in self.assets.items()}
        return {**context, "asset_versions": versions, "poll_ms": int(POLL_SECONDS * 1000)}

    def _page(self, subject: tuple[str, Mapping[str, Any]]) -> str:
        template, context = subject
        return self.templates().page(template, context)

    def _sections(self, subject: tuple[Mapping[str, Any], Sequence[str]]) -> dict[str, str]:
        context, names = subject
        return self.templates().sections(context, names)


def _html(text: str, *, status: int = 200) -> web.Response:
    return web.Response(
        text=text,
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"},
    )


def _json(data: dict[str, Any], *, status: int = 200) -> web.Response:
    return web.Response(
        text=dumps(data),
        status=status,
        content_type="application/json",
        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"},
    )


def _unauthorized() -> web.Response:
    """As /status answers without the token (the script then asks for it)."""
    body = {"error": "unauthorized", "message": "send Authorization: Bearer <control token>"}
    response = _json(body, status=401)
    response.headers["WWW-Authenticate"] = 'Bearer realm="rollbackd"'
    return response
