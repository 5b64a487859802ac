"""Read-only views of a database: ``deferrun tasks``, ``task``, ``triggers`` and ``logs``.

They open the database with ``create=False``: a mistyped --db is an error, never a new empty
database that then reports "no tasks".
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from deferrun.client import AsyncClient
from deferrun.exceptions import DeferrunError
from deferrun.models import TaskInfo, TaskState
from deferrun.store import open_store


class UsageError(DeferrunError):
    pass


def _age(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    seconds = (datetime.now(UTC) - moment).total_seconds()
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _until(moment: datetime | None) -> str:
    if moment is None:
        return "-"
    seconds = (moment - datetime.now(UTC)).total_seconds()
    return f"in {seconds:.0f}s" if seconds >= 0 else f"{-seconds:.0f}s ago"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_json(value: Any) -> str:
    return msgspec.json.encode(value, enc_hook=repr).decode()


def _task_line(info: TaskInfo) -> list[Any]:
    owner, due, detail = "-", "-", ""
    if info.state is TaskState.DEFERRED:
        owner = info.triggerer_id or "(unclaimed)"
        due = f"timeout {_until(info.defer_deadline)}" if info.defer_deadline else "-"
        detail = f"trigger {info.trigger_id} {info.trigger_classpath or ''}".strip()
    elif info.state is TaskState.RUNNING:
        owner = info.worker_id or "-"
    elif info.not_before is not None:
        due = f"runs {_until(info.not_before)}"
    if info.error and info.state is not TaskState.DEFERRED:
        detail = info.error.strip().splitlines()[-1][:80]
    return [
        info.id,
        info.name,
        info.state,
        f"{info.try_number}/{info.max_tries}",
        _age(info.created_at),
        owner,
        due,
        detail,
    ]


def print_task(info: TaskInfo, args: argparse.Namespace) -> None:
    if getattr(args, "json", False):
        print(to_json(info))
        return
    fields = [
        ("id", info.id),
        ("name", info.name),
        ("operator", info.classpath),
        ("queue", info.queue),
        ("state", info.state),
        ("try", f"{info.try_number} of {info.max_tries}"),
        ("created", info.created_at),
        ("started", info.started_at),
        ("updated", info.updated_at),
        ("finished", info.finished_at),
    ]
    if info.state is TaskState.DEFERRED:
        fields += [
            ("trigger", f"{info.trigger_id} {info.trigger_classpath}"),
            ("triggerer", info.triggerer_id or "(unclaimed)"),
            ("resumes with", info.next_method),
            ("timeout", _until(info.defer_deadline)),
        ]
    if info.not_before:
        fields.append(("not before", info.not_before))
    if info.worker_id:
        fields.append(("worker", info.worker_id))
    if info.state is TaskState.SUCCESS:
        fields.append(("result", to_json(info.result)))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        if value is not None:
            print(f"{key.ljust(width)}  {value}")
    if info.error:
        print(f"{'error'.ljust(width)}  " + info.error.replace("\n", "\n" + " " * (width + 2)))


async def _reader(args: argparse.Namespace) -> AsyncClient:
    return AsyncClient(store=await open_store(args.db, create=False), owns_store=True)


async def tasks(args: argparse.Namespace) -> int:
    async with await _reader(args) as client:
        infos = await client.list(args.state, limit=args.limit)
        counts = await client.counts()
    if args.json:
        print(to_json({"counts": counts, "tasks": infos}))
        return 0
    summary = ", ".join(f"{state}={counts[state]}" for state in TaskState if state in counts)
    print(f"tasks: {summary or 'none'}")
    if infos:
        print(
            table(
                ["id", "name", "state", "try", "age", "owner", "next", "detail"],
                [_task_line(i) for i in infos],
            )
        )
    return 0


async def task(args: argparse.Namespace) -> int:
    async with await _reader(args) as client:
        print_task(await client.get(args.task_id), args)
    return 0


async def triggers(args: argparse.Namespace) -> int:
    store = await open_store(args.db, create=False)
    try:
        triggers = await store.list_triggers()
        processes = await store.list_processes()
    finally:
        await store.close()
    if args.json:
        print(to_json({"triggers": triggers, "processes": processes}))
        return 0
    live = [p for p in processes if p.role == "triggerer"]
    print(
        f"triggerers: {len([p for p in live if p.alive])} alive"
        + "".join(
            f"\n  {p.id}  capacity {p.capacity}  heartbeat {_age(p.heartbeat_at)} ago"
            f"{'' if p.alive else '  (DEAD)'}"
            for p in live
        )
    )
    print(f"triggers: {len(triggers)}")
    if triggers:
        print(
            table(
                ["id", "task", "trigger", "owner", "age", "timeout"],
                [
                    [
                        t.id,
                        t.task_id,
                        t.classpath,
                        t.triggerer_id or "(unclaimed)",
                        _age(t.created_at),
                        _until(t.deadline),
                    ]
                    for t in triggers
                ],
            )
        )
    return 0


_LOG_META = {"timestamp", "level", "event", "task_id", "pid"}


async def logs(args: argparse.Namespace) -> int:
    store = await open_store(args.db, create=False)
    try:
        if await store.get_task(args.task_id) is None:
            raise UsageError(
                f"no task {args.task_id!r} in this database; list them with `deferrun tasks`"
            )
        rows = await store.task_logs(args.task_id)
    finally:
        await store.close()
    if not rows:
        print(f"no log lines stored for task {args.task_id} yet", file=sys.stderr)
    for at, source, line in rows:
        if args.json:
            print(line)
            continue
        try:
            event = msgspec.json.decode(line)
        except msgspec.DecodeError:
            print(f"{datetime.fromtimestamp(at, UTC).isoformat()}  {source:<9} {line}")
            continue
        extra = " ".join(f"{k}={v}" for k, v in event.items() if k not in _LOG_META)
        stamp = event.get("timestamp") or datetime.fromtimestamp(at, UTC).isoformat()
        print(
            f"{stamp}  {source:<9} {event.get('level', ''):<8} {event.get('event', '')}"
            f"{'  ' + extra if extra else ''}"
        )
    return 0
