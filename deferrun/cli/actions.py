"""Commands that change tasks: ``deferrun submit``, ``cancel`` and ``retry``.

Kept apart from :mod:`deferrun.cli.commands` (process commands) and
:mod:`deferrun.cli.views` (read-only views). Each refusal is one line on stderr and a
non-zero exit, raised as a DeferrunError.
"""

from __future__ import annotations

import argparse
import math
import sys

from deferrun.cli import views
from deferrun.client import AsyncClient
from deferrun.core import serialization
from deferrun.core.models import TaskState
from deferrun.exceptions import DeferrunError, TaskEnded, TaskNotFound
from deferrun.store import open_store
from deferrun.store.pipelines import TRIGGER_RULES, not_retryable


async def submit(args: argparse.Namespace) -> int:
    try:
        kwargs = serialization.loads(args.kwargs) if args.kwargs else {}
    except DeferrunError as exc:
        raise views.UsageError(f"--kwargs is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise views.UsageError(f"--kwargs must be a JSON object, got {args.kwargs}")
    if args.queue:
        kwargs["queue"] = args.queue
    after = list(dict.fromkeys(args.after or []))
    if args.trigger_rule != "all_success" and not after:
        raise views.UsageError("--trigger-rule needs at least one --after TASK_ID to apply to")
    async with AsyncClient(args.db) as client:
        task_id = await client.submit_classpath(
            args.classpath, kwargs, after=after, trigger_rule=args.trigger_rule
        )
        print(task_id, flush=True)
        if args.wait is None:
            return 0
        timeout = None if args.wait == 0 else args.wait
        try:
            info = await client.wait(task_id, timeout=timeout)
        except TimeoutError:
            print(f"task {task_id} did not finish within {args.wait:g}s", file=sys.stderr)
            return 3
        views.print_task(info, args)
        return 0 if info.state in (TaskState.SUCCESS, TaskState.SKIPPED) else 1


async def _writer(args: argparse.Namespace) -> AsyncClient:
    """A client on an existing database: acting on a mistyped --db must not create one."""
    return AsyncClient(store=await open_store(args.db, create=False), owns_store=True)


def _not_found(task_id: str) -> TaskNotFound:
    return TaskNotFound(f"no task {task_id!r} in this database; list them with `deferrun tasks`")


async def cancel(args: argparse.Namespace) -> int:
    """Cancel a task that has not ended; its waiting downstream tasks settle with it."""
    async with await _writer(args) as client:
        try:
            before = await client.get(args.task_id)
        except TaskNotFound:
            raise _not_found(args.task_id) from None
        if before.finished:
            raise views.UsageError(
                f"task {args.task_id} already ended {before.state}; nothing to cancel "
                "(use `deferrun retry` to run it again)"
            )
        downstream = await _all_downstream(client, args.task_id)
        open_before = [d for d in downstream if not (await client.get(d)).finished]
        try:
            await client.cancel(args.task_id)
        except TaskEnded as exc:  # it ended on its own meanwhile
            raise views.UsageError(str(exc)) from None
        ended = [d for d in open_before if (await client.get(d)).finished]
    print(f"{args.task_id} cancelled", flush=True)
    if ended:
        print(f"{len(ended)} downstream task(s) ended with it: {' '.join(ended)}", flush=True)
    return 0


async def _all_downstream(client: AsyncClient, task_id: str) -> list[str]:
    """Every task downstream of ``task_id``, nearest first (bounded by the graph's size)."""
    seen: dict[str, None] = {}
    frontier = [task_id]
    while frontier:
        nxt = []
        for one in frontier:
            for down in (await client.dependencies(one))[1]:
                if down not in seen and down != task_id:
                    seen[down] = None
                    nxt.append(down)
        frontier = nxt
    return list(seen)


async def retry(args: argparse.Namespace) -> int:
    """Run a finished task again (a fresh try); prints every id put back, one a line."""
    async with await _writer(args) as client:
        try:
            info = await client.get(args.task_id)
        except TaskNotFound:
            raise _not_found(args.task_id) from None
        if not info.finished:  # the store's own refusal: the same line as a retry at once
            raise views.UsageError(not_retryable(args.task_id, str(info.state)))
        # the ids put back: the task, then (with --downstream) every task after it that had
        # ended or still waited; a queued or running one is left alone and not listed
        ids = await client.retry(args.task_id, downstream=args.downstream)
    for task_id in ids:
        print(task_id)
    return 0


def seconds_arg(text: str) -> float:
    """A command-line duration: a finite, non-negative number of seconds (0 = no limit)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
    return value


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """The submit, cancel and retry subcommands."""
    p = sub.add_parser("submit", parents=[common], help="submit an operator by classpath")
    p.add_argument("classpath", help="e.g. deferrun.sensors.TimeDeltaSensor")
    p.add_argument("--kwargs", help="constructor keyword arguments as a JSON object")
    p.add_argument("--queue")
    p.add_argument(
        "--after",
        action="append",
        metavar="TASK_ID",
        help="wait (holding no slot) until this task ends; repeat for several upstreams",
    )
    p.add_argument(
        "--trigger-rule",
        choices=TRIGGER_RULES,
        default="all_success",
        help="when the task runs, given its upstreams' outcomes (default: all_success)",
    )
    p.add_argument(
        "--wait",
        nargs="?",
        type=seconds_arg,
        const=0.0,
        default=None,
        metavar="SECONDS",
        help="wait for the task to finish (optionally at most SECONDS)",
    )

    p = sub.add_parser(
        "cancel", parents=[common], help="cancel a task; tasks waiting on it settle at once"
    )
    p.add_argument("task_id")

    p = sub.add_parser("retry", parents=[common], help="run a finished task again")
    p.add_argument("task_id")
    p.add_argument(
        "--downstream",
        action="store_true",
        help="also re-arm every task downstream of it to wait for the new run",
    )
