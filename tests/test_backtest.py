"""``rollbackd backtest``: a scripted week backfilled into a real Prometheus, replayed."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rollbackd import backtest, cli
from rollbackd.assemble import Assembly, load
from rollbackd.backtest import Backtest, BacktestError, Found
from rollbackd.config import MonitorConfig
from rollbackd.engine import Outcome, Phase, Transition
from rollbackd.monitor import MonitorRunner
from rollbackd.readings import error, ok
from rollbackd.state import Store
from tests import backtest_week as week
from tests.helpers import config_file, daemon_table
from tests.servers import HistoryPrometheus, backfill, free_port

ROLLBACK_AFTER = 5


def week_config(directory: Path, url: str) -> Path:
    """Monitor payments on the scripted series (60 s checks), authentication on MQTT (skipped)."""
    raw = {
        "daemon": daemon_table(directory / "state", mode="dry-run"),
        "sources": {
            "prom": {"type": "prometheus", "url": url, "max_concurrency": 2},
            "bus": {"type": "mqtt", "host": "127.0.0.1", "port": free_port()},
        },
        "monitors": {
            "payments": {
                "interval": "60s",
                "rollback_after": ROLLBACK_AFTER,
                "alert_after": 1,
                "rules": [
                    {
                        "name": "payment-error-rate",
                        "source": "prom",
                        "query": week.ERROR_RATE,
                        "above": 1.0,
                        "unit": "%",
                    },
                    {
                        "name": "payment-latency",
                        "source": "prom",
                        "query": week.LATENCY,
                        "above": 2000.0,
                        "unit": "ms",
                    },
                ],
            },
            "authentication": {
                "interval": "30s",
                "rules": [
                    {
                        "name": "auth-success-rate",
                        "source": "bus",
                        "topic": "boop/auth",
                        "below": 99,
                    }
                ],
            },
        },
    }
    directory.mkdir(parents=True, exist_ok=True)
    return config_file(directory, raw)


def expected_events() -> list[tuple[float, str]]:
    """What the daemon would have done, worked out by hand from the script."""
    found = []
    for _, first, _, _ in week.INCIDENTS:
        # the first breaching sample is at first + 30 s: the check at first + 60 s sees it
        found.append((first + 60, "alert"))
        found.append((first + 60 * ROLLBACK_AFTER, "rollback"))
    # the last sample before the outage stays visible for the 5-minute lookback, then 10
    # inconclusive checks (blind_after) make the monitor blind
    found.append((week.OUTAGE[0] + 300 + 9 * 60, "blind"))
    found.append((week.NAN_STRETCH[1] + 60 + 9 * 60, "blind"))
    return sorted(found)


# --- a real Prometheus holding the scripted week -----------------------------------------


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HistoryPrometheus]:
    """Backfill the scripted week with promtool and serve it."""
    workdir = tmp_path_factory.mktemp("history")
    source = week.openmetrics(week.week(), workdir / "week.om")
    (workdir / "data").mkdir()
    backfill(source, workdir / "data")
    with HistoryPrometheus(workdir) as server:
        yield server


@pytest.fixture(scope="module")
def week_assembly(history: HistoryPrometheus, tmp_path_factory: pytest.TempPathFactory) -> Assembly:
    """The scripted week's config, pointing at the backfilled Prometheus."""
    return load(week_config(tmp_path_factory.mktemp("config"), history.url))


@pytest.fixture(scope="module")
def replayed(week_assembly: Assembly) -> Backtest:
    """The scripted week replayed once for the module's tests."""
    return asyncio.run(backtest.run(week_assembly, week.START, week.END, keep_traces=True))


@pytest.mark.slow
def test_the_week_rolls_back_exactly_twice_at_the_right_checks(replayed: Backtest) -> None:
    """Both incidents roll back at their 5th failing check; the outage and NaN only blind."""
    payments = replayed.monitors["payments"]
    assert payments.checks == 7 * 24 * 60 + 1
    assert [(f.at, f.event) for f in payments.events] == expected_events()
    rollbacks = [f for f in payments.events if f.event == "rollback"]
    assert len(rollbacks) == 2
    assert not [f for f in rollbacks if week.OUTAGE[0] <= f.at <= week.OUTAGE[1] + 300]
    assert 'region="eu"' in rollbacks[0].reason
    assert 'region="us"' in rollbacks[1].reason  # the series that appeared mid-week
    assert "re-armed by the backtest" in rollbacks[0].reason
    # re-armed at the first ok check: the one after the last breaching sample
    assert payments.rearmed == [end + 60 for _, _, end, _ in week.INCIDENTS]


@pytest.mark.slow
def test_outage_and_nan_checks_are_inconclusive_never_ok_or_breach(replayed: Backtest) -> None:
    """A step without series, or with a NaN sample, is an inconclusive check."""
    payments = replayed.monitors["payments"]

    def outcome(at: float) -> Outcome:
        return payments.outcomes[round((at - week.START) / week.STEP)]

    assert outcome(week.OUTAGE[0] + 3600) is Outcome.INCONCLUSIVE
    assert outcome(week.NAN_STRETCH[1] + 1800) is Outcome.INCONCLUSIVE
    assert outcome(week.START + 3600) is Outcome.OK


@pytest.mark.slow
def test_margins_are_signed_closest_approaches(replayed: Backtest) -> None:
    """min_margin is threshold - value for above rules, negative beyond the threshold."""
    margins = replayed.monitors["payments"].margins
    assert margins["payment-error-rate"].value == pytest.approx(1.0 - 3.0)
    assert margins["payment-error-rate"].at == week.INCIDENTS[1][1] + 60
    assert margins["payment-latency"].value == pytest.approx(2000.0 - 460.0)


@pytest.mark.slow
def test_a_monitor_with_an_mqtt_rule_is_skipped(replayed: Backtest) -> None:
    """MQTT history is not in Prometheus: skipped with the reason, no checks, no broker."""
    auth = replayed.monitors["authentication"]
    assert auth.checks == 0
    assert auth.events == []
    assert auth.skipped is not None
    assert "auth-success-rate" in auth.skipped
    assert "mqtt" in auth.skipped


@pytest.mark.slow
async def test_the_live_path_takes_the_same_decisions(replayed: Backtest, tmp_path: Path) -> None:
    """The same week through MonitorRunner (the daemon's monitor) decides the same checks."""
    assembly = load(week_config(tmp_path, "http://127.0.0.1:9"))
    config = assembly.config.monitors["payments"]
    now = [week.START]
    seen: list[tuple[float, Outcome, Transition]] = []
    with Store.open(tmp_path / "state") as store:
        runner = MonitorRunner(
            name="payments",
            config=config,
            sources={"prom": week.ScriptedSource("prom", week.week())},
            store=store,
            history=5,
            mode="dry-run",
            on_incident=lambda _: None,
            clock=lambda: now[0],
            observer=lambda check, t, _: seen.append((check.at, check.outcome, t)),
        )
        k = 0
        while now[0] <= week.END:
            latched = runner.state.phase is Phase.ROLLED_BACK
            check = await runner.tick()
            if latched and check is not None and check.outcome is Outcome.OK:
                await runner.rearm(lambda _: None)  # the operator, at the first ok check
            k += 1
            now[0] = week.START + k * week.STEP
    live = [Found(at, str(e), t.reason) for at, _, t in seen for e in t.events]
    replay = replayed.monitors["payments"]
    assert [o for _, o, _ in seen] == replay.outcomes
    assert [(f.at, f.event) for f in live] == [(f.at, f.event) for f in replay.events]
    for ours, theirs in zip(replay.events, live, strict=True):
        assert ours.reason.startswith(theirs.reason)


# --- the command -------------------------------------------------------------------------


def rollbackd(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run ``rollbackd backtest ARGS`` in process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(["backtest", *args])
    except SystemExit as exc:  # argparse's own exits
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _no_constants(name: str) -> Any:
    raise AssertionError(f"{name} is not strict JSON")


@pytest.mark.slow
def test_json_is_one_strict_document(
    history: HistoryPrometheus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json prints exactly the documented document, RFC 3339 times, no NaN tokens."""
    config = week_config(tmp_path, history.url)
    code, out, err = rollbackd(
        capsys, "--config", str(config), "--from", str(int(week.START)),
        "--to", "2025-01-13T00:00:00Z", "--json",
    )  # fmt: skip
    assert code == 0, err
    doc = json.loads(out, parse_constant=_no_constants)
    assert doc["from"] == "2025-01-06T00:00:00Z"
    assert doc["to"] == "2025-01-13T00:00:00Z"
    assert set(doc["monitors"]) == {"payments", "authentication"}
    payments = doc["monitors"]["payments"]
    assert set(payments) == {"checks", "skipped", "events", "rules"}
    assert payments["skipped"] is None
    assert [e["event"] for e in payments["events"]].count("rollback") == 2
    assert payments["events"][1] == {
        "at": "2025-01-07T10:05:00Z",
        "event": "rollback",
        "reason": payments["events"][1]["reason"],
    }
    assert payments["rules"]["payment-error-rate"] == {
        "min_margin": pytest.approx(-2.0),
        "at": "2025-01-11T14:01:00Z",
    }
    auth = doc["monitors"]["authentication"]
    assert auth["checks"] == 0
    assert auth["events"] == []
    assert auth["rules"] == {"auth-success-rate": {"min_margin": None, "at": None}}


@pytest.mark.slow
def test_terminal_output_shows_events_rearms_and_margins(
    history: HistoryPrometheus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The terminal shows each event's series, the re-arms and each rule's closest approach."""
    config = week_config(tmp_path, history.url)
    code, out, _ = rollbackd(
        capsys, "--config", str(config), "--from", "2025-01-07T09:00:00Z",
        "--to", "2025-01-07T12:00:00Z", "--monitor", "payments",
    )  # fmt: skip
    assert code == 0
    assert "payments: 181 checks every 60 s: 1 alert, 1 rollback" in out
    assert "2025-01-07T10:05:00Z  rollback  5 consecutive failing checks" in out
    assert "2025-01-07T10:21:00Z  re-armed" in out
    assert 'payment-error-rate{__name__="boop_payment_error_rate_percent",region="eu"}' in out
    assert "payment-error-rate  -1.5 % at 2025-01-07T10:01:00Z" in out
    assert "authentication" not in out


@pytest.mark.slow
def test_report_writes_a_plot_per_monitor_and_an_index(
    history: HistoryPrometheus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--report DIR: a PNG per replayed monitor and an offline index.html with the events."""
    pytest.importorskip("matplotlib")
    config = week_config(tmp_path, history.url)
    report = tmp_path / "report"
    code, _, err = rollbackd(
        capsys, "--config", str(config), "--from", "2025-01-07T00:00:00Z",
        "--to", "2025-01-08T00:00:00Z", "--report", str(report),
    )  # fmt: skip
    assert code == 0, err
    assert (report / "payments.png").read_bytes().startswith(b"\x89PNG")
    assert not (report / "authentication.png").exists()
    page = (report / "index.html").read_text()
    assert '<img src="payments.png"' in page
    assert "2025-01-07T10:05:00Z" in page
    assert "skipped" in page
    assert "http" not in page.split("<body>")[1]  # nothing fetched from elsewhere


@pytest.mark.slow
def test_a_span_without_data_is_one_line_and_exit_2(
    history: HistoryPrometheus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No sample of any rule in the span: one line on stderr, exit 2."""
    config = week_config(tmp_path, history.url)
    code, out, err = rollbackd(
        capsys,
        "--config",
        str(config),
        "--from",
        "2020-01-01T00:00:00Z",
        "--to",
        "2020-01-02T00:00:00Z",
    )
    assert (code, out) == (2, "")
    assert err.count("\n") == 1
    assert "no samples between 2020-01-01T00:00:00Z and 2020-01-02T00:00:00Z" in err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--from", "2025-01-08T00:00:00Z", "--to", "2025-01-07T00:00:00Z"], "is after --to"),
        (["--from", "7 fortnights"], "--from: cannot read '7 fortnights'"),
        (["--from", "2025-01-07T00:00:00"], "has no time zone"),
        (["--from", "1d", "--monitor", "nope"], "--monitor nope: no such monitor"),
        (["--to", "1d"], "the following arguments are required: --from"),
        (["--from", "1d", "--bogus"], "unrecognized arguments: --bogus"),
        (["--from", "1d"], "sources.prom: cannot connect to http://127.0.0.1:"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    """Bad spans, monitors, options and an unreachable Prometheus: one line, exit 2, no usage."""
    config = week_config(tmp_path, f"http://127.0.0.1:{free_port()}")
    code, out, err = rollbackd(capsys, "--config", str(config), *args)
    assert (code, out) == (2, "")
    assert err.count("\n") == 1, err
    assert says in err
    assert "usage" not in err
    assert "Traceback" not in err


def test_report_without_matplotlib_says_how_to_install_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--report without the report extra: one line naming the pip command, exit 2."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    config = week_config(tmp_path, f"http://127.0.0.1:{free_port()}")
    code, _, err = rollbackd(capsys, "--config", str(config), "--from", "1d", "--report", "r")
    assert code == 2
    assert err.count("\n") == 1
    assert "pip install 'rollbackd[report]'" in err


# --- the pieces ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2025-01-06T00:00:00Z", 1_736_121_600.0),
        ("2025-01-06T01:00:00+01:00", 1_736_121_600.0),
        ("1736121600", 1_736_121_600.0),
        ("7d", 2_000_000_000.0 - 7 * 86_400),
        ("90m", 2_000_000_000.0 - 5_400),
    ],
)
def test_when_is_rfc3339_a_timestamp_or_a_duration_ago(text: str, seconds: float) -> None:
    """WHEN takes the three documented forms."""
    assert backtest.parse_when(text, now=2_000_000_000.0) == seconds


def test_chunks_stay_under_the_points_limit() -> None:
    """A week at 30 s is three range queries of at most 10,000 steps, covering every check."""
    rule = load_rule()
    count = backtest.check_count(0.0, 7 * 86_400.0, 30.0)
    parts = backtest.chunks(rule, 0.0, 30.0, count)
    assert count == 20_161
    assert [c.count for c in parts] == [10_000, 10_000, 161]
    assert all(c.count < 11_000 for c in parts)


def test_a_failed_chunk_makes_its_checks_inconclusive_never_a_rollback() -> None:
    """Error readings for a failed chunk's checks: the monitor goes blind, nothing rolls back."""
    rule = load_rule()
    parts = backtest.chunks(rule, 0.0, 60.0, 30, max_points=10)
    fetched = [
        backtest.Fetched(parts[0], series=[((), [(60.0 * k, 5.0) for k in range(10)])]),
        backtest.Fetched(parts[1], problem="HTTP 503"),
        backtest.Fetched(parts[2], series=[((), [(60.0 * k, 0.5) for k in range(20, 30)])]),
    ]
    steps = backtest.place(fetched, 30)
    assert steps[12] == [error("HTTP 503", 720.0)]
    monitor = load_monitor(rollback_after=20)
    run = backtest.replay("m", monitor, {"r": steps}, 0.0)
    assert run.outcomes[10:20] == [Outcome.INCONCLUSIVE] * 10
    assert [f.event for f in run.events] == ["blind"]


async def test_chunks_run_concurrently_within_max_concurrency(tmp_path: Path) -> None:
    """Range queries run in threads, at most max_concurrency of them at once."""
    assembly = load(week_config(tmp_path, "http://127.0.0.1:9"))
    client = CountingClient()
    await backtest.run(assembly, 0.0, 3_000.0, ["payments"], clients={"prom": client}, max_points=5)
    assert client.calls == 2 * 11  # two rules, 51 checks in chunks of 5
    assert client.most == 2  # the source's max_concurrency


class CountingClient:
    """Stands in for PrometheusConnect: counts queries and how many overlap."""

    def __init__(self) -> None:
        self.calls = self.running = self.most = 0
        self._lock = threading.Lock()

    def custom_query_range(self, query: str, **_: Any) -> list[Any]:
        """One sample, after a pause long enough for queries to overlap."""
        with self._lock:
            self.calls += 1
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.01)
        with self._lock:
            self.running -= 1
        return [{"metric": {}, "values": [[0, "1"]]}]

    def close(self) -> None:
        """Nothing to close."""


def load_rule() -> Any:
    """The rule of :func:`load_monitor`."""
    return load_monitor().rules[0]


def load_monitor(rollback_after: int = 5) -> Any:
    """A one-rule monitor (rule ``r`` above 1.0) checking every minute."""
    return MonitorConfig.model_validate(
        {
            "interval": "60s",
            "rollback_after": rollback_after,
            "rules": [{"name": "r", "source": "p", "query": "q", "above": 1.0}],
        }
    )


def test_backtest_error_is_a_rollbackd_error() -> None:
    """The CLI reports it like every other deliberate error."""
    assert issubclass(BacktestError, cli.RollbackdError)


def guarded_monitor(**keys: Any) -> Any:
    """A one-rule monitor (rule ``r`` above 1.0, at least 100 events) checking every minute."""
    rule = {"name": "r", "source": "p", "query": "q", "above": 1.0, "volume": "v",
            "min_volume": 100}  # fmt: skip
    return MonitorConfig.model_validate(
        {"interval": "60s", "rollback_after": 3, "blind_after": 4, "rules": [rule], **keys}
    )


def test_the_volume_guard_applies_in_the_backtest() -> None:
    """Breaching values over too few events are insufficient in the replay too: no rollback."""
    steps = {
        "r": [[ok(5.0, 60.0 * k)] for k in range(6)],
        "volume:r": [[ok(3.0 if k < 4 else 500.0, 60.0 * k)] for k in range(6)],
    }
    run = backtest.replay("m", guarded_monitor(), steps, 0.0)
    assert run.outcomes == [Outcome.INCONCLUSIVE] * 4 + [Outcome.BREACH] * 2
    assert [f.event for f in run.events] == ["blind"]


def test_held_by_applies_in_the_backtest() -> None:
    """A monitor held by one failing in its own replay is held; it rolls back once that heals."""
    infra = load_monitor(rollback_after=100)
    held = guarded_monitor(held_by=["infra"])
    bad, good = [[ok(5.0, 60.0 * k)] for k in range(8)], [[ok(0.5, 60.0 * k)] for k in range(8)]
    infra_run = backtest.replay("infra", infra, {"r": bad[:5] + good[5:]}, 0.0)
    volumes = [[ok(500.0, 60.0 * k)] for k in range(8)]
    run = backtest.replay(
        "pay", held, {"r": bad, "volume:r": volumes}, 0.0,
        held=backtest._holder(["infra"], {"infra": infra_run}),
    )  # fmt: skip
    assert [f.event for f in run.events] == ["alert", "rollback"]
    assert "held by infra (failing)" in run.events[0].reason
    assert run.events[1].at == 300.0  # the first check after infrastructure healed
