"""What a backtest shows: the terminal summary, the ``--json`` document, plots and index.html.

Plots need matplotlib (``pip install 'rollbackd[report]'``), imported only by ``write_report``.
"""

from __future__ import annotations

import html
import importlib.util
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from rollbackd.backtest import Backtest, MonitorRun
from rollbackd.backtest_fetch import Progress, rfc3339
from rollbackd.engine import Outcome
from rollbackd.readings import format_value, labels_text

INSTALL_HINT = "pip install 'rollbackd[report]'"

_EVENT_COLOURS = {
    "alert": "tab:orange",
    "rollback": "tab:red",
    "blind": "tab:gray",
    "shadow": "tab:purple",
}


# --- the --json document -------------------------------------------------------------------


def document(backtest: Backtest) -> dict[str, Any]:
    """The stable JSON document of README's "Backtest" section (strict JSON: no NaN)."""
    return {
        "from": rfc3339(backtest.start),
        "to": rfc3339(backtest.end),
        "monitors": {name: _monitor_json(run) for name, run in backtest.monitors.items()},
    }


def _monitor_json(run: MonitorRun) -> dict[str, Any]:
    return {
        "checks": run.checks,
        "skipped": run.skipped,
        "events": [
            {"at": rfc3339(found.at), "event": found.event, "reason": found.reason}
            for found in run.events
        ],
        "rules": {
            rule: {
                "min_margin": margin.value,
                "at": None if margin.at is None else rfc3339(margin.at),
            }
            for rule, margin in run.margins.items()
        },
    }


# --- the terminal ----------------------------------------------------------------------


def text(backtest: Backtest) -> str:
    """Per monitor: its events, its number of checks and each rule's closest approach."""
    lines = [f"backtest from {rfc3339(backtest.start)} to {rfc3339(backtest.end)}"]
    for run in backtest.monitors.values():
        lines.append("")
        lines.extend(_monitor_lines(run))
    return "\n".join(lines)


def _monitor_lines(run: MonitorRun) -> Iterator[str]:
    if run.skipped is not None:
        yield f"{run.name}: skipped: {run.skipped}"
        return
    counted = {e: sum(1 for f in run.events if f.event == e) for e in _EVENT_COLOURS}
    tally = ", ".join(f"{n} {e}" for e, n in counted.items() if n) or "nothing would have fired"
    yield f"{run.name}: {run.checks} checks every {run.config.interval:g} s: {tally}"
    timeline = [(f.at, f.event, f.reason) for f in run.events]
    timeline += [(at, "re-armed", "by the backtest at the first ok check") for at in run.rearmed]
    for at, event, reason in sorted(timeline, key=lambda row: row[0]):
        yield f"  {rfc3339(at)}  {event:<8}  {reason}"
    yield "  closest approach to the threshold (margin; negative is beyond it):"
    width = max(len(rule) for rule in run.margins)
    for rule in run.config.rules:
        margin = run.margins[rule.name]
        unit = f" {rule.unit}" if rule.unit else ""
        if margin.value is None or margin.at is None or margin.reading is None:
            yield f"    {rule.name:<{width}}  no values"
            continue
        yield (
            f"    {rule.name:<{width}}  {format_value(margin.value)}{unit} at {rfc3339(margin.at)}"
            f"  {labels_text(margin.labels) or 'value'} {format_value(margin.reading)}{unit},"
            f" {rule.direction} {format_value(rule.threshold)}{unit} breaches"
        )


def progress_bar(stream: TextIO | None = None, width: int = 30) -> Progress | None:
    """A one-line progress bar on a terminal (stderr by default); None when it is not one."""
    out = sys.stderr if stream is None else stream
    if not out.isatty():
        return None

    def show(done: int, total: int) -> None:
        filled = width * done // max(total, 1)
        end = "\n" if done >= total else ""
        bar = "#" * filled + "." * (width - filled)
        out.write(f"\rfetching history [{bar}] {done}/{total} queries{end}")
        out.flush()

    return show


# --- --report DIR ------------------------------------------------------------------------


def can_plot() -> bool:
    """Tell whether matplotlib is installed (the ``report`` extra)."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except ValueError:  # a module entry of None (tests hiding it)
        return False


def write_report(backtest: Backtest, directory: Path) -> Path:
    """Write a PNG per replayed monitor and an ``index.html`` that shows them; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    sections = []
    for run in backtest.monitors.values():
        image = None
        if run.skipped is None:
            image = f"{run.name}.png"
            plot(run, directory / image)
        sections.append(_section(run, image))
    title = f"rollbackd backtest {rfc3339(backtest.start)} to {rfc3339(backtest.end)}"
    page = _PAGE.format(title=html.escape(title), body="\n".join(sections))
    index = directory / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def plot(run: MonitorRun, path: Path) -> None:
    """Each rule's series against its threshold; failing streaks shaded; alerts and rollbacks."""
    import matplotlib as mpl  # noqa: PLC0415 - optional: the report extra

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    rules = run.config.rules
    fig, axes = plt.subplots(
        len(rules), 1, sharex=True, squeeze=False, figsize=(12, 2.6 * len(rules))
    )
    interval = run.config.interval
    streaks = list(_streaks(run))
    for ax, rule in zip(axes[:, 0], rules, strict=True):
        for labels, trace in run.traces.get(rule.name, {}).items():
            times, values = _with_gaps(trace.times, trace.values, interval)
            when = (np.array(times) * 1000).astype("datetime64[ms]")
            shown = tuple(pair for pair in labels if pair[0] != "__name__")
            ax.plot(when, values, linewidth=0.8, label=labels_text(shown) or rule.name)
        ax.axhline(rule.threshold, color="tab:red", linestyle="--", linewidth=1)
        for first, last in streaks:
            low = np.datetime64(int(first * 1000), "ms")
            high = np.datetime64(int((last + interval) * 1000), "ms")
            ax.axvspan(low, high, color="tab:red", alpha=0.15, linewidth=0)
        for found in run.events:
            at = np.datetime64(int(found.at * 1000), "ms")
            ax.axvline(at, color=_EVENT_COLOURS[found.event], linewidth=1.2)
        unit = f" ({rule.unit})" if rule.unit else ""
        ax.set_title(f"{rule.name}: {rule.direction} {format_value(rule.threshold)}{unit}")
        if run.traces.get(rule.name):
            ax.legend(loc="upper left", fontsize="small")
    axes[0, 0].figure.suptitle(f"{run.name}: {run.checks} checks")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _with_gaps(
    times: list[float], values: list[float], interval: float
) -> tuple[list[float], list[float]]:
    """Put a NaN where a series was absent for a while, so the line breaks there."""
    out_t: list[float] = []
    out_v: list[float] = []
    for t, v in zip(times, values, strict=True):
        if out_t and t - out_t[-1] > 1.5 * interval:
            out_t.append(out_t[-1] + interval)
            out_v.append(math.nan)
        out_t.append(t)
        out_v.append(v)
    return out_t, out_v


def _streaks(run: MonitorRun) -> Iterator[tuple[float, float]]:
    """``(first, last)`` check times of each run of failing checks."""
    first = None
    interval = run.config.interval
    for k, outcome in enumerate([*run.outcomes, Outcome.OK]):
        failing = outcome is Outcome.BREACH
        if failing and first is None:
            first = k
        elif not failing and first is not None:
            yield run.start + first * interval, run.start + (k - 1) * interval
            first = None


def _section(run: MonitorRun, image: str | None) -> str:
    name = html.escape(run.name)
    if run.skipped is not None:
        return f"<h2>{name}</h2>\n<p>skipped: {html.escape(run.skipped)}</p>"
    rows = "\n".join(
        f"<tr><td>{rfc3339(f.at)}</td><td>{f.event}</td><td>{html.escape(f.reason)}</td></tr>"
        for f in run.events
    )
    events = (
        f"<table><tr><th>at</th><th>event</th><th>reason</th></tr>\n{rows}</table>"
        if rows
        else "<p>nothing would have fired</p>"
    )
    margins = "\n".join(
        f"<tr><td>{html.escape(rule)}</td><td>{_figure(m.value)}</td>"
        f"<td>{'' if m.at is None else rfc3339(m.at)}</td></tr>"
        for rule, m in run.margins.items()
    )
    return (
        f"<h2>{name}</h2>\n<p>{run.checks} checks every {run.config.interval:g} s</p>\n"
        f'<img src="{html.escape(image or "")}" alt="{name}">\n{events}\n'
        f"<table><tr><th>rule</th><th>closest margin</th><th>at</th></tr>\n{margins}</table>"
    )


def _figure(value: float | None) -> str:
    return "" if value is None else format_value(value)


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
img {{ max-width: 100%; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }}
</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""
