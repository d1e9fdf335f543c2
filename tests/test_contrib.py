"""contrib/: the Grafana dashboard and the alerting rules query metrics a real daemon exports.

A daemon runs in-process through a healthy check, a source error, a breach and a rollback
with one failing step, so every family has samples; then the dashboard's and the rules'
metric names must all be in its /metrics. promtool checks the rules, runs their unit tests,
and parses every dashboard query as PromQL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from ruamel.yaml import YAML

from rollbackd import assemble
from rollbackd.daemon import Daemon
from rollbackd.engine import Phase
from tests import scripted
from tests.helpers import daemon_table, payment_error_rate, running, wait_until
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "contrib/grafana/rollbackd.json"
RULES = ROOT / "contrib/prometheus/rollbackd-rules.yml"
RULE_TESTS = ROOT / "contrib/prometheus/rollbackd-rules.test.yml"

SCRAPED_BY_PROMETHEUS = {"up"}
"""Series Prometheus makes itself for every target; no exporter has them."""

METRIC = re.compile(r"\b(?:rollbackd|process)_[a-z_]+\b|\bup\b")


def promtool() -> str:
    """The path of promtool (Debian's prometheus package); skip outside CI when missing."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing in CI: scripts/setup --test installs prometheus")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return found


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: panels, variables, annotations."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            exprs.append(query["query"])
    exprs += [a["expr"] for a in board["annotations"]["list"]]
    return exprs


def rule_exprs() -> list[str]:
    """Every ``expr`` of the alerting rules."""
    doc: Any = YAML(typ="safe").load(RULES.read_text(encoding="utf-8"))
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def names_in(exprs: Sequence[str]) -> set[str]:
    """The metric names queried by ``exprs`` (label names and functions are not metrics)."""
    found: set[str] = set()
    for expr in exprs:
        without_labels = re.sub(r"\{[^}]*\}", "", expr)  # label matchers mention no metric
        without_labels = re.sub(r"label_values\(([^,)]*)(,[^)]*)?\)", r"\1", without_labels)
        found.update(METRIC.findall(without_labels))
    return found


@pytest.fixture(autouse=True)
def healthy_script() -> Iterator[None]:
    """Each test starts healthy, and leaves nothing scripted behind."""
    scripted.reset()
    scripted.VALUES["x"] = 0.1
    yield
    scripted.reset()


def daemon_config(tmp_path: Path, port: int) -> dict[str, Any]:
    """One scripted monitor; its plan has a step that works and one that always fails."""
    return {
        "daemon": daemon_table(tmp_path / "state", listen=f"127.0.0.1:{port}"),
        "sources": {"script": {"type": scripted.KIND}},
        "monitors": {
            "payments": {
                "interval": "50ms",
                "rollback_after": 3,
                "alert_after": 1,
                "blind_after": 50,
                "on_alert": ["note"],
                "on_rollback": ["note", "broken"],
                "rules": [payment_error_rate("script", "x", above=1.0)],
            }
        },
        "actions": {
            "note": {"type": "alert.log"},
            "broken": {"type": "exec", "argv": ["false"], "retries": 0, "inherit_env": True},
        },
    }


async def scraped_names(tmp_path: Path) -> set[str]:
    """The sample names of a daemon's /metrics after a source error and a rollback."""
    port = free_port()
    config = assemble.from_dict(daemon_config(tmp_path, port), registries=scripted.REGISTRIES)
    names: set[str] = set()

    async def body(daemon: Daemon) -> None:
        runner = daemon.monitors["payments"]
        await wait_until(lambda: runner.state.checks >= 2, what="healthy checks")
        scripted.FAILING["x"] = "query failed: connection refused"
        await wait_until(lambda: runner.state.consecutive_errors >= 1, what="a source error")
        del scripted.FAILING["x"]
        scripted.VALUES["x"] = 5.0
        await wait_until(lambda: runner.state.phase is Phase.ROLLED_BACK, what="the rollback")

        def plan_finished() -> bool:
            return any(i.event == "rollback" and i.finished_at for i in daemon.store.incidents())

        await wait_until(plan_finished, what="the plan")
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as answer,
        ):
            assert answer.status == 200
            text = await answer.text()
        for line in text.splitlines():
            if line and not line.startswith("#"):
                names.add(re.split(r"[{ ]", line, maxsplit=1)[0])

    await running(config, body, scripted.REGISTRIES)
    return names


@pytest.mark.slow
async def test_every_metric_of_the_dashboard_and_the_rules_is_exported(tmp_path: Path) -> None:
    """Each metric name the dashboard or an alert queries has samples in a daemon's /metrics."""
    exported = await scraped_names(tmp_path)
    assert "rollbackd_action_attempts_total" in exported
    queried = names_in(dashboard_queries()) | names_in(rule_exprs())
    assert {"rollbackd_rule_value", "rollbackd_rule_threshold"} <= queried
    assert "rollbackd_action_duration_seconds_bucket" in queried
    missing = sorted(queried - exported - SCRAPED_BY_PROMETHEUS)
    assert not missing, f"queried but not exported: {missing}"


def test_names_in_finds_metrics_not_labels() -> None:
    """The extractor sees metric names, not label names or values that look like them."""
    exprs = [
        'sum by (monitor) (rate(rollbackd_checks_total{job=~"$job", x="rollbackd_fake"}[5m]))',
        "label_values(rollbackd_info, job)",
        'up{job="rollbackd"} == 0',
    ]
    assert names_in(exprs) == {"rollbackd_checks_total", "rollbackd_info", "up"}


def test_dashboard_is_grafana_json_over_the_datasource_variable() -> None:
    """Unique panel ids, every target on ${datasource} with a refId, every panel on the grid."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "job", "instance", "monitor"} <= variables
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in ("state", "threshold", "rollbacks", "action latency", "source errors"):
        assert topic in titles, topic
    for panel in board["panels"]:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["refId"]


def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    """Promtool parses every dashboard query (Grafana's variables replaced by plain values)."""
    tool = promtool()
    values = {"$__rate_interval": "1m", "$__range": "1h", "$job": ".*", "$instance": ".*"}
    rules = []
    for index, query in enumerate(dashboard_queries()):
        if query.startswith("label_values("):
            continue  # a Grafana function, not PromQL
        expr = query.replace("$monitor", ".*")
        for variable, value in values.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run(
        [tool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    """`promtool check rules` and `promtool test rules` succeed on contrib/prometheus."""
    tool = promtool()
    check = subprocess.run(
        [tool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 6 rules found" in check.stdout
    test = subprocess.run(
        [tool, "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        cwd=RULE_TESTS.parent,
        check=False,
    )
    assert test.returncode == 0, test.stdout + test.stderr
    assert "SUCCESS" in test.stdout


def test_alert_rules_cover_what_the_issue_asks() -> None:
    """Daemon down, a monitor blind, a latched rollback over an hour, failing actions, sources."""
    doc: Any = YAML(typ="safe").load(RULES.read_text(encoding="utf-8"))
    rules = {rule["alert"]: rule for group in doc["groups"] for rule in group["rules"]}
    assert {
        "RollbackdDown",
        "RollbackdMonitorBlind",
        "RollbackdRollbackLatched",
        "RollbackdActionFailing",
        "RollbackdSourceErroring",
    } <= rules.keys()
    assert rules["RollbackdRollbackLatched"]["for"] == "1h"
    assert 'state="rolled_back"' in rules["RollbackdRollbackLatched"]["expr"]
    for rule in rules.values():
        assert rule["annotations"]["summary"]
        assert rule["labels"]["severity"] in {"critical", "warning"}
