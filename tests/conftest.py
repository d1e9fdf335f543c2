"""Fixtures starting real servers on loopback (see ``tests/servers.py``); their tests are slow.

- ``mosquitto``: a fresh broker per test (``.port``; ``.stop()`` / ``.start()`` for outages).
- ``alertmanager``: a fresh Alertmanager per test (``.url``, ``.alerts()``).
- ``exporter`` + ``prometheus``: one exporter and one Prometheus scraping it every second for
  the whole session (starting Prometheus's scrape loop costs ~5 s); use metric names of your own.
  Do not stop this shared Prometheus: for outages use ``start_prometheus()``.
- ``start_prometheus(targets=())``: a private Prometheus per call, stopped after the test.
- ``pg``: one PostgreSQL per test module (``tests/pg.py``; ``pg.database()`` gives each test a
  fresh database); a module may override it (``test_ha`` logs every statement).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.pg import Postgres, running
from tests.servers import Alertmanager, Exporter, Mosquitto, Prometheus


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """Run Mosquitto on a free loopback port, anonymous, without persistence."""
    with Mosquitto(tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    """Run Alertmanager on a free loopback port, routing to a null receiver."""
    with Alertmanager(tmp_path / "alertmanager") as server:
        yield server


@pytest.fixture(scope="session")
def exporter() -> Iterator[Exporter]:
    """Serve a loopback exporter with its own registry (``exporter.gauge(name, labels)``)."""
    server = Exporter()
    yield server
    server.close()


@pytest.fixture(scope="session")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, exporter: Exporter
) -> Iterator[Prometheus]:
    """Run one Prometheus for the session, scraping ``exporter`` every second, target up."""
    with Prometheus(tmp_path_factory.mktemp("prometheus"), [exporter.target]) as server:
        server.wait_targets_up()
        yield server


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[..., Prometheus]]:
    """Start private Prometheus servers (``start_prometheus(targets=[...])``); all stop after."""
    started: list[Prometheus] = []

    def start(targets: Sequence[str] = ()) -> Prometheus:
        server = Prometheus(tmp_path / f"prometheus-{len(started)}", targets)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    """One PostgreSQL for the module (a fresh database per test)."""
    with running() as server:
        yield server
