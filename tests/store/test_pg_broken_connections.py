"""A pooled PostgreSQL connection whose statement broke off (cancelled, timed out, server
gone) is terminated, never handed out again mid-operation: reused, it failed the next
statement with asyncpg's ``InternalClientError('cannot switch to state 12; another
operation ... is in progress')`` during an outage (issue 24, item 7)."""

from __future__ import annotations

import anyio
import pytest

from deferrun.store.postgres.connector import PostgresConnector
from deferrun.store.sql import Query

pytestmark = pytest.mark.anyio

PID = Query("test_backend_pid", "SELECT pg_backend_pid()")
SLEEP = Query("test_sleep", "SELECT pg_sleep(5)")
ALIVE = Query("test_alive", "SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")


async def test_a_cancelled_statement_does_not_leave_its_connection_in_the_pool(
    pg_url: str,
) -> None:
    connector = PostgresConnector(pg_url, pool_size=1 + 1)
    await connector.open()
    try:
        [(before,)] = await connector.fetch(PID)
        with anyio.move_on_after(0.2):
            await connector.fetch(SLEEP)
        with anyio.fail_after(5):  # no wait for the cancelled statement's reply
            await connector.fetch(PID)
        # its connection was closed, not put back in the pool for the next statement
        with anyio.fail_after(5):
            while (await connector.fetch(ALIVE, pid=before))[0][0]:
                await anyio.sleep(0.05)
    finally:
        await connector.close()
