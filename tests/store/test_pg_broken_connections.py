"""A pooled PostgreSQL connection whose statement broke off (cancelled, timed out, server
gone) is terminated, never handed out again mid-operation: reused, it failed the next
statement with asyncpg's ``InternalClientError('cannot switch to state 12; another
operation ... is in progress')`` during an outage (issue 24, item 7)."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import asyncpg
import pytest

from deferrun.exceptions import StoreUnavailable
from deferrun.store.postgres.connector import PostgresConnector
from deferrun.store.sql import Query

pytestmark = pytest.mark.anyio

PID = Query("test_backend_pid", "SELECT pg_backend_pid()")
SLEEP = Query("test_sleep", "SELECT pg_sleep(5)")
ALIVE = Query("test_alive", "SELECT count(*) FROM pg_stat_activity WHERE pid = :pid")
BUSY = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'"


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


async def test_a_connection_lost_mid_statement_fails_as_unavailable(pg_url: str) -> None:
    """asyncpg closes a connection the server drops mid-statement and hands it back to the
    pool itself: terminating it again raised ``InterfaceError('cannot call
    Connection.terminate(): connection has been released back to the pool')``, which hid
    the real error (issue 24: the worker's "claiming tasks failed" during an outage)."""
    connector = PostgresConnector(pg_url, pool_size=2)
    await connector.open()
    killer = await asyncpg.connect(pg_url)
    try:
        [(pid,)] = await connector.fetch(PID)

        async def kill_it() -> None:
            with anyio.fail_after(5):
                while not (await killer.fetchval(BUSY, pid)):
                    await anyio.sleep(0.02)
            await killer.execute("SELECT pg_terminate_backend($1)", pid)

        failed: BaseException | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_it)
            try:
                await connector.fetch(SLEEP)
            except Exception as exc:
                failed = exc
        assert isinstance(failed, StoreUnavailable), repr(failed)
        assert "released back to the pool" not in str(failed), failed
        assert isinstance(failed.__cause__, asyncpg.ConnectionDoesNotExistError), failed
        with anyio.fail_after(5):
            assert (await connector.fetch(PID))[0][0] != pid
    finally:
        await killer.close()
        await connector.close()


async def test_a_statement_on_a_connection_the_server_just_ended_is_unavailable(
    pg_url: str,
) -> None:
    """A server that ends a session (shutting down, or pg_terminate_backend) sends its idle
    connection a FATAL error, then closes it. asyncpg takes that unasked-for error as a
    protocol error and sees the close only a loop pass later: a statement started in between
    failed with ``InternalClientError('cannot switch to state 12; another operation (2) is
    in progress')`` (issue 24). It is an unreachable server, and the connection is not used
    again."""
    connector = PostgresConnector(pg_url, pool_size=2)
    await connector.open()
    killer = await asyncpg.connect(pg_url)
    outcome: list[BaseException | list[Any]] = []
    started: list[asyncio.Future[None]] = []
    try:
        [(pid,)] = await connector.fetch(PID)  # cached statement: next is bind/execute
        async with connector.pool.acquire() as conn:
            raw = conn._con
        assert raw.get_server_pid() == pid  # the pool's idle connection
        real = raw._transport.get_protocol()

        async def in_the_window() -> None:
            try:
                outcome.append(await connector.fetch(PID))
            except BaseException as exc:  # what it failed with is the test
                outcome.append(exc)

        class Between(asyncio.Protocol):
            """Runs a statement right after the FATAL is read, before the close is."""

            def data_received(self, data: bytes) -> None:
                real.data_received(data)
                if not outcome:
                    started.append(asyncio.ensure_future(in_the_window()))

            def eof_received(self) -> bool | None:
                return real.eof_received()  # type: ignore[no-any-return]

            def connection_lost(self, exc: Exception | None) -> None:
                real.connection_lost(exc)

        raw._transport.set_protocol(Between())
        await killer.execute("SELECT pg_terminate_backend($1)", pid)
        with anyio.fail_after(5):
            while not outcome:
                await anyio.sleep(0.01)
        [failed] = outcome
        assert isinstance(failed, StoreUnavailable), repr(failed)
        assert "state" not in str(failed) and "ended the connection" in str(failed), failed
        with anyio.fail_after(5):  # a fresh connection next time
            assert (await connector.fetch(PID))[0][0] != pid
    finally:
        await killer.close()
        await connector.close()
