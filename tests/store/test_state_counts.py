"""`deferrun tasks` counts each state only up to a cap, so it stays fast on millions of rows.

Below the cap the count is exact; over it the line reads "10,000+" (and --json says which
states are over); --exact-counts counts every row. Rows are inserted in bulk SQL.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator

import anyio
import pytest
import structlog

from deferrun.cli import commands as cli
from deferrun.store import open_store
from deferrun.store.observe import STATE_COUNT_CAP


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """cli.main configures logging onto this test's captured stderr: undo it afterwards."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


SQLITE_FILL = """WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < ?)
INSERT INTO deferrun_tasks (id, name, classpath, kwargs, queue, state, max_tries,
    retry_delay, created_at, updated_at, retries)
SELECT ? || n, 'Nop', 'benchmarks.ops.Nop', '{}', 'default', ?, 1, 0,
    1700000000 + n, 1700000000 + n, 0 FROM g"""
PG_FILL = """INSERT INTO deferrun_tasks (id, name, classpath, kwargs, queue, state, max_tries,
    retry_delay, created_at, updated_at, retries)
SELECT $2 || g, 'Nop', 'benchmarks.ops.Nop', '{}', 'default', $3, 1, 0,
    1700000000 + g, 1700000000 + g, 0 FROM generate_series(1, $1) AS g"""

# over the cap by one, exactly at the cap, and a few
ROWS = {"success": STATE_COUNT_CAP + 1, "failed": STATE_COUNT_CAP, "queued": 3}


def fill(db_url: str, rows: dict[str, int] = ROWS) -> None:
    async def create() -> None:
        await (await open_store(db_url)).close()

    anyio.run(create)
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            for state, n in rows.items():
                conn.execute(SQLITE_FILL, (n, state, state))
        return

    async def pg() -> None:
        import asyncpg

        conn = await asyncpg.connect(db_url)
        try:
            for state, n in rows.items():
                await conn.execute(PG_FILL, n, state, state)
        finally:
            await conn.close()

    anyio.run(pg)


def run_tasks(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert cli.main(["tasks", "--limit", "2", *args]) == 0
    return capsys.readouterr().out


def test_counts_capped_exact_below(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    fill(db_url)
    first = run_tasks(capsys, "--db", db_url).splitlines()[0]
    assert first == (
        "tasks: queued=3, success=10000+, failed=10000 (--exact-counts to count every row)"
    ), first

    as_json = json.loads(run_tasks(capsys, "--db", db_url, "--json"))
    assert as_json["counts"] == {"queued": 3, "success": STATE_COUNT_CAP, "failed": 10000}
    assert as_json["counts_over_cap"] == ["success"] and as_json["count_cap"] == STATE_COUNT_CAP
    assert len(as_json["tasks"]) == 2

    exact = run_tasks(capsys, "--db", db_url, "--exact-counts").splitlines()[0]
    assert exact == "tasks: queued=3, success=10001, failed=10000", exact
    as_json = json.loads(run_tasks(capsys, "--db", db_url, "--json", "--exact-counts"))
    assert as_json["counts"] == ROWS and as_json["counts_over_cap"] == []


@pytest.mark.slow
def test_capped_counts_never_scan_the_table(db_url: str) -> None:
    """Each capped count is a bounded index range scan, also for states far over the cap:
    with a bare LIMIT, PostgreSQL chose a sequential scan for a common state (42 ms of the
    command at 1,000,000 rows; README, "Listing a large table")."""
    from deferrun.store.observe import CAPPED_STATE_COUNTS
    from deferrun.store.sql import PostgresDialect, SQLiteDialect

    common = {"success": 4, "failed": 4, "cancelled": 4, "deferred": 4}
    fill(db_url, {s: n * STATE_COUNT_CAP for s, n in common.items()})
    if db_url.startswith("sqlite"):
        text = SQLiteDialect().render(CAPPED_STATE_COUNTS).text
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as conn:
            conn.execute("ANALYZE")
            plan = "\n".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + text))
        assert "SCAN deferrun_tasks" not in plan and "INDEX" in plan, plan
        return

    async def pg_plan() -> str:
        import asyncpg

        conn = await asyncpg.connect(db_url)
        try:
            await conn.execute("ANALYZE deferrun_tasks")
            text = PostgresDialect().render(CAPPED_STATE_COUNTS).text
            return "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + text))
        finally:
            await conn.close()

    plan = anyio.run(pg_plan)
    assert "Seq Scan" not in plan and "Index Only Scan" in plan, plan
