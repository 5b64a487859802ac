"""The worker's claim and next-due reads read only runnable rows on SQLite.

SQLite uses a partial index only for a WHERE term written exactly as the index's own; with
the state list in another order the claim walked the (queue, created_at) listing index instead,
reading and sorting every row of the queue at each claim (measured 22 ms per claim at 15,000
rows, 1.4 ms through the runnable index).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from deferrun.store import machine, open_store
from deferrun.store.manager import NEXT_DUE, NEXT_DUE_ONE
from deferrun.store.sql import Query
from deferrun.store.sqlite import SQLiteConnector


@pytest.mark.anyio
@pytest.mark.parametrize(
    "query",
    [machine.CLAIM_ONE_QUEUE, machine.CLAIM_QUEUES, NEXT_DUE_ONE, NEXT_DUE],
    ids=lambda q: q.name,
)
async def test_claims_use_the_runnable_index(tmp_path: Path, query: Query) -> None:
    path = tmp_path / "plans.db"
    store = await open_store(f"sqlite:///{path}")
    await store.close()
    text = SQLiteConnector.dialect.render(query).text
    params = {"worker_id": "w", "queue": "default", "queues": '["default", "other"]'}
    with sqlite3.connect(path) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN " + text, {**params, "limit": 8, "now_": 1.0}
        ).fetchall()
    details = " | ".join(str(row[-1]) for row in plan)
    # one queue: the runnable index, in ready_at order; several: an index on state (only the
    # runnable rows are read). Never every row of a queue, nor the whole table.
    if query in (machine.CLAIM_ONE_QUEUE, NEXT_DUE_ONE):
        assert "deferrun_tasks_runnable" in details, details
    assert "queue_created" not in details and "SCAN deferrun_tasks" not in details, details
