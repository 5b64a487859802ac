"""Read-only views of a database: ``deferrun tasks``, ``task``, ``triggers`` and ``logs``.

They open the database with ``create=False``: a mistyped --db is an error, never a new empty
database that then reports "no tasks".
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from deferrun.client import AsyncClient
from deferrun.core.models import TaskInfo, TaskState, TriggerInfo, UpstreamWait
from deferrun.exceptions import DeferrunError
from deferrun.store import Store, open_store
from deferrun.store.observe import STATE_COUNT_CAP


class UsageError(DeferrunError):
    pass


#: for tasks waiting on upstreams: their rule, how many upstreams, how many of those ended
async def upstream_waits(store: Store, ids: Sequence[str]) -> dict[str, UpstreamWait]:
    """The :class:`UpstreamWait` of each task in ``ids`` that has upstreams."""
    return await store.upstream_waits(list(ids)) if ids else {}


def waits_upstream(info: TaskInfo) -> bool:
    """Deferred with no trigger: the task waits on upstream tasks, not on a trigger."""
    return info.state is TaskState.DEFERRED and info.trigger_id is None


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


#: control characters (C0 but newline and tab, DEL, C1) shown escaped: stored text (a task name
#: anyone who submits may choose, an error from an external API) must not drive the terminal
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (9, 10)}


def terminal_safe(text: str) -> str:
    return text.translate(_CONTROL)


def _stamp(at: Any) -> str:
    """A stored log time as ISO text; a forged or corrupt one (NaN, infinite) as itself."""
    try:
        return datetime.fromtimestamp(float(at), UTC).isoformat()
    except (OverflowError, ValueError, OSError, TypeError):
        return str(at)


#: a table cell longer than this is cut: every row is padded to its column's widest cell, so
#: one 20,000-character task name made a 2,000-row listing print 40 MB
MAX_CELL = 200


def _cell(value: Any) -> str:
    text = terminal_safe(str(value)).replace("\n", " ")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def to_json(value: Any) -> str:
    return msgspec.json.encode(value, enc_hook=repr).decode()


def _task_line(info: TaskInfo, waits: dict[str, UpstreamWait]) -> list[Any]:
    owner, due, detail = "-", "-", ""
    if waits_upstream(info):
        detail = str(waits.get(info.id, "waits on upstream tasks"))
    elif info.state is TaskState.DEFERRED:
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


class Neighbour(msgspec.Struct, frozen=True):
    """An upstream or downstream task as ``deferrun task`` shows it."""

    id: str
    name: str
    state: str


class Dependencies(msgspec.Struct, frozen=True):
    trigger_rule: str | None
    waiting: str | None
    upstream: list[Neighbour]
    downstream: list[Neighbour]


async def dependencies(client: AsyncClient, store: Store, info: TaskInfo) -> Dependencies:
    up_ids, down_ids = await client.dependencies(info.id)

    async def neighbours(ids: list[str]) -> list[Neighbour]:
        out = []
        for task_id in ids:
            other = await client.get(task_id)
            out.append(Neighbour(task_id, other.name, str(other.state)))
        return out

    wait = (await upstream_waits(store, [info.id])).get(info.id) if up_ids else None
    return Dependencies(
        trigger_rule=wait.trigger_rule if wait else None,
        waiting=str(wait) if wait and waits_upstream(info) else None,
        upstream=await neighbours(up_ids),
        downstream=await neighbours(down_ids),
    )


def print_task(
    info: TaskInfo,
    args: argparse.Namespace,
    deps: Dependencies | None = None,
    health: dict[str, Any] | None = None,
) -> None:
    """``health``: the poll health of the trigger the task waits on (shown when failing)."""
    if getattr(args, "json", False):
        shown = msgspec.to_builtins(info, enc_hook=repr)
        if deps is not None:
            shown.update(msgspec.to_builtins(deps))
        if health is not None:
            shown["trigger_health"] = msgspec.to_builtins(health, enc_hook=repr)
        print(to_json(shown))
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
    if deps is not None and deps.trigger_rule is not None:
        fields.append(("trigger rule", deps.trigger_rule))
    if deps is not None and deps.waiting is not None:
        fields.append(("waiting", deps.waiting.replace("waits on ", "on ", 1)))
    elif info.state is TaskState.DEFERRED:
        fields += [
            ("trigger", f"{info.trigger_id} {info.trigger_classpath}"),
            ("triggerer", info.triggerer_id or "(unclaimed)"),
            ("resumes with", info.next_method),
            ("timeout", _until(info.defer_deadline)),
        ]
        if health is not None and health["poll_failures"]:
            fields += [
                ("FAILING", f"{health['poll_failures']} poll(s) in a row failed"),
                ("last error", health["last_error"]),
                ("last success", health["last_ok_at"] or "never (since claimed)"),
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
            print(f"{key.ljust(width)}  {terminal_safe(str(value))}")
    if info.error:
        error = terminal_safe(info.error)
        print(f"{'error'.ljust(width)}  " + error.replace("\n", "\n" + " " * (width + 2)))
    for title, group in (
        (("upstream", deps.upstream), ("downstream", deps.downstream)) if deps else ()
    ):
        if group:
            print(f"\n{title} ({len(group)}):")
            print(table(["id", "name", "state"], [[n.id, n.name, n.state] for n in group]))


async def _reader(args: argparse.Namespace) -> tuple[AsyncClient, Store]:
    store = await open_store(args.db, create=False, one_shot=True)
    return AsyncClient(store=store, owns_store=True), store


async def tasks(args: argparse.Namespace) -> int:
    client, store = await _reader(args)
    async with client:
        infos = await client.list(args.state, limit=args.limit)
        exact = getattr(args, "exact_counts", False)
        counts = await (client.counts() if exact else store.capped_state_counts())
        waits = await upstream_waits(store, [i.id for i in infos if waits_upstream(i)])
    cap = None if exact else STATE_COUNT_CAP
    over = sorted(s for s, n in counts.items() if cap is not None and n > cap)
    if args.json:
        counts = {s: min(n, cap) if cap is not None else n for s, n in counts.items()}
        print(
            to_json(
                {
                    "counts": counts,
                    # states with more tasks than the cap: their count reads "at least"
                    "counts_over_cap": over,
                    "count_cap": cap,
                    "tasks": infos,
                    "waiting_on_upstream": waits,
                }
            )
        )
        return 0

    def shown(state: str) -> str:
        return f"{cap}+" if state in over else str(counts[state])

    summary = ", ".join(f"{state}={shown(state)}" for state in TaskState if state in counts)
    if over:
        summary += " (--exact-counts to count every row)"
    print(f"tasks: {summary or 'none'}")
    if infos:
        print(
            table(
                ["id", "name", "state", "try", "age", "owner", "next", "detail"],
                [_task_line(i, waits) for i in infos],
            )
        )
    return 0


async def task(args: argparse.Namespace) -> int:
    client, store = await _reader(args)
    async with client:
        info = await client.get(args.task_id)
        if getattr(args, "graph", False) and getattr(args, "json", False):
            return await _print_graph(store, info.id, as_json=True)
        health = None
        if info.state is TaskState.DEFERRED and info.trigger_id is not None:
            health = await store.trigger_health(info.trigger_id)
        print_task(info, args, await dependencies(client, store, info), health)
        if getattr(args, "graph", False):
            await _print_graph(store, info.id, as_json=False)
    return 0


async def _print_graph(store: Store, task_id: str, as_json: bool) -> int:
    """``deferrun task ID --graph``: the pipeline the task page draws, as rows (or JSON)."""
    from deferrun.web import graph

    drawn = await graph.walk(store, task_id)
    if drawn is None:
        raise UsageError(f"no task {task_id!r} in this database")
    if as_json:
        print(to_json(drawn.to_json()))
        return 0
    print(f"\npipeline ({graph.LEVELS} levels up and down, at most {graph.MAX_NODES} tasks):")
    if len(drawn.nodes) == 1:
        print("  no upstream or downstream tasks")
    else:
        print(table(["level", "name", "state", "id", "after"], graph.rows(drawn)))
    for note in drawn.cut:
        print(f"cut: {note}")
    return 0


async def triggers(args: argparse.Namespace) -> int:
    store = await open_store(args.db, create=False, one_shot=True)
    try:
        triggers = await store.list_triggers()
        processes = await store.list_processes()
        failing = await store.failing_triggers(limit=1000)
    finally:
        await store.close()
    if args.json:
        print(to_json({"triggers": triggers, "processes": processes, "failing": failing}))
        return 0
    failures = {f["id"]: f["poll_failures"] for f in failing}
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
                ["id", "task", "trigger", "owner", "age", "timeout", "polls"],
                [
                    [
                        t.id,
                        t.task_id,
                        t.classpath,
                        t.triggerer_id or "(unclaimed)",
                        _age(t.created_at),
                        _until(t.deadline),
                        f"FAILING x{failures[t.id]}" if t.id in failures else "ok",
                    ]
                    for t in triggers
                ],
            )
        )
    if failing:
        print(f"failing triggers: {len(failing)} (polls failing in a row; see the last error)")
        print(
            table(
                ["id", "task", "trigger", "failed", "last success", "last error"],
                [
                    [
                        f["id"],
                        f["task_id"],
                        f["classpath"],
                        f["poll_failures"],
                        f["last_ok_at"] or "never",
                        terminal_safe((f["last_error"] or "")[:120]),
                    ]
                    for f in failing
                ],
            )
        )
    polls = shared_poll_rows(triggers)
    if polls:
        print(f"shared polls: {len(polls)}")
        print(table(["poll", "owner", "tasks", "distinct triggers"], polls))
    return 0


def shared_poll_rows(triggers: Sequence[TriggerInfo]) -> list[list[Any]]:
    """Per triggerer, each shared poll (or run of identical triggers) with its tasks.

    A poll key joins triggers into one poll; without one, identical triggers (one affinity
    key) still share one run() when two or more wait.
    """
    tasks: Counter[tuple[str, str]] = Counter()
    distinct: dict[tuple[str, str], set[str | None]] = {}
    for t in triggers:
        name = t.poll_key or (f"{t.classpath} (identical)" if t.affinity else None)
        if name is None:
            continue
        where = (name, t.triggerer_id or "(unclaimed)")
        tasks[where] += 1
        distinct.setdefault(where, set()).add(t.affinity or str(t.id))
    return [
        [name, owner, count, len(distinct[(name, owner)])]
        for (name, owner), count in sorted(tasks.items())
        if count > 1 or not name.endswith("(identical)")
    ]


_LOG_META = {"timestamp", "level", "event", "task_id", "pid"}


async def logs(args: argparse.Namespace) -> int:
    store = await open_store(args.db, create=False, one_shot=True)
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
            event = None
        if not isinstance(event, dict):  # not a JSON object: shown as stored
            print(f"{_stamp(at)}  {source:<9} {terminal_safe(str(line))}")
            continue
        extra = " ".join(f"{k}={v}" for k, v in event.items() if k not in _LOG_META)
        stamp = event.get("timestamp") or _stamp(at)
        print(
            terminal_safe(
                f"{stamp}  {source:<9} {event.get('level', ''):<8} {event.get('event', '')}"
                f"{'  ' + extra if extra else ''}"
            )
        )
    return 0
