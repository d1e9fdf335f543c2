"""The ``rollbackd`` command: parses arguments and calls into the package, nothing more."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from rollbackd import __version__
from rollbackd.assemble import load
from rollbackd.config import Config, exposure_warnings
from rollbackd.errors import ConfigError, RollbackdError

DEFAULT_CONFIG = Path("/etc/rollbackd/rollbackd.toml")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DEMO_SPEEDS = (0.1, 40.0)
"""The demo's interval is 2 s / speed: 40 gives monitors.*.interval's minimum, 50ms."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # backtest's bad input is one line and exit 2, never argparse's usage banner
    if argv[:1] == ["backtest"]:
        args = _backtest_parser().parse_args(argv[1:])
    else:
        args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except RollbackdError as exc:
        return _failed(exc, "rollbackd", EXIT_FAILED)
    except KeyboardInterrupt:
        return 130


def _failed(exc: RollbackdError, prog: str, code: int) -> int:
    """Say what went wrong on stderr (a config's problems one per line); return ``code``."""
    if isinstance(exc, ConfigError):
        for line in exc.problems:
            print(line, file=sys.stderr)
    else:
        print(f"{prog}: {exc}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rollbackd", description="Watch a staged rollout and roll it back when it goes bad."
    )
    parser.add_argument("--version", action="version", version=f"rollbackd {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int], helptext: str) -> Any:
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(command=func)
        return p

    p = command("run", _run, "run the daemon")
    _config_option(p)
    p = command("check-config", _check_config, "validate a config file; one line per problem")
    p.add_argument("file", type=Path, help="the TOML file to check")
    p = command("status", _status, "show monitors, counters, last values and latches")
    _config_option(p)
    p.add_argument("--json", action="store_true", help="print the raw /status JSON")
    controls = (
        ("rearm", _rearm, "re-arm a rolled-back monitor (clears its latch)", "monitor",
         "the monitor to re-arm"),
        ("retry", _retry, "re-run the failed steps of a finished rollback plan", "incident",
         "the incident's id (rollbackd status lists them)"),
        ("approve", _approve, "run a rollback plan that waits (max_rollbacks reached)",
         "incident", "the waiting incident's id (rollbackd status lists them)"),
    )  # fmt: skip
    for name, func, helptext, subject, about in controls:
        p = command(name, func, helptext)
        _config_option(p)
        p.add_argument(subject, help=about)
    _rollout_commands(command("rollout", _rollout, "show and steer progressive rollouts"))
    p = command("test-action", _test_action, "fire one action on purpose")
    _config_option(p)
    p.add_argument("action", help="the action's name in [actions]")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = command("demo", _demo, "run the embedded demo: synthetic traffic, a visible rollback")
    p.add_argument("--dir", type=Path, default=None, help="where to put the demo's files")
    p.add_argument(
        "--speed", type=float, default=1.0, help="run the demo faster (2 = twice as fast)"
    )
    _backtest_arguments(command("backtest", _backtest, BACKTEST_HELP))
    return parser


ROLLOUT_COMMANDS = (
    ("status", "show rollouts: step, percent, hold remaining, each gate and why it is not green"),
    ("pause", "stop promoting until resumed (a rollback still happens)"),
    ("resume", "hold and promote again"),
    ("promote", "end the current hold now (gates, windows and freezes still apply)"),
    ("abort", "run the gates' rollback plans now; the rollout stays rolled_back"),
    ("restart", "start a rolled-back rollout again from its first step"),
)


def _rollout_commands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(required=True, metavar="OPERATION", dest="operation")
    for name, helptext in ROLLOUT_COMMANDS:
        p = sub.add_parser(name, help=helptext, description=helptext)
        _config_option(p)
        if name == "status":
            p.add_argument("rollout", nargs="?", help="only this rollout")
            p.add_argument("--json", action="store_true", help="print the rollouts' JSON")
        else:
            p.add_argument("rollout", help="the rollout's name in [rollouts]")
        if name == "promote":
            p.add_argument("--yes", action="store_true", help="do not ask for confirmation")


BACKTEST_PROG = "rollbackd backtest"
BACKTEST_HELP = "replay a config over Prometheus history: when would it have fired?"


class _OneLineParser(argparse.ArgumentParser):
    """Reports a bad argument in one line on stderr and exits 2, without the usage banner."""

    def error(self, message: str) -> NoReturn:
        """Print ``rollbackd backtest: MESSAGE`` and exit 2."""
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _backtest_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=BACKTEST_PROG, description=BACKTEST_HELP)
    parser.set_defaults(command=_backtest)
    _backtest_arguments(parser)
    return parser


def _backtest_arguments(p: argparse.ArgumentParser) -> None:
    _config_option(p)
    when = "RFC 3339, a Unix timestamp, or a duration ago (7d, 90m)"
    p.add_argument("--from", dest="start", required=True, metavar="WHEN", help=when)
    p.add_argument("--to", dest="end", default=None, metavar="WHEN", help=f"{when}; default now")
    p.add_argument(
        "--monitor", action="append", default=[], metavar="NAME", help="only this monitor"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--report", type=Path, default=None, metavar="DIR", help="write plots here")


def _config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"config file (default {DEFAULT_CONFIG})",
    )


def _check_config(args: argparse.Namespace) -> int:
    config = load(args.file).config
    rules = sum(len(m.rules) for m in config.monitors.values())
    ramps = f", {len(config.rollouts)} rollouts" if config.rollouts else ""
    print(
        f"{args.file}: ok ({len(config.monitors)} monitors, {rules} rules, "
        f"{len(config.sources)} sources, {len(config.actions)} actions{ramps}; "
        f"mode {config.daemon.mode})"
    )
    for warning in exposure_warnings(config):
        print(f"{args.file}: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from rollbackd.daemon import run

    return run(args.config)


def _listen(config: Config) -> str:
    if not config.daemon.listen:
        raise RollbackdError(
            f"{config.path}: daemon.listen is empty, so the daemon has no HTTP surface"
        )
    return config.daemon.listen


def _status(args: argparse.Namespace) -> int:
    from rollbackd.api import read_control_token
    from rollbackd.client import get_status
    from rollbackd.status import table

    config = load(args.config, secrets=False).config
    # With status_token the daemon wants the control token for /status too, as for rearm.
    token = read_control_token(config.daemon.state_dir) if config.daemon.status_token else None
    status = asyncio.run(get_status(_listen(config), timeout=5.0, token=token))
    print(json.dumps(status, indent=2) if args.json else table(status))
    return EXIT_OK


def _control(args: argparse.Namespace, action: str, subject: str) -> dict[str, Any]:
    """POST ``/{action}/{subject}`` to the running daemon with the control token."""
    from rollbackd.api import read_control_token
    from rollbackd.client import post_control

    config = load(args.config, secrets=False).config
    token = read_control_token(config.daemon.state_dir)
    return asyncio.run(post_control(_listen(config), token, action, subject))


def _rearm(args: argparse.Namespace) -> int:
    result = _control(args, "rearm", args.monitor)
    print(f"{args.monitor}: {result.get('state', 're-armed')}")
    return EXIT_OK


def _retry(args: argparse.Namespace) -> int:
    result = _control(args, "retry", args.incident)
    steps = ", ".join(str(s) for s in result.get("steps", [])) or "none"
    print(f"{args.incident}: retrying failed steps {steps}")
    return EXIT_OK


def _approve(args: argparse.Namespace) -> int:
    result = _control(args, "approve", args.incident)
    print(f"{args.incident}: approved (it waited for {result.get('waited', '?')}); its plan runs")
    return EXIT_OK


def _rollout(args: argparse.Namespace) -> int:
    from rollbackd.api import read_control_token
    from rollbackd.client import get_status, post_rollout
    from rollbackd.status import rollout_table

    config = load(args.config, secrets=False).config
    if args.rollout is not None and args.rollout not in config.rollouts:
        known = ", ".join(sorted(config.rollouts)) or "none"
        raise RollbackdError(f"{config.path}: rollouts.{args.rollout}: no such rollout ({known})")
    if args.operation == "status":
        token = read_control_token(config.daemon.state_dir) if config.daemon.status_token else None
        found = asyncio.run(get_status(_listen(config), timeout=5.0, token=token)).get(
            "rollouts", {}
        )
        if args.rollout is not None:
            found = {args.rollout: found.get(args.rollout)}
        print(json.dumps(found, indent=2) if args.json else rollout_table(found))
        return EXIT_OK
    question = f"End the hold of {args.rollout!r} now? [y/N] "
    if args.operation == "promote" and not args.yes and not _confirm(question):
        print("not promoted", file=sys.stderr)
        return EXIT_FAILED
    token = read_control_token(config.daemon.state_dir)
    result = asyncio.run(post_rollout(_listen(config), token, args.rollout, args.operation))
    done = f"{args.rollout}: {args.operation}: {result.get('state')} at {result.get('percent')}%"
    incident = f" (incident {result['incident']})" if result.get("incident") else ""
    print(done + incident)
    return EXIT_OK


def _test_action(args: argparse.Namespace) -> int:
    from rollbackd.plan import fire_action

    assembly = load(args.config)
    if args.action not in assembly.actions:
        known = ", ".join(sorted(assembly.actions)) or "none"
        print(
            f"{args.config}: actions.{args.action}: no such action (known: {known})",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if not args.yes and not _confirm(f"Fire action {args.action!r} for real? [y/N] "):
        print("not fired", file=sys.stderr)
        return EXIT_FAILED
    detail = asyncio.run(fire_action(assembly, args.action))
    print(f"{args.action}: {detail}")
    return EXIT_OK


def _confirm(prompt: str) -> bool:
    if not sys.stdin.isatty():
        print("refusing without a terminal to confirm on; pass --yes", file=sys.stderr)
        return False
    return input(prompt).strip().lower() in {"y", "yes"}


def _demo(args: argparse.Namespace) -> int:
    from rollbackd.demo import run_demo

    low, high = DEMO_SPEEDS
    if not low <= args.speed <= high:
        print(f"rollbackd demo: --speed must be between {low:g} and {high:g}", file=sys.stderr)
        return EXIT_USAGE
    return run_demo(args.dir, speed=args.speed)


def _backtest(args: argparse.Namespace) -> int:
    import time

    from rollbackd import backtest, backtest_report

    if args.report is not None and not backtest_report.can_plot():
        print(
            f"{BACKTEST_PROG}: --report needs matplotlib: {backtest_report.INSTALL_HINT}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    try:
        start, end = backtest.span(args.start, args.end, time.time())
        assembly = load(args.config)
        found = asyncio.run(
            backtest.run(
                assembly,
                start,
                end,
                args.monitor,
                keep_traces=args.report is not None,
                progress=None if args.json else backtest_report.progress_bar(),
            )
        )
    except RollbackdError as exc:
        return _failed(exc, BACKTEST_PROG, EXIT_USAGE)
    if args.json:
        print(json.dumps(backtest_report.document(found), indent=2, allow_nan=False))
    else:
        print(backtest_report.text(found))
    if args.report is not None:
        index = backtest_report.write_report(found, args.report)
        print(f"report: {index}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
