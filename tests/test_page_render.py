"""The operator page's HTML on a real loopback server: escaping, headers, the token, no inline code.

A daemon stand-in gives a /status document with hostile text in every field a person or a
metrics source can choose (monitor names come from the TOML, labels and reasons from sources).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from rollbackd import assemble
from rollbackd import page as page_module
from rollbackd.api import ApiServer
from rollbackd.daemon import Daemon
from rollbackd.engine import Check, Outcome, Phase
from rollbackd.errors import StateError
from rollbackd.sparkline import MAX_POINTS, Point, bucketed, draw
from rollbackd.verdicts import RuleResult, Verdict
from tests import scripted
from tests.helpers import daemon_table, payment_error_rate, running, wait_until
from tests.servers import free_port
from tests.test_api_render import Surface as ApiSurface

TOKEN = "page-render-token-0123456789"
EVIL = '<script>alert("x")</script>'
EVIL_ATTR = '"><img src=x onerror=alert(1)>'
ROOT = Path(__file__).resolve().parent.parent


def _rule_item(value: float | None, verdict: str, reason: str, labels: dict[str, str]) -> Any:
    return {
        "labels": labels,
        "value": value,
        "verdict": verdict,
        "threshold": 1.0,
        "direction": "above",
        "unit": "%",
        "reason": reason,
    }


def _monitor(state: str, rules: dict[str, list[Any]], incident: str | None = None) -> Any:
    return {
        "state": state,
        "consecutive_failures": 3 if state != "ok" else 0,
        "consecutive_errors": 0,
        "rollback_after": 3,
        "alert_after": 1,
        "blind_after": 5,
        "interval_seconds": 1.0,
        "evaluate_on_arrival": False,
        "checks": 12,
        "last_check_at": 1_795_000_000.0,
        "last_outcome": "breach" if state != "ok" else "ok",
        "incident": incident,
        "shadow_failures": 0,
        "shadow_rules": [],
        "held": None,
        "failed_runs": 0,
        "trouble": None,
        "rules": rules,
    }


def hostile_status() -> dict[str, Any]:
    """A /status document whose monitor, labels, reasons and incident carry markup."""
    rules = {
        "error-rate": [
            _rule_item(4.5, "breach", f"value 4.5 above 1.0 {EVIL}", {"region": EVIL_ATTR}),
        ]
    }
    return {
        "version": "9.9.9",
        "mode": "armed",
        "environment": f"prod{EVIL}",
        "config_sha256": "ab" * 32,
        "limits": {"max_rollbacks": None, "rearm_cooldown_seconds": None},
        "monitors": {
            f"pay{EVIL}": _monitor("rolled_back", rules, incident=f"inc{EVIL_ATTR}"),
            "authentication": _monitor("ok", {"auth-rate": [_rule_item(0.2, "ok", "fine", {})]}),
        },
        "waiting": [
            {
                "id": "inc-wait",
                "monitor": "payments",
                "waiting": "approval",
                "reason": f"max_rollbacks {EVIL}",
                "until": None,
                "opened_at": 1_795_000_000.0,
            }
        ],
        "incidents": [
            {
                "id": f"inc{EVIL_ATTR}",
                "monitor": f"pay{EVIL}",
                "event": "rollback",
                "mode": "armed",
                "opened_at": 1_795_000_000.0,
                "finished_at": None,
                "waiting": None,
                "approved_at": None,
                "steps": [{"step": 0, "action": f"stop{EVIL}", "status": "ok", "detail": EVIL}],
            }
        ],
    }


def _check(at: float, value: float, monitor: str = "authentication") -> Check:
    verdict = Verdict.BREACH if value > 1.0 else Verdict.OK
    result = RuleResult("auth-rate", (), value, 1.0, "above", "%", verdict, "r", at)
    return Check(monitor, at, Outcome.BREACH if value > 1.0 else Outcome.OK, (result,))


@dataclass
class Surface(ApiSurface):
    """A daemon stand-in with history and incidents (``page.Records``)."""

    document: dict[str, Any] = field(default_factory=hostile_status)
    mode: str = "armed"
    checks: dict[str, list[Check]] = field(default_factory=dict)
    incidents: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: int = 20

    async def recent_checks(self, monitor: str) -> Sequence[Check]:
        """The checks as set."""
        return self.checks.get(monitor, [])

    async def incident_document(self, incident: str) -> dict[str, Any] | None:
        """The incident as set, or None."""
        return self.incidents.get(incident)


def hostile_incident() -> dict[str, Any]:
    """An incident whose reason, trigger, steps and details carry markup."""
    result = {
        "rule": f"rate{EVIL}",
        "labels": {"region": EVIL_ATTR},
        "value": "+Inf",
        "threshold": 1.0,
        "direction": "above",
        "unit": "%",
        "verdict": "breach",
        "reason": EVIL,
        "at": 1_795_000_000.0,
    }
    trigger = {
        "monitor": "payments",
        "at": 1_795_000_000.0,
        "outcome": "breach",
        "results": [result],
    }
    return {
        "id": "inc-1",
        "monitor": f"pay{EVIL}",
        "event": "rollback",
        "reason": f"3 failing checks {EVIL}",
        "mode": "armed",
        "opened_at": 1_795_000_000.0,
        "finished_at": 1_795_000_010.0,
        "waiting": None,
        "approved_at": None,
        "details": {"trigger": trigger, "checks": [trigger], "note": EVIL},
        "steps": [
            {
                "step": 0,
                "action": "route-legacy",
                "status": "failed",
                "attempts": 3,
                "started_at": 1_795_000_001.0,
                "finished_at": 1_795_000_002.5,
                "seconds": 1.5,
                "detail": f"HTTP 500 {EVIL}",
            }
        ],
    }


@dataclass
class Served:
    """A running server and its stand-in."""

    surface: Surface
    server: ApiServer

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    """The API (with the page) on a free loopback port, over the hostile stand-in."""
    surface = Surface()
    surface.checks["authentication"] = [_check(100.0 + i, 0.2 + i * 0.1) for i in range(12)]
    surface.incidents["inc-1"] = hostile_incident()
    server = ApiServer(surface, CollectorRegistry(), TOKEN, ("127.0.0.1", 0), version="t")
    async with server:
        yield Served(surface, server)


async def _get(url: str, token: str | None = None, **headers: str) -> tuple[int, Any, str]:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as answer:
        return answer.status, answer.headers, await answer.text()


class Markup(HTMLParser):
    """Collects what matters for the page's safety: scripts, inline handlers, styles, forms."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Keep every start tag with its attributes."""
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        """Leave a script."""
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        """Text inside a script element is inline code."""
        if self._in_script:
            self.script_text += data.strip()


def parse(html: str) -> Markup:
    """Parse ``html`` into its tags."""
    markup = Markup()
    markup.feed(html)
    return markup


def assert_no_inline_code(html: str) -> None:
    """Scripts only by ``src`` from the daemon, no inline script, handler or style."""
    markup = parse(html)
    scripts = [attrs for tag, attrs in markup.tags if tag == "script"]
    assert scripts, "the page has no script"
    assert all((a.get("src") or "").startswith("/static/") for a in scripts)
    assert markup.script_text == ""
    for tag, attrs in markup.tags:
        assert "style" not in attrs, f"inline style on <{tag}>"
        assert not any(name.startswith("on") for name in attrs), f"inline handler on <{tag}>"
        assert tag != "style"
    for attrs in (a for _, a in markup.tags):
        for name in ("href", "src", "action"):
            value = attrs.get(name) or ""
            assert not value.startswith(("http:", "https:", "//")), f"external {name}: {value}"


async def test_hostile_text_is_escaped_everywhere_on_the_index(served: Served) -> None:
    """Markup in monitor names, labels, reasons and incidents arrives as text, never as tags."""
    status, _, html = await _get(served.url + "/")
    assert status == 200
    assert EVIL not in html
    assert "<img" not in html
    assert "&lt;script&gt;" in html
    assert "onerror=alert(1)&gt;" in html  # the attribute breakout stays inside its value
    markup = parse(html)
    assert not [t for t, _ in markup.tags if t == "img"]
    # Links and control URLs quote the hostile id as one path segment.
    hrefs = [a.get("href") or "" for t, a in markup.tags if t == "a"]
    assert any(h.startswith("/incidents/inc%22%3E%3Cimg") for h in hrefs), hrefs
    urls = [a.get("data-url") for t, a in markup.tags if a.get("data-act") == "rearm"]
    assert urls == ["/rearm/pay%3Cscript%3Ealert%28%22x%22%29%3C%2Fscript%3E"]


async def test_live_sections_are_escaped_too(served: Served) -> None:
    """The polled sections (put in place by the script) are escaped like the page."""
    status, headers, body = await _get(served.url + "/page/live")
    assert status == 200
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    data = json.loads(body)
    assert set(data["sections"]) == {"summary", "monitors", "rollouts", "incidents"}
    for html in data["sections"].values():
        assert EVIL not in html
        assert "<img" not in html


async def test_incident_page_shows_the_record_escaped(served: Served) -> None:
    """An incident renders trigger, checks, steps with results and times; markup as text."""
    status, headers, html = await _get(served.url + "/incidents/inc-1")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert EVIL not in html
    assert "<img" not in html
    for shown in (
        "route-legacy",
        "failed",
        "1.500 s",
        "2026-11-18 11:06:41Z",
        "+Inf%",
        "Retry failed",
    ):
        assert shown in html, shown
    assert_no_inline_code(html)


async def test_unknown_incident_is_an_html_404(served: Served) -> None:
    """An incident the store does not know is a 404 page naming the id (escaped)."""
    status, _, html = await _get(served.url + "/incidents/" + "nope%3Cb%3E")
    assert status == 404
    assert "No incident nope&lt;b&gt;" in html
    status, _, _ = await _get(served.url + "/page/live/incidents/nope")
    assert status == 404


async def test_page_is_readable_at_375px_and_has_no_inline_code(served: Served) -> None:
    """A viewport meta for phones; scripts by src only; no inline style or handler anywhere."""
    _, _, html = await _get(served.url + "/")
    markup = parse(html)
    viewports = [a for t, a in markup.tags if t == "meta" and a.get("name") == "viewport"]
    assert viewports == [{"name": "viewport", "content": "width=device-width, initial-scale=1"}]
    assert_no_inline_code(html)
    css = (ROOT / "rollbackd/web/static/page.css").read_text(encoding="utf-8")
    assert "@media (max-width: 30rem)" in css
    assert "@import" not in css
    assert "url(" not in css  # no fonts or images from anywhere


async def test_security_headers_on_every_page_answer(served: Served) -> None:
    """CSP default-src 'self' without inline, no framing, nosniff: pages, live JSON, assets."""
    for path in ("/", "/incidents/inc-1", "/page/live", "/static/page.js", "/static/page.css"):
        status, headers, _ = await _get(served.url + path)
        assert status == 200, path
        csp = headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "frame-ancestors 'none'" in csp
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["X-Content-Type-Options"] == "nosniff"


async def test_assets_are_cached_and_revalidated(served: Served) -> None:
    """CSS and script: types, Cache-Control, an ETag a browser revalidates with (304)."""
    status, headers, body = await _get(served.url + "/static/page.js")
    assert status == 200
    assert headers["Content-Type"].startswith("text/javascript")
    assert "max-age=" in headers["Cache-Control"]
    etag = headers["ETag"]
    status, _, body = await _get(served.url + "/static/page.js", **{"If-None-Match": etag})
    assert status == 304
    assert body == ""
    _, _, html = await _get(served.url + "/")
    assert f"/static/page.js?v={etag.strip(chr(34))}" in html
    status, headers, _ = await _get(served.url + "/static/other.js")
    assert status == 404
    status, headers, _ = await _get(served.url + "/static/icon.svg")
    assert headers["Content-Type"] == "image/svg+xml"


async def test_the_token_never_goes_into_a_url(served: Served) -> None:
    """The token input has no name and the form cannot submit; the script sends a header."""
    _, _, html = await _get(served.url + "/")
    markup = parse(html)
    forms = [a for t, a in markup.tags if t == "form"]
    assert forms == [{"class": "token", "id": "token-form", "hidden": None}]
    inputs = [a for t, a in markup.tags if t == "input"]
    assert inputs
    assert all("name" not in a for a in inputs)
    script = (ROOT / "rollbackd/web/static/page.js").read_text(encoding="utf-8")
    assert '"Authorization": "Bearer " + t' in script
    assert "sessionStorage" in script
    assert "localStorage" not in script
    assert not re.search(r"[?&]token", script)
    assert "innerHTML = sections[name]" in script  # only the daemon's escaped sections
    assert script.count("innerHTML") == 2  # that assignment and its comparison


async def test_status_token_keeps_the_page_empty_without_the_token() -> None:
    """With status_token, / and incidents show no data and the live JSON needs the token."""
    surface = Surface()
    surface.incidents["inc-1"] = hostile_incident()
    server = ApiServer(
        surface, CollectorRegistry(), TOKEN, ("127.0.0.1", 0), version="t", status_token=True
    )
    async with server:
        url = f"http://127.0.0.1:{server.port}"
        status, _, html = await _get(url + "/")
        assert status == 200
        assert "Token needed" in html
        assert "authentication" not in html
        assert "prod" not in html
        status, headers, _ = await _get(url + "/page/live")
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, _, _ = await _get(url + "/page/live", token="wrong")
        assert status == 401
        status, _, body = await _get(url + "/page/live", token=TOKEN)
        assert status == 200
        assert "authentication" in body
        status, _, html = await _get(url + "/incidents/inc-1")
        assert status == 200
        assert "route-legacy" not in html
        assert "Token needed" in html
        status, _, _ = await _get(url + "/page/live/incidents/inc-1")
        assert status == 401
        status, _, body = await _get(url + "/page/live/incidents/inc-1", token=TOKEN)
        assert status == 200
        assert "route-legacy" in body


async def test_rollouts_and_role_render_when_the_document_has_them(served: Served) -> None:
    """Once /status carries ``rollouts`` and ``role``, the page shows them with their controls."""
    served.surface.document = {
        **hostile_status(),
        "role": "leader",
        "generation": 7,
        "peers": ["b"],
        "rollouts": {
            "boop": {"percent": 25, "step": 1, "state": "holding", "hold_remaining_s": 3725.0},
            f"old{EVIL}": {"percent": 50, "step": 2, "state": "paused", "hold_remaining_s": None},
        },
    }
    _, _, html = await _get(served.url + "/")
    markup = parse(html)
    progress = [a for t, a in markup.tags if t == "progress"]
    assert {p["value"] for p in progress} == {"25.0", "50.0"}
    assert "1h 02m left" in html
    assert "leader (generation 7)" in html
    buttons = {(a.get("data-act"), a.get("data-url")) for t, a in markup.tags if t == "button"}
    assert ("pause", "/rollouts/boop/pause") in buttons
    assert ("resume", "/rollouts/old%3Cscript%3Ealert%28%22x%22%29%3C%2Fscript%3E/resume") in (
        buttons
    )
    assert EVIL not in html


async def test_sparkline_draws_the_history_against_the_threshold(served: Served) -> None:
    """Each series with history gets an inline SVG: a line, the threshold, breach marks."""
    _, _, html = await _get(served.url + "/")
    svg = re.search(r'<svg class="spark".*?</svg>', html, re.S)
    assert svg is not None
    drawn = svg.group(0)
    assert 'class="threshold"' in drawn
    assert drawn.count('<circle class="breach"') == 3  # 1.1, 1.2, 1.3 are above 1.0
    assert "last 12 checks" in drawn


def test_draw_scales_values_and_threshold_together() -> None:
    """The threshold and every value fit the box; a gap breaks the line; the newest is right."""
    points = [Point(0.5), Point(None), Point(2.0, breach=True), Point(1.0)]
    spark = draw(points, 1.5, "above", slots=10, title="t")
    assert spark.path.count("M") == 2  # the gap starts a new stroke
    assert len(spark.breaches) == 1
    assert spark.last is not None
    assert spark.last[0] == pytest.approx(spark.width - 3.0)
    ys = [float(v) for v in re.findall(r"[ML][\d.]+ ([\d.]+)", spark.path)]
    assert all(0 <= y <= spark.height for y in [*ys, spark.threshold_y])
    assert spark.zone_y == 0.0  # "above": the breach zone is over the threshold line
    below = draw(points, 1.5, "below", slots=10, title="t")
    assert below.zone_y == below.threshold_y


def test_draw_handles_flat_infinite_and_empty_series() -> None:
    """A flat line, infinities and no values at all still give a drawable sparkline."""
    flat = draw([Point(3.0)] * 5, 3.0, "above", slots=5, title="t")
    assert flat.path.startswith("M")
    inf = draw(
        [Point(float("inf"), breach=True), Point(1.0)], float("inf"), "above", slots=2, title="t"
    )
    assert inf.last is not None
    empty = draw([Point(None)], 1.0, "below", slots=50, title="t")
    assert empty.path == ""
    assert empty.last is None


def test_long_history_is_bucketed_by_its_worst_value() -> None:
    """More checks than MAX_POINTS: groups keep the value worst for the rule and its breach."""
    points = [Point(float(i % 7), breach=i == 501) for i in range(MAX_POINTS * 3)]
    worst = bucketed(points, "above")
    assert len(worst) == MAX_POINTS
    assert all(
        p.value == max(q.value or 0 for q in points[i * 3 : i * 3 + 3]) for i, p in enumerate(worst)
    )
    assert sum(p.breach for p in worst) == 1
    lowest = bucketed(points, "below")
    assert lowest[0].value == 0.0


def test_package_data_ships_every_page_file() -> None:
    """Every template and asset matches pyproject's package-data (so a wheel install serves it)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    globs = pyproject["tool"]["setuptools"]["package-data"]["rollbackd"]
    package = ROOT / "rollbackd"
    for path in (package / "web").rglob("*"):
        if path.is_file():
            relative = path.relative_to(package)
            assert any(relative.match(g) for g in globs), f"{relative} not in package-data"
    assert set(page_module.STATIC) == {p.name for p in (package / "web/static").iterdir()}


async def test_health_answers_while_the_page_renders(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The page renders in the render pool: /health answers while a render is held."""
    started, release = threading.Event(), threading.Event()
    original = page_module.Page._index_page

    def held(self: page_module.Page, gathered: page_module.Gathered) -> str:
        started.set()
        release.wait(10)
        return original(self, gathered)

    def fetch(path: str) -> tuple[int, float]:
        with urllib.request.urlopen(served.url + path, timeout=20) as answer:
            return int(answer.status), time.monotonic()

    monkeypatch.setattr(page_module.Page, "_index_page", held)
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(2) as threads:
        try:
            rendering = loop.run_in_executor(threads, fetch, "/")
            assert await loop.run_in_executor(threads, started.wait, 10)
            health = await loop.run_in_executor(threads, fetch, "/health")
        finally:
            release.set()
        page = await rendering
    assert health[0] == 200
    assert page[0] == 200
    assert health[1] < page[1]


def test_the_daemon_loads_jinja2_only_when_the_page_is_asked_for() -> None:
    """Importing the daemon does not import jinja2 (~3 MiB); the first page render does."""
    code = (
        "import sys, rollbackd.daemon\n"
        "assert 'jinja2' not in sys.modules, 'jinja2 imported at start'\n"
        "from rollbackd.page import Page\n"
        "class Host:\n"
        "    surface = None\n"
        "    status_token = False\n"
        "Page(Host()).templates()\n"
        "assert 'jinja2' in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
async def test_page_of_a_running_daemon_shows_history_and_the_incident(tmp_path: Path) -> None:
    """A real daemon: sparklines from its stored checks, its rollback rendered for people."""
    port = free_port()
    scripted.reset()
    scripted.VALUES["pay"] = 0.05
    raw = {
        "daemon": {**daemon_table(tmp_path, listen=f"127.0.0.1:{port}"), "history": 30},
        "sources": {"script": {"type": scripted.KIND}},
        "monitors": {
            "payments": {
                "interval": "50ms",
                "rollback_after": 3,
                "on_rollback": ["note"],
                "rules": [payment_error_rate("script", "pay", above=0.1)],
            }
        },
        "actions": {"note": {"type": "alert.log"}},
    }
    config = assemble.from_dict(raw, registries=scripted.REGISTRIES)

    async def body(daemon: Daemon) -> None:
        runner = daemon.monitors["payments"]
        await wait_until(lambda: runner.state.checks >= 5, what="healthy checks")
        scripted.VALUES["pay"] = 3.0
        await wait_until(lambda: runner.state.phase is Phase.ROLLED_BACK, what="the rollback")
        url = f"http://127.0.0.1:{port}"
        status, _, html = await _get(url + "/")
        assert status == 200
        svg = re.search(r'<svg class="spark".*?</svg>', html, re.S)
        assert svg is not None
        assert 'class="breach"' in svg.group(0)
        assert 'data-act="rearm"' in html
        incident = runner.state.incident_id
        assert incident is not None
        await wait_until(
            lambda: daemon.store.incident(incident).finished_at is not None, what="the plan"
        )
        status, _, html = await _get(f"{url}/incidents/{incident}")
        assert status == 200
        for shown in ("payment-error-rate", "note", "The checks behind it", "3.0%"):
            assert shown in html, shown
        assert_no_inline_code(html)
        status, _, _ = await _get(f"{url}/incidents/20990101T000000Z-payments-0000")
        assert status == 404, "an unknown incident"

        async def failing(incident_id: str) -> None:
            raise StateError(f"{incident_id}: disk I/O error")

        daemon.state.incident = failing  # type: ignore[method-assign]
        status, _, answer = await _get(f"{url}/incidents/{incident}")
        assert status == 503, "a failing store is not 'no such incident'"
        assert "disk I/O error" in answer

    try:
        await running(config, body, scripted.REGISTRIES)
    finally:
        scripted.reset()
