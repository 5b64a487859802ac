"""The ``deferrun`` command: run processes (standalone, triggerer, worker) and inspect tasks.

The read-only views (tasks, task, triggers, logs) live in :mod:`deferrun.cli.views`. What only
the process commands use (worker, triggerer, metrics with aiohttp) is imported when one
runs: those imports were about half of a `deferrun tasks` subprocess's CPU.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from deferrun.cli import actions, views
from deferrun.cli import clean as retention
from deferrun.core import config
from deferrun.core.models import TaskState
from deferrun.exceptions import ConfigError, DeferrunError, StoreUnavailable
from deferrun.process import loops
from deferrun.process.log import configure_logging
from deferrun.store.base import is_connection_error
from deferrun.web import cli as web_cli

if TYPE_CHECKING:
    from deferrun.store import Store
    from deferrun.triggerer.triggerer import Triggerer
    from deferrun.worker.worker import Worker

log = structlog.get_logger("deferrun.cli")
UsageError = views.UsageError


async def _serve(
    store: Store,
    components: list[Worker | Triggerer],
    args: argparse.Namespace,
    after_start: Any = None,
) -> None:
    from deferrun.process.metrics import loop_and_db_health, serve
    from deferrun.process.startup import FatalGuard
    from deferrun.process.tasklogs import TaskLogSink
    from deferrun.process.watchdog import LoopWatchdog
    from deferrun.worker.worker import Worker

    metrics = components[0].metrics
    started = time.monotonic()
    dead_after = components[0].dead_after

    def health_check() -> tuple[bool, dict[str, Any]]:
        beats = [c.health.get("ok_at", started) for c in components]
        lags = list(LoopWatchdog.for_current_loop().recent_lags)
        return loop_and_db_health({"ok_at": min(beats)}, lags, dead_after, started)

    sink = TaskLogSink(
        store, "worker" if any(isinstance(c, Worker) for c in components) else "triggerer"
    )
    async with anyio.create_task_group() as tg:
        if isinstance(store, FatalGuard):
            store.on_fatal = tg.cancel_scope.cancel

        async def on_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                count = 0
                async for signum in signals:
                    count += 1
                    if count == 1:
                        log.info(
                            "stopping gracefully; send the signal again to exit at once",
                            signal=signal.Signals(signum).name,
                        )
                        for c in components:
                            c.stop()
                    else:
                        log.warning("second signal: exiting now")
                        os._exit(130)

        tg.start_soon(on_signals)
        tg.start_soon(sink.run, name="task-log-sink")
        if getattr(args, "metrics_port", None) is not None:
            await tg.start(serve, metrics, args.metrics_host, args.metrics_port, health_check)
        if getattr(args, "retention", None) is not None:
            tg.start_soon(retention.clean_periodically, store, args.retention)
        async with anyio.create_task_group() as inner:
            for component in components:
                inner.start_soon(component.run)
            if after_start is not None:
                for component in components:
                    await component.started.wait()
                await after_start()
                for component in components:
                    component.stop()
        tg.cancel_scope.cancel()


def _unreachable_at_open(exc: BaseException) -> bool:
    """The database refused the connection or dropped it mid-handshake (restarting, failing
    over); not a refused login, a missing database, a wrong URL, or no answer at all."""
    cause = exc.__cause__ if isinstance(exc, ConfigError) else exc
    return (
        cause is not None
        and not isinstance(cause, TimeoutError)  # no answer at all: a wrong address
        and is_connection_error(cause)
    )


async def _open_waiting(store: Store, url: str | None) -> None:
    """Open the store, waiting out an unreachable database (``liveness.while_unreachable``);
    what is still wrong once time is up is one line."""
    from deferrun.process.liveness import while_unreachable

    try:
        reason = "the database is not reachable yet"
        await while_unreachable(store.open, reason, _unreachable_at_open)
    except Exception as exc:
        if isinstance(exc, ConfigError) or not _unreachable_at_open(exc):
            raise
        safe = config.redact_url(config.db_url(url))
        raise ConfigError(f"cannot open {safe}: {exc!r}; is the server up?") from exc


async def _run_processes(args: argparse.Namespace, roles: Sequence[str]) -> int:
    from deferrun.process.metrics import CountingStore, Metrics
    from deferrun.process.startup import FatalGuard, configure_trust
    from deferrun.store import make_store
    from deferrun.triggerer.triggerer import Triggerer
    from deferrun.worker.worker import Worker

    configure_trust(args.imports)
    metrics = Metrics()
    guard = FatalGuard(CountingStore(make_store(args.db), metrics))
    store: Store = guard  # type: ignore[assignment]
    await _open_waiting(store, args.db)
    try:
        components: list[Worker | Triggerer] = []
        if "triggerer" in roles:
            components.append(
                Triggerer(
                    store,
                    capacity=args.capacity,
                    metrics=metrics,
                    queues=(args.queue or []) if roles == ["triggerer"] else [],
                )
            )
        if "worker" in roles:
            components.append(
                Worker(
                    store,
                    slots=args.slots,
                    queues=args.queue or ["default"],
                    grace_period=args.grace_period,
                    metrics=metrics,
                )
            )
        after = None
        if getattr(args, "demo", False):

            async def after() -> None:
                from deferrun.cli.demo_runner import run_demo

                await run_demo(store)

        try:
            await _serve(store, components, args, after)
        except BaseException:
            if guard.fatal is not None:
                raise guard.fatal from None
            raise
        if guard.fatal is not None:
            raise guard.fatal
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()
        _exit_if_stuck(0 if guard.fatal is None else 2)
    return 0


_stuck_exit: threading.Timer | None = None
STUCK_EXIT_AFTER = 2.0  # everything of ours is stopped and stored by then


def _exit_if_stuck(code: int) -> None:
    """Leave even if user code never ends: the event loop's own shutdown waits for every task,
    and a trigger's cleanup() or an operator's task that swallows cancellation would hold the
    process forever after SIGTERM. ``main`` cancels this once the loop has closed."""
    global _stuck_exit

    def exit_now() -> None:
        print(
            f"error: user code ignored cancellation for {STUCK_EXIT_AFTER:g}s after shutdown "
            "(a trigger's cleanup() or a task that never ends); exiting anyway",
            file=sys.stderr,
        )
        os._exit(code)

    _stuck_exit = threading.Timer(STUCK_EXIT_AFTER, exit_now)
    _stuck_exit.daemon = True
    _stuck_exit.start()


# --------------------------------------------------------------------------- argument parsing


def _add_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--db",
        default=default(None),
        help=f"database URL (default: $DEFERRUN_DB, else {config.DEFAULT_DB})",
    )
    parser.add_argument(
        "--log-format",
        choices=["console", "json"],
        default=default(None),
        help="default: console on a terminal, json otherwise",
    )
    parser.add_argument(
        "--log-level",
        default=default("info"),
        help="debug, info, warning or error (default: info)",
    )


def _add_metrics(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="serve Prometheus /metrics and /healthz on this port",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address for --metrics-port (default: 127.0.0.1, this host only; 0.0.0.0 for a "
        "Prometheus elsewhere)",
    )


def _add_imports(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--import",
        dest="imports",
        action="extend",
        nargs="+",
        default=[],
        metavar="PKG",
        help="import these packages at start and load stored classes only from them (plus "
        "deferrun and triggers); default: $DEFERRUN_IMPORTS (comma-separated), else only "
        "deferrun and triggers",
    )


def build_parser() -> argparse.ArgumentParser:
    # Common options are accepted before or after the command (deferrun --db X tasks, or
    # deferrun tasks --db X); SUPPRESS keeps the subcommand from erasing a value given first.
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, suppress=True)

    parser = argparse.ArgumentParser(prog="deferrun", description="deferrable-operator runtime")
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "standalone",
        parents=[common],
        help="triggerer and worker in one process (development)",
        description="Run a triggerer and a worker in one process (development, small hosts).",
    )
    p.add_argument("--slots", type=int, default=2, help="tasks run at once")
    p.add_argument("--capacity", type=int, default=1000, help="most triggers run at once")
    p.add_argument("--queue", action="append", help="queue(s) to serve (default: default)")
    p.add_argument(
        "--demo",
        action="store_true",
        help="submit a few deferrable tasks, show their progress, and exit when they are done",
    )

    p.add_argument("--grace-period", type=float, default=30.0, help=argparse.SUPPRESS)
    _add_metrics(p)
    _add_imports(p)

    p = sub.add_parser(
        "triggerer",
        parents=[common],
        help="run triggers for deferred tasks",
        description="Run the triggers of deferred tasks and resume the tasks when they fire.",
    )
    p.add_argument("--capacity", type=int, default=1000, help="most triggers run at once")
    p.add_argument("--queue", action="append", help="queue(s) to serve (default: all)")
    p.add_argument(
        "--retention",
        type=retention.parse_duration,
        metavar="AGE",
        help="also delete finished tasks older than AGE (7d, 12h...) periodically",
    )
    _add_metrics(p)
    _add_imports(p)

    p = sub.add_parser(
        "worker",
        parents=[common],
        help="run tasks",
        description="Run queued tasks (and resumed ones) in worker slots.",
    )
    p.add_argument("--slots", type=int, default=8, help="tasks run at once")
    p.add_argument("--queue", action="append", help="queue(s) to serve (default: default)")

    p.add_argument(
        "--grace-period",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, let running tasks finish this long, then re-queue them; also how "
        "long code past its execution_timeout may take to stop before the timeout is recorded",
    )
    _add_metrics(p)
    _add_imports(p)

    actions.add_parsers(sub, common)
    retention.add_parsers(sub, common)
    web_cli.add_parser(sub, common)

    p = sub.add_parser("tasks", parents=[common], help="list tasks")
    p.add_argument("--state", choices=[s.value for s in TaskState])
    p.add_argument("--limit", type=_at_least_one, default=50, help="most tasks listed")
    p.add_argument(
        "--exact-counts",
        action="store_true",
        help="count every row of each state (default: exact up to 10000 per state, then "
        "'10000+', which stays fast on millions of rows)",
    )
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("task", parents=[common], help="show one task")
    p.add_argument("task_id")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--graph",
        action="store_true",
        help="also draw the task's pipeline: upstream and downstream tasks, a few levels",
    )

    p = sub.add_parser("triggers", parents=[common], help="list live triggers and triggerers")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("logs", parents=[common], help="show a task's log lines, in order")
    p.add_argument("task_id")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    _describe(sub)
    return parser


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's default in its help, when it has one worth showing (not None, False or
    empty) and the help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or "default" in text.lower() or not _shown(action.default):
            return text
        return f"{text} (default: %(default)s)".strip()


def _shown(default: Any) -> bool:
    return default not in (None, False, [], argparse.SUPPRESS)


def _describe(sub: argparse._SubParsersAction) -> None:
    """Give every subcommand (``db clean`` too) a one-line description (its help, unless it
    has its own) and help that shows defaults, wherever its parser was built."""
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, parser in sub.choices.items():
        parser.formatter_class = _HelpFormatter
        if not parser.description and helps.get(name):
            text = str(helps[name])
            parser.description = text[0].upper() + text[1:] + "."
        for action in parser._actions:
            if action.help is None and action.option_strings and _shown(action.default):
                action.help = "(default: %(default)s)"  # argparse skips an option without help
            if isinstance(action, argparse._SubParsersAction):
                _describe(action)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level
    if getattr(args, "demo", False) and level == "info":
        level = "warning"  # the demo prints its own progress
    configure_logging(args.log_format, level)
    commands = {
        "standalone": lambda: _run_processes(args, ["triggerer", "worker"]),
        "triggerer": lambda: _run_processes(args, ["triggerer"]),
        "worker": lambda: _run_processes(args, ["worker"]),
        "submit": lambda: actions.submit(args),
        "cancel": lambda: actions.cancel(args),
        "retry": lambda: actions.retry(args),
        "tasks": lambda: views.tasks(args),
        "task": lambda: views.task(args),
        "triggers": lambda: views.triggers(args),
        "logs": lambda: views.logs(args),
        "db": lambda: retention.clean_command(args),
        "web": lambda: web_cli.serve_command(args),
    }
    try:
        if args.command in SERVING:
            return _run(_logging_loop(commands[args.command]), loops.choose())
        return _run(commands[args.command])
    except (DeferrunError, ValueError) as exc:
        if (
            isinstance(exc, StoreUnavailable)
            and isinstance(exc.__cause__, TimeoutError)
            and args.command not in SERVING
        ):
            return _unreachable(args, exc)  # a query the server never answered
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:
        # A task group (e.g. the metrics server failing to bind) wraps the error it raised.
        first = _first_user_error(group)
        if first is None:
            raise
        print(f"error: {first}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `deferrun tasks | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        # a one-shot command whose database stopped answering or dropped the connection
        if args.command in SERVING or not (
            isinstance(exc, TimeoutError) or is_connection_error(exc) or _database_refused(exc)
        ):
            raise
        safe = config.redact_url(config.db_url(getattr(args, "db", None)))
        if _database_refused(exc) and not is_connection_error(exc):
            print(
                f"error: the database at {safe} refused a query ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); is it a deferrun database "
                "of this version?",
                file=sys.stderr,
            )
            return 2
        return _unreachable(args, exc)


SERVING = ("standalone", "triggerer", "worker", "web")


def _unreachable(args: argparse.Namespace, exc: BaseException) -> int:
    """A one-shot command whose database stopped answering or dropped the connection."""
    safe = config.redact_url(config.db_url(getattr(args, "db", None)))
    cause = exc.__cause__ if isinstance(exc, StoreUnavailable) and exc.__cause__ else exc
    what = "did not answer in time" if isinstance(cause, TimeoutError) else "was lost"
    print(
        f"error: the database at {safe} {what} ({type(cause).__name__}); check that the "
        "server is up and not blocked, then run the command again",
        file=sys.stderr,
    )
    return 2


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is below 1; pass a count of 1 or more")
    return value


def _database_refused(exc: BaseException) -> bool:
    """An error the database itself raised for a statement (not a bug of ours)."""
    import sqlite3

    module = type(exc).__module__ or ""
    return isinstance(exc, sqlite3.Error) or module.startswith("asyncpg")


def _logging_loop(command: Any) -> Any:
    async def run() -> Any:
        log.info("event loop", loop=loops.running_loop_name())
        return await command()

    return run


def _run(command: Any, loop: str = "asyncio") -> int:
    try:
        return int(anyio.run(command, backend_options=loops.backend_options(loop)))
    finally:
        if _stuck_exit is not None:
            _stuck_exit.cancel()


def _first_user_error(group: BaseExceptionGroup[Any]) -> DeferrunError | None:
    for exc in group.exceptions:
        if isinstance(exc, DeferrunError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_user_error(exc)
            if found is not None:
                return found
    return None
