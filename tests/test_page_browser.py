"""The operator page in a real browser: Debian's chromium driven by Playwright, no download.

An in-process daemon watches two scripted monitors. The page must load without console
errors, show the monitors, change by itself when one breaches and rolls back, refuse a re-arm
with a wrong token and re-arm with the right one. The screenshot README shows is saved here.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rollbackd import assemble
from rollbackd.api import read_control_token
from rollbackd.daemon import Daemon
from rollbackd.engine import Phase
from tests import scripted
from tests.helpers import daemon_table, running, wait_until
from tests.servers import free_port

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "operator-page.png"
UI_TIMEOUT_MS = 15_000
"""How long the page may take to show a change (it polls every 2 s)."""


def chromium_or_skip() -> str:
    """The system chromium; skip with the reason outside CI, fail in CI (it must be there)."""
    path = CHROMIUM if os.access(CHROMIUM, os.X_OK) else shutil.which("chromium")
    try:
        import playwright.async_api  # noqa: F401, PLC0415 - only this file needs it
    except ImportError:
        path = None
    if path is None:
        reason = "needs Debian's chromium (apt-get install chromium) and playwright (pip)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: scripts/setup --test installs both")
        pytest.skip(reason)
    return path


def launch_args() -> list[str]:
    """Headless, no network chatter of its own; no sandbox when root (CI runs as root)."""
    args = [
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
    ]
    if os.geteuid() == 0:
        args.append("--no-sandbox")
    return args


@pytest.fixture(autouse=True)
def healthy() -> Iterator[None]:
    """Both monitors read healthy values until a test breaks one."""
    scripted.reset()
    scripted.VALUES.update({"pay": 0.05, "auth": 0.3})
    yield
    scripted.reset()


def config(state_dir: Path, port: int, *, status_token: bool = False) -> dict[str, Any]:
    """Two monitors on the scripted source, checked every 200 ms; payments rolls back at 3."""
    daemon = daemon_table(state_dir, environment="browser-test", listen=f"127.0.0.1:{port}")

    def monitor(rule: str, query: str, above: float) -> dict[str, Any]:
        return {
            "interval": "200ms",
            "rollback_after": 3,
            "alert_after": 1,
            "on_alert": ["note"],
            "on_rollback": ["note"],
            "rules": [
                {"name": rule, "source": "script", "query": query, "above": above, "unit": "%"}
            ],
        }

    return {
        "daemon": {**daemon, "status_token": status_token, "history": 40},
        "sources": {"script": {"type": scripted.KIND}},
        "monitors": {
            "payments": monitor("payment-error-rate", "pay", 0.1),
            "authentication": monitor("auth-error-rate", "auth", 1.0),
        },
        "actions": {"note": {"type": "alert.log"}},
    }


@dataclass
class Browser:
    """What a test drives: the daemon, its URL and token, and a chromium."""

    daemon: Daemon
    url: str
    token: str
    chromium: Any
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)

    async def page(self, *, width: int = 1100, javascript: bool = True) -> Any:
        """A fresh tab (its own session storage) that records console errors and requests."""
        context = await self.chromium.new_context(
            viewport={"width": width, "height": 900}, java_script_enabled=javascript
        )
        tab = await context.new_page()
        tab.set_default_timeout(UI_TIMEOUT_MS)
        tab.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else 0)
        tab.on("pageerror", lambda e: self.page_errors.append(str(e)))

        def keep(request: Any) -> None:
            self.requests.append(request)

        tab.on("request", keep)
        tab.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        return tab


Body = Callable[[Browser], Awaitable[None]]


async def with_browser(tmp_path: Path, body: Body, *, status_token: bool = False) -> None:
    """Run ``body`` against a daemon on a free port and a headless system chromium."""
    executable = chromium_or_skip()
    from playwright.async_api import async_playwright, expect  # noqa: PLC0415 - skip first

    expect.set_options(timeout=UI_TIMEOUT_MS)

    port = free_port()
    raw = config(tmp_path / "state", port, status_token=status_token)
    assembly = assemble.from_dict(raw, registries=scripted.REGISTRIES)

    async def run(daemon: Daemon) -> None:
        token = read_control_token(tmp_path / "state")
        async with async_playwright() as driver:
            chromium = await driver.chromium.launch(
                executable_path=executable, headless=True, args=launch_args()
            )
            try:
                await body(Browser(daemon, f"http://127.0.0.1:{port}", token, chromium))
            finally:
                await chromium.close()

    await running(assembly, run, scripted.REGISTRIES)


def badge(tab: Any, monitor: str) -> Any:
    """The state badge of ``monitor`` on the page."""
    return tab.locator(f'[data-monitor="{monitor}"] .badge')


async def test_page_follows_a_breach_and_rearms_only_with_the_token(tmp_path: Path) -> None:
    """Loads clean, updates itself on a rollback, refuses a wrong token, re-arms with the right."""
    from playwright.async_api import expect  # noqa: PLC0415 - after the skip check

    async def body(b: Browser) -> None:
        payments = b.daemon.monitors["payments"]
        await wait_until(lambda: payments.state.checks >= 3, what="first checks")
        tab = await b.page()
        await tab.goto(b.url + "/")
        await expect(badge(tab, "payments")).to_have_text("ok")
        await expect(badge(tab, "authentication")).to_have_text("ok")
        await expect(tab.locator("#live")).to_contain_text("live, updated")
        assert await tab.evaluate("document.documentElement.classList.contains('js')")
        assert b.console_errors == []
        assert b.page_errors == []
        assert await tab.locator('[data-monitor="payments"] svg.spark').count() == 1

        # A breach: the page changes by itself (no reload: the marker survives).
        await tab.evaluate("window.__sameDocument = true")
        scripted.VALUES["pay"] = 4.2
        await expect(badge(tab, "payments")).to_have_text("rolled_back")
        assert await tab.evaluate("window.__sameDocument === true")
        series = tab.locator('[data-monitor="payments"] .series')
        await expect(series).to_contain_text("4.2% breach if > 0.1%")
        await expect(series.locator(".verdict")).to_have_text("breach")
        await expect(tab.locator('[data-section="incidents"]')).to_contain_text("rollback")
        await expect(tab.locator('[data-monitor="payments"] circle.breach').first).to_be_attached()
        SCREENSHOT.parent.mkdir(exist_ok=True)
        await tab.screenshot(path=str(SCREENSHOT), full_page=True)
        scripted.VALUES["pay"] = 0.05  # healthy again: a re-arm stays ok

        # Re-arm without the right token: asked for it, refused by the daemon, still latched.
        rearm = tab.locator('[data-monitor="payments"] button[data-act="rearm"]')
        await rearm.click()
        await expect(tab.locator("#token-form")).to_be_visible()
        await tab.click("#token-cancel")  # no token: nothing is sent
        await expect(tab.locator("#token-form")).to_be_hidden()
        assert [r for r in b.requests if r.method == "POST"] == []
        await rearm.click()
        await expect(tab.locator("#token-form")).to_be_visible()
        await tab.fill("#token-input", "not-the-control-token")
        await tab.click('#token-form button[type="submit"]')
        await expect(tab.locator("#messages")).to_contain_text("Refused")
        assert payments.state.phase is Phase.ROLLED_BACK
        await expect(badge(tab, "payments")).to_have_text("rolled_back")
        stored = "sessionStorage.getItem('rollbackd.control-token')"
        assert await tab.evaluate(stored) is None  # a refused token is not kept

        # With the token: asked once, kept for the tab, the monitor shows ok.
        await rearm.click()
        await tab.fill("#token-input", b.token)
        await tab.click('#token-form button[type="submit"]')
        await expect(tab.locator("#messages")).to_contain_text("Done: re-arm payments")
        await expect(badge(tab, "payments")).to_have_text("ok")
        assert payments.state.phase is Phase.OK
        assert await tab.evaluate(stored) == b.token

        posts = [r for r in b.requests if r.method == "POST"]
        assert [r.url for r in posts] == [b.url + "/rearm/payments"] * 2
        assert posts[-1].headers["authorization"] == f"Bearer {b.token}"
        assert not any(b.token in r.url for r in b.requests), "the token went into a URL"
        unexpected = [e for e in b.console_errors if "401" not in e]  # the refused POST
        assert unexpected == []
        assert b.page_errors == []

        # The incident, rendered for people, one click away.
        await tab.locator('[data-section="incidents"] li.event-rollback a').first.click()
        await expect(tab.locator("h1")).to_contain_text("rollback")
        await expect(tab.locator("section.steps")).to_contain_text("note")

    await with_browser(tmp_path, body)


async def test_page_is_readable_at_375px_and_without_javascript(tmp_path: Path) -> None:
    """At 375 px nothing scrolls sideways; without JS the monitors show with the CLI hints."""
    from playwright.async_api import expect  # noqa: PLC0415 - after the skip check

    async def body(b: Browser) -> None:
        payments = b.daemon.monitors["payments"]
        scripted.VALUES["pay"] = 4.2
        await wait_until(lambda: payments.state.phase is Phase.ROLLED_BACK, what="rollback")
        phone = await b.page(width=375)
        await phone.goto(b.url + "/")
        await expect(badge(phone, "payments")).to_have_text("rolled_back")
        assert await phone.evaluate("document.documentElement.scrollWidth") <= 375
        plain = await b.page(javascript=False)
        await plain.goto(b.url + "/")
        await expect(badge(plain, "authentication")).to_have_text("ok")
        await expect(plain.locator('[data-monitor="payments"] .cli')).to_have_text(
            "rollbackd rearm payments"
        )
        await expect(plain.locator('[data-monitor="payments"] button.act')).to_be_hidden()
        assert b.console_errors == []

    await with_browser(tmp_path, body)


async def test_page_asks_for_the_token_when_the_status_needs_it(tmp_path: Path) -> None:
    """With status_token the page shows nothing until the token is given, then the monitors."""
    from playwright.async_api import expect  # noqa: PLC0415 - after the skip check

    async def body(b: Browser) -> None:
        tab = await b.page()
        await tab.goto(b.url + "/")
        await expect(tab.locator("#token-form")).to_be_visible()
        await expect(tab.locator(".locked")).to_contain_text("Token needed")
        assert await badge(tab, "payments").count() == 0
        await tab.fill("#token-input", b.token)
        await tab.click('#token-form button[type="submit"]')
        await expect(badge(tab, "payments")).to_have_text("ok")
        await expect(tab.locator(".facts")).to_contain_text("browser-test")
        assert not any(b.token in r.url for r in b.requests)
        live = [r for r in b.requests if r.url.endswith("/page/live")]
        assert live[-1].headers["authorization"] == f"Bearer {b.token}"
        assert [e for e in b.console_errors if "401" not in e] == []

    await with_browser(tmp_path, body, status_token=True)
