"""What the status page and ``deferrun db clean`` ask of the store: named queries, run by
:class:`~deferrun.store.manager.SqlStore` on both backends (mixed in as :class:`Observe`).

Every list is keyset-paged on an index (``created_at, id`` per filter, schema version 7) and
no page counts rows: a page of 1,000,000 tasks costs what a page of 100 does. The one full
count (tasks by state) is left to callers to cache.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import msgspec

from deferrun.core.models import TaskInfo, TaskState, ts
from deferrun.store.retention import COUNT_CANDIDATES, check_states, clean_batch
from deferrun.store.rows import TASK_INFO_COLUMNS, load_or_raw, task_info
from deferrun.store.sql import Query

ACTIVE = "('queued', 'running', 'deferred', 'up_for_retry', 'up_for_reschedule')"

ACTIVE_COUNTS = Query(
    "web_active_counts",
    f"SELECT state, count(*) FROM deferrun_tasks WHERE state IN {ACTIVE} GROUP BY state",
)
#: `deferrun tasks` counts each state only this far (one bounded index range scan per state)
STATE_COUNT_CAP = 10_000
#: The ORDER BY matches the (state, finished_at) index, so each count is a bounded index-only
#: scan. Without it PostgreSQL picks a sequential scan for a common state, which reads ~70,000
#: rows to find 10,001 and, on a table larger than shared_buffers, reads every page again
#: through its ring buffer: 42 -> 19 ms for four common states at 1,000,000 rows (pages not
#: yet marked all-visible; about 5 ms either way once they are).
CAPPED_STATE_COUNTS = Query(
    "capped_state_counts",
    " UNION ALL ".join(
        f"SELECT '{state.value}', (SELECT count(*) FROM (SELECT 1 FROM deferrun_tasks "
        f"WHERE state = '{state.value}' ORDER BY state, finished_at "
        f"LIMIT {STATE_COUNT_CAP + 1}) AS s{i})"
        for i, state in enumerate(TaskState)
    ),
)
PROCESSES = Query(
    "web_processes",
    """SELECT p.id, p.role, p.host, p.pid, p.queues, p.capacity, p.started_at,
        {now} - p.heartbeat_at, p.loop_lag,
        (SELECT count(*) FROM deferrun_triggers g WHERE g.triggerer_id = p.id),
        (SELECT count(*) FROM deferrun_tasks t WHERE t.state = 'running' AND t.worker_id = p.id)
    FROM deferrun_processes p ORDER BY p.role, p.started_at""",
)
_TRIGGER_COLUMNS = (
    "g.id, g.task_id, g.classpath, g.queue, g.triggerer_id, {now} - g.created_at, "
    "g.deadline - {now}"
)
OLDEST_TRIGGER = Query(
    "web_oldest_trigger",
    f"SELECT {_TRIGGER_COLUMNS} FROM deferrun_triggers g ORDER BY g.id LIMIT 1",
)
OLDEST_UNCLAIMED = Query(
    "web_oldest_unclaimed",
    f"SELECT {_TRIGGER_COLUMNS} FROM deferrun_triggers g WHERE g.triggerer_id IS NULL "
    "ORDER BY g.id LIMIT 1",
)
TRIGGER_GROUPS = Query(
    "web_trigger_groups",
    """SELECT classpath, triggerer_id, count(*), {now} - min(created_at), {now} - max(created_at),
        min(deadline) - {now}
    FROM deferrun_triggers GROUP BY classpath, triggerer_id ORDER BY classpath, triggerer_id""",
)
TRIGGERS_OF_CLASS = Query(
    "web_triggers_of_class",
    f"SELECT {_TRIGGER_COLUMNS}, g.kwargs FROM deferrun_triggers g "
    "WHERE g.classpath = :classpath AND g.id > :after ORDER BY g.id LIMIT :limit",
)
_HEALTH_COLUMNS = "g.poll_failures, g.last_error, g.last_ok_at"
FAILING_TRIGGERS = Query(
    "web_failing_triggers",
    f"SELECT {_TRIGGER_COLUMNS}, {_HEALTH_COLUMNS} FROM deferrun_triggers g "
    "WHERE g.poll_failures > 0 ORDER BY g.id LIMIT :limit",
)
TASK_TRIGGER_HEALTH = Query(
    "task_trigger_health",
    f"SELECT {_HEALTH_COLUMNS} FROM deferrun_triggers g WHERE g.id = :trigger_id",
)
#: the fleet gauges (deferrun.process.metrics): each an index range scan of one row or a
#: count of the small process table
ALERT_STATE = Query(
    "alert_state",
    """SELECT
        (SELECT {now} - g.created_at FROM deferrun_triggers g WHERE g.triggerer_id IS NULL
            ORDER BY g.id LIMIT 1),
        (SELECT {now} - t.created_at FROM deferrun_tasks t WHERE t.state = 'queued'
            ORDER BY t.state, t.created_at LIMIT 1),
        (SELECT count(*) FROM deferrun_processes WHERE role = 'triggerer'
            AND heartbeat_at >= {now} - :dead_after),
        (SELECT count(*) FROM deferrun_processes WHERE role = 'worker'
            AND heartbeat_at >= {now} - :dead_after),
        (SELECT {now} - g.created_at FROM deferrun_triggers g ORDER BY g.id LIMIT 1)""",
)
TASK_DETAIL = Query(
    "web_task_detail",
    """SELECT t.kwargs, t.execution_timeout, t.retry_delay, t.try_started_at, t.trigger_rule,
        t.next_kwargs, g.kwargs, {now} - g.created_at, g.deadline - {now}, g.watch_task_id,
        {now} - t.created_at
    FROM deferrun_tasks t LEFT JOIN deferrun_triggers g ON g.id = t.trigger_id
    WHERE t.id = :task_id""",
)
UPSTREAM = Query(
    "web_upstream",
    """SELECT u.id, u.name, u.state FROM deferrun_deps x JOIN deferrun_tasks u
    ON u.id = x.upstream_id WHERE x.task_id = :task_id ORDER BY u.created_at""",
)
DOWNSTREAM = Query(
    "web_downstream",
    """SELECT d.id, d.name, d.state FROM deferrun_deps x JOIN deferrun_tasks d
    ON d.id = x.task_id WHERE x.upstream_id = :task_id ORDER BY d.created_at""",
)
LOGS_AFTER = Query(
    "web_logs_after",
    "SELECT id, at, source, line FROM deferrun_task_logs WHERE task_id = :task_id "
    "AND id > :after ORDER BY id LIMIT :limit",
)
_FILTERS = ("state", "name", "queue")


def _page_query(filters: tuple[str, ...], first: bool) -> Query:
    """One statement per filter combination, so each one can use its own index."""
    where = [f"t.{f} = :{f}" for f in filters]
    if not first:
        where.append("(t.created_at < :c OR (t.created_at = :c AND t.id < :i))")
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    name = "web_tasks_" + "_".join(filters or ("all",)) + ("" if first else "_after")
    return Query(
        name,
        f"SELECT {TASK_INFO_COLUMNS} FROM deferrun_tasks t "
        f"LEFT JOIN deferrun_triggers g ON g.id = t.trigger_id{clause} "
        "ORDER BY t.created_at DESC, t.id DESC LIMIT :limit",
    )


_PAGES = {
    (tuple(f for f, on in zip(_FILTERS, mask, strict=True) if on), first): _page_query(
        tuple(f for f, on in zip(_FILTERS, mask, strict=True) if on), first
    )
    for mask in [(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    for first in (True, False)
}


class CleanReport(msgspec.Struct):
    """What one ``clean_finished`` did (or, dry, would do)."""

    deleted: int = 0
    batches: int = 0
    seconds: float = 0.0
    longest_batch_seconds: float = 0.0
    dry_run: bool = False


def decode_cursor(text: str) -> tuple[float, str]:
    created, sep, task_id = text.partition(":")
    try:
        if not sep:
            raise ValueError(text)
        return float(created), task_id
    except ValueError:
        raise ValueError(f"bad page cursor {text!r}; use the 'next' link of a page") from None


class Observe:
    """Status-page reads and retention; needs ``self.db`` (a Connector)."""

    db: Any

    # -- retention ------------------------------------------------------------------------

    async def clean_finished(
        self,
        older_than: float,
        states: Sequence[str] = (),
        *,
        batch_size: int = 500,
        dry_run: bool = False,
        on_batch: Callable[[int], None] | None = None,
    ) -> CleanReport:
        """Delete finished tasks that ended more than ``older_than`` seconds ago, in batches.

        Between batches it pauses as long as the last batch took (at least 20 ms), so other
        writers waiting for the database get at least half of the time.
        """
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        chosen = check_states(states)
        report = CleanReport(dry_run=dry_run)
        started = time.monotonic()
        if dry_run:
            rows = await self.db.fetch(COUNT_CANDIDATES, states=chosen, older_than=older_than)
            report.deleted = int(rows[0][0])
            report.seconds = time.monotonic() - started
            return report
        while True:
            t0 = time.monotonic()
            deleted = await self.db.transact(clean_batch(chosen, older_than, batch_size))
            took = time.monotonic() - t0
            report.batches += 1
            report.deleted += deleted
            report.longest_batch_seconds = max(report.longest_batch_seconds, took)
            if on_batch is not None:
                on_batch(deleted)
            if deleted < batch_size:
                break
            await anyio.sleep(min(max(took, 0.02), 0.5))
        report.seconds = time.monotonic() - started
        return report

    # -- status page ----------------------------------------------------------------------

    async def active_counts(self) -> dict[str, int]:
        """Tasks in each unfinished state (cheap: never scans finished history)."""
        return {r[0]: int(r[1]) for r in await self.db.fetch(ACTIVE_COUNTS)}

    async def capped_state_counts(self) -> dict[str, int]:
        """Tasks in each state, exact up to STATE_COUNT_CAP; over it, STATE_COUNT_CAP + 1.

        Bounded whatever the table's size (an index range scan of at most cap + 1 entries per
        state), unlike ``count_tasks``, which reads every row."""
        return {r[0]: int(r[1]) for r in await self.db.fetch(CAPPED_STATE_COUNTS) if r[1]}

    async def process_load(self) -> list[dict[str, Any]]:
        """Live and recently dead processes with heartbeat age, load and loop lag."""
        out = []
        for r in await self.db.fetch(PROCESSES):
            used = int(r[9]) if r[1] == "triggerer" else int(r[10])
            out.append(
                {
                    "id": r[0],
                    "role": r[1],
                    "host": r[2],
                    "pid": r[3],
                    "queues": load_or_raw(r[4]),
                    "capacity": int(r[5]),
                    "started_at": r[6],
                    "heartbeat_age": float(r[7]),
                    "loop_lag": None if r[8] is None else float(r[8]),
                    "used": used,
                }
            )
        return out

    async def oldest_triggers(self) -> dict[str, dict[str, Any] | None]:
        oldest = await self.db.fetch(OLDEST_TRIGGER)
        unclaimed = await self.db.fetch(OLDEST_UNCLAIMED)
        return {
            "oldest": _trigger_row(oldest[0]) if oldest else None,
            "oldest_unclaimed": _trigger_row(unclaimed[0]) if unclaimed else None,
        }

    async def failing_triggers(self, limit: int = 100) -> list[dict[str, Any]]:
        """Triggers whose last polls failed (oldest first): the partial index, no scan."""
        return [
            {**_trigger_row(r), **_health(r[7:10])}
            for r in await self.db.fetch(FAILING_TRIGGERS, limit=limit)
        ]

    async def trigger_health(self, trigger_id: int) -> dict[str, Any] | None:
        """The poll health of trigger ``trigger_id``; None once it is gone."""
        rows = await self.db.fetch(TASK_TRIGGER_HEALTH, trigger_id=trigger_id)
        return _health(rows[0]) if rows else None

    async def alert_state(self, dead_after: float) -> dict[str, Any]:
        """What the alert rules and the overview's banners look at: the age of the oldest
        trigger, oldest unclaimed trigger and oldest queued task (0 when none), and live
        processes by role."""
        [r] = await self.db.fetch(ALERT_STATE, dead_after=dead_after)
        return {
            "oldest_unclaimed_trigger_age": max(float(r[0] or 0.0), 0.0),
            "oldest_queued_task_age": max(float(r[1] or 0.0), 0.0),
            "live": {"triggerer": int(r[2]), "worker": int(r[3])},
            "oldest_trigger_age": max(float(r[4] or 0.0), 0.0),
        }

    async def trigger_groups(self) -> list[dict[str, Any]]:
        return [
            {
                "classpath": r[0],
                "triggerer_id": r[1],
                "count": int(r[2]),
                "oldest_age": float(r[3]),
                "newest_age": float(r[4]),
                "next_deadline_in": None if r[5] is None else float(r[5]),
            }
            for r in await self.db.fetch(TRIGGER_GROUPS)
        ]

    async def triggers_of_class(
        self, classpath: str, after: int = 0, limit: int = 100
    ) -> list[dict[str, Any]]:
        rows = await self.db.fetch(TRIGGERS_OF_CLASS, classpath=classpath, after=after, limit=limit)
        return [{**_trigger_row(r), "kwargs": load_or_raw(r[7])} for r in rows]

    async def task_page(
        self,
        *,
        state: str | None = None,
        name: str | None = None,
        queue: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[TaskInfo], str | None]:
        """Newest first; returns the page and the cursor of the next one (None at the end)."""
        given = {"state": state, "name": name, "queue": queue}
        filters = tuple(f for f in _FILTERS if given[f])
        params: dict[str, Any] = {f: given[f] for f in filters}
        if cursor:
            params["c"], params["i"] = decode_cursor(cursor)
        rows = await self.db.fetch(_PAGES[(filters, not cursor)], **params, limit=limit + 1)
        infos = [task_info(r) for r in rows[:limit]]
        if len(rows) <= limit or not infos:
            return infos, None
        last = rows[limit - 1]  # the stored time itself: a datetime would round it
        return infos, f"{float(last[16])!r}:{last[0]}"

    async def task_detail(self, task_id: str) -> dict[str, Any] | None:
        """What the task page shows beyond TaskInfo: kwargs, trigger, timeouts, neighbours."""
        rows = await self.db.fetch(TASK_DETAIL, task_id=task_id)
        if not rows:
            return None
        r = rows[0]
        up = await self.db.fetch(UPSTREAM, task_id=task_id)
        down = await self.db.fetch(DOWNSTREAM, task_id=task_id)
        return {
            "kwargs": load_or_raw(r[0]),
            "execution_timeout": r[1],
            "retry_delay": r[2],
            "try_started_at": ts(r[3]),
            "trigger_rule": r[4],
            "next_kwargs": load_or_raw(r[5]),
            "trigger_kwargs": load_or_raw(r[6]),
            "trigger_age": None if r[7] is None else float(r[7]),
            "trigger_timeout_in": None if r[8] is None else float(r[8]),
            "watch_task_id": r[9],
            "age": float(r[10]),
            "upstream": [{"id": u[0], "name": u[1], "state": u[2]} for u in up],
            "downstream": [{"id": d[0], "name": d[1], "state": d[2]} for d in down],
        }

    async def task_logs_after(
        self, task_id: str, after: int = 0, limit: int = 500
    ) -> list[dict[str, Any]]:
        """Log lines after line id ``after`` (for live polling), oldest first."""
        rows = await self.db.fetch(LOGS_AFTER, task_id=task_id, after=after, limit=limit)
        return [{"id": int(r[0]), "at": r[1], "source": r[2], "line": r[3]} for r in rows]


def _trigger_row(r: Sequence[Any]) -> dict[str, Any]:
    return {
        "id": int(r[0]),
        "task_id": r[1],
        "classpath": r[2],
        "queue": r[3],
        "triggerer_id": r[4],
        "age": float(r[5]),
        "timeout_in": None if r[6] is None else float(r[6]),
    }


__all__ = ["CleanReport", "Observe"]


def _health(r: Sequence[Any]) -> dict[str, Any]:
    return {
        "poll_failures": int(r[0] or 0),
        "last_error": r[1],
        "last_ok_at": ts(r[2]),
    }
