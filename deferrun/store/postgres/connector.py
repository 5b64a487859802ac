"""The PostgreSQL backend (asyncpg), for workers and triggerers on several hosts.

Claims use ``FOR UPDATE SKIP LOCKED`` so concurrent claimers never wait on or double-take a
row; wake-ups use LISTEN/NOTIFY, sent inside the transaction that makes work available so a
notification is delivered exactly when the work is visible. Every time comes from the
server's clock, so hosts with skewed clocks still agree. The listening connection is
re-established at each heartbeat after the server restarts or the connection drops, and
pinged every ``ping_every`` seconds: a connection dropped silently on the way (a NAT or
firewall idle timeout sends no FIN or RST) would otherwise leave a 15 s idle poll deaf.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import asyncpg
import structlog

from deferrun.core import config
from deferrun.exceptions import ConfigError, StoreUnavailable
from deferrun.store.base import Channel, Wakeup, is_connection_error
from deferrun.store.manager import SqlStore
from deferrun.store.schema import SCHEMA_VERSION, migration_failed, migrations
from deferrun.store.sql import Notify, PostgresDialect, Program, Query, Row, Run

log = structlog.get_logger("deferrun.store.postgres")

MIGRATION_LOCK = 0x64656672  # "defr": one advisory lock id for schema changes
CHANNELS: dict[str, str] = {"tasks": "deferrun_tasks", "triggers": "deferrun_triggers"}
R = TypeVar("R")


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset-on-release round trip (UNLISTEN *, RESET ALL, ...).

    Pooled connections hold no session state here: LISTEN lives on its own connection and
    the only advisory lock is transaction-scoped. Measured: 8 % of a deferring worker's CPU.
    """


def _broken(exc: BaseException) -> bool:
    """The operation on a connection ended without its reply: the connection's protocol
    state is unknown, so it must not be used again."""
    if isinstance(exc, ValueError):  # asyncpg's DataError: a bad argument, nothing sent
        return False
    return isinstance(
        exc,
        asyncio.CancelledError
        | asyncpg.InternalClientError
        | asyncpg.InterfaceError
        | asyncpg.PostgresConnectionError
        | asyncpg.exceptions.OperatorInterventionError
        | OSError
        | TimeoutError,
    )


_ENDED_WHILE_IDLE = (
    "PostgreSQL ended the connection while it was idle (the server is shutting down, or the "
    "session was terminated); a new connection is used next time"
)


def _discard(conn: Any) -> None:
    """Close a pooled connection now, whatever its protocol state; the pool opens a fresh one.

    A connection the server dropped mid-statement has already been closed by asyncpg and its
    proxy released back to the pool (``Connection._cleanup``): calling ``terminate()`` on that
    proxy raised ``InterfaceError('cannot call Connection.terminate(): connection has been
    released back to the pool')``, which replaced the statement's own error. Nothing is left to
    close then; otherwise the underlying connection is aborted.
    """
    raw = conn._con if isinstance(conn, asyncpg.pool.PoolConnectionProxy) else conn
    if raw is not None:
        raw.terminate()


class _QuietPoolLog(logging.Filter):
    """asyncpg's pool logs a warning with a traceback each time it fails to reopen a
    connection during an outage; the process says that once itself (liveness.Outage)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not is_connection_error(exc)


logging.getLogger("asyncpg.pool").addFilter(_QuietPoolLog())


class _OneConnection:
    """A one-shot command's single plain connection, behind the pool methods used here.

    ``deferrun tasks`` and the other short commands make one query at a time; a pool's set-up
    and graceful close cost them ~2 ms more than one connection (measured on loopback).
    """

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._lock:
            yield self._conn

    async def close(self) -> None:
        await self._conn.close()

    def terminate(self) -> None:
        self._conn.terminate()


class PostgresConnector:
    dialect = PostgresDialect()
    #: LISTEN/NOTIFY reaches every listener, on a connection that catches up after a loss
    reliable_wakeups = True
    concurrent_writes = True  # row locks, SKIP LOCKED: writers do not wait on one lock
    #: seconds between pings of the LISTEN connection, and how long one may take
    ping_every = 10.0
    ping_timeout = 2.0

    def __init__(self, url: str, *, pool_size: int = 10, create: bool = True) -> None:
        self.url = url
        self.pool_size = pool_size  # 1: one plain connection, for one-shot commands
        self.create = create  # False for read-only commands: no tables created, none migrated
        self._pool: Any = None  # asyncpg.Pool, or _OneConnection when pool_size is 1
        self._listener: asyncpg.Connection | None = None
        self._pinged = 0.0
        self._replacing: asyncio.Future[None] | None = None
        self._wakeups: dict[str, tuple[Channel, Wakeup]] = {}

    @property
    def pool(self) -> Any:
        if self._pool is None:
            raise RuntimeError("store is not open; call await store.open() first")
        return self._pool

    # -- connector protocol ---------------------------------------------------------------------

    async def _execute(self, conn: asyncpg.Connection, step: Run) -> list[Row]:
        rendered = self.dialect.render(step.query)
        if step.each:
            each = [rendered.args(p) for p in step.params]  # type: ignore[arg-type]
            return list(await conn.fetchmany(rendered.text, each)) if each else []
        if rendered.many:
            items = [rendered.args(p) for p in step.params]  # type: ignore[arg-type]
            if not items:
                return [(0,)]
            return [(len(await conn.fetchmany(rendered.text, items)),)]
        return list(await conn.fetch(rendered.text, *rendered.args(step.params)))  # type: ignore[arg-type]

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection that is never reused after its operation broke off.

        A statement interrupted by a lost server, a timeout or a cancellation can leave the
        connection's protocol mid-operation (its reply never came) while the socket is still
        open; back in the pool, the next statement on it failed with asyncpg's
        ``InternalClientError('cannot switch to state 12; another operation (N) is in
        progress')`` (12: bind/execute) instead of a clean connection error. Terminated here,
        the pool opens a fresh one next time.

        That error had a second source, outside this process: a server shutting down (``pg_ctl
        stop -m fast``, or a terminated session) sends each idle connection a FATAL error and
        closes it. asyncpg takes an error that no statement asked for as its own protocol error
        (state 2, "error consume") and only sees the connection closed once its end of file is
        read, an event-loop pass or two later; a statement started in between (a claim woken
        at that moment) failed with ``another operation (2) is in progress``, nothing sent. The
        connection is dead, so that is an unreachable server (``StoreUnavailable``, one quiet
        outage line), and the connection is discarded.
        """
        async with self.pool.acquire() as conn:
            try:
                yield conn
            except asyncpg.InternalClientError as exc:
                _discard(conn)
                raise StoreUnavailable(_ENDED_WHILE_IDLE) from exc
            except BaseException as exc:
                if _broken(exc):
                    _discard(conn)
                raise

    async def transact(self, program: Program[R], *, atomic: bool = True) -> R:
        try:
            async with self._connection() as conn:
                if not atomic:  # each statement commits on its own: no BEGIN/COMMIT trips
                    return await self._drive(conn, program)
                async with conn.transaction():
                    return await self._drive(conn, program)
        except Exception as exc:
            # one list for the whole runtime of what means "the server or the connection
            # is gone": anything else is the statement's own error and propagates as is
            if isinstance(exc, StoreUnavailable) or not is_connection_error(exc):
                raise
            raise StoreUnavailable(f"PostgreSQL unavailable: {exc!r}") from exc

    async def _drive(self, conn: asyncpg.Connection, program: Program[R]) -> R:
        """Run ``program``'s steps, then NOTIFY (inside the transaction when there is one)."""
        rows: list[Row] | None = None
        channels: list[str] = []
        try:
            while True:
                step = program.send(rows)  # type: ignore[arg-type]
                if isinstance(step, Notify):
                    # one NOTIFY statement per program, after its last statement: inside a
                    # transaction it is delivered at COMMIT either way (a group of outcomes
                    # made one per deferral)
                    channels += [CHANNELS[c] for c in step.channels if CHANNELS[c] not in channels]
                    rows = []
                else:
                    rows = await self._execute(conn, step)
        except StopIteration as done:
            await self._notify(conn, channels)
            return done.value  # type: ignore[no-any-return]

    @staticmethod
    async def _notify(conn: asyncpg.Connection, channels: list[str]) -> None:
        if channels:
            await conn.execute(";".join(f"SELECT pg_notify('{c}', '')" for c in channels))

    async def fetch(self, query: Query, **params: Any) -> list[Row]:
        try:
            async with self._connection() as conn:
                return await self._execute(conn, Run(query, params))
        except Exception as exc:
            # one list for the whole runtime of what means "the server or the connection
            # is gone": anything else is the statement's own error and propagates as is
            if isinstance(exc, StoreUnavailable) or not is_connection_error(exc):
                raise
            raise StoreUnavailable(f"PostgreSQL unavailable: {exc!r}") from exc

    async def listen(self, process_id: str, channel: Channel) -> tuple[Wakeup, int | None]:
        wakeup = Wakeup()
        self._wakeups[process_id] = (channel, wakeup)
        if self._listener is not None and not self._listener.is_closed():
            await self._listener.add_listener(CHANNELS[channel], self._on_notification)
        return wakeup, None

    async def unlisten(self, process_id: str) -> None:
        self._wakeups.pop(process_id, None)

    async def upkeep(self) -> None:
        """Keep the LISTEN connection alive; called at every heartbeat.

        The first connection is made here, before anything waits on a wake-up. A replacement
        is made in the background, bounded in time, so a new connection that hangs (its path
        silent too) never holds up the heartbeat that called this: a process whose heartbeat
        stops would be declared dead while it still runs its work.
        """
        if self._replacing is not None and not self._replacing.done():
            return
        if self._listener is None:
            await self._replace()
            return
        alive = not self._listener.is_closed()
        if alive and time.monotonic() - self._pinged < self.ping_every:
            return
        self._replacing = asyncio.ensure_future(self._check_listener(alive))

    async def _check_listener(self, alive: bool) -> None:
        """Ping the LISTEN connection and replace it if it does not answer (in the background:
        neither the ping nor a new connection may hold up a heartbeat)."""
        if alive and await self._ping():
            return
        if not alive:
            log.info("LISTEN connection was lost; reconnecting")
        try:
            await self._replace()
        except Exception as exc:  # the next heartbeat tries again; wake-ups fall back to polls
            # unreachable: the heartbeat's outage line says so once (not one per heartbeat)
            (log.debug if is_connection_error(exc) else log.warning)(
                "could not re-establish the LISTEN connection; retrying at the next heartbeat",
                error=repr(exc),
            )

    async def _replace(self) -> None:
        limit = config.connect_timeout() + self.ping_timeout
        conn = await asyncpg.connect(self.url, timeout=config.connect_timeout())
        try:
            conn.add_termination_listener(self._on_listener_lost)
            async with asyncio.timeout(limit):
                for channel in {c for c, _ in self._wakeups.values()}:
                    await conn.add_listener(CHANNELS[channel], self._on_notification)
        except BaseException:
            conn.terminate()
            raise
        self._pinged = time.monotonic()
        self._listener = conn
        self._on_listener_lost(conn)  # catch up on anything missed

    async def _ping(self) -> bool:
        """True if the LISTEN connection answers; else it is dropped, to be replaced."""
        assert self._listener is not None
        self._pinged = time.monotonic()
        try:
            await self._listener.fetchval("SELECT 1", timeout=self.ping_timeout)
            return True
        except Exception as exc:
            log.warning(
                "the LISTEN connection did not answer a ping; replacing it", error=repr(exc)
            )
            self._listener.terminate()
            return False

    def _on_notification(self, _conn: Any, _pid: int, channel: str, _payload: str) -> None:
        for wanted, wakeup in self._wakeups.values():
            if CHANNELS[wanted] == channel:
                wakeup.set()

    def _on_listener_lost(self, _conn: Any) -> None:
        # Wake every loop: whatever was notified while we were deaf gets claimed by a poll.
        for _, wakeup in self._wakeups.values():
            wakeup.set()

    # -- lifecycle and schema -------------------------------------------------------------------

    async def open(self) -> None:
        safe = config.redact_url(self.url)
        try:
            if self.pool_size == 1:
                self._pool = _OneConnection(
                    await asyncpg.connect(
                        self.url,
                        command_timeout=config.query_timeout(),
                        timeout=config.connect_timeout(),
                    )
                )
            else:
                self._pool = await asyncpg.create_pool(
                    self.url,
                    min_size=1,
                    max_size=self.pool_size,
                    command_timeout=config.query_timeout(),
                    timeout=config.connect_timeout(),
                    reset=_no_reset,
                )
        except (OSError, TimeoutError, asyncpg.PostgresError, ValueError, OverflowError) as exc:
            reason = config.scrub(str(exc) or type(exc).__name__, self.url)
            if isinstance(exc, TimeoutError):
                reason = (
                    f"the server did not answer within {config.connect_timeout():g}s "
                    "(DEFERRUN_CONNECT_TIMEOUT); is it a PostgreSQL server, and is it up?"
                )
            raise ConfigError(f"cannot connect to {safe}: {reason}") from exc
        try:
            await (self._migrate() if self.create else self._check_schema())
        except BaseException:
            pool, self._pool = self._pool, None
            pool.terminate()
            raise

    async def _check_schema(self) -> None:
        """For read-only commands: refuse, without writing anything, a database that has no
        deferrun tables (another application's) or an older schema (its migration is a
        worker's or triggerer's job, not a listing's). One statement: a missing table is its
        error, not a to_regclass() round trip first."""
        safe = config.redact_url(self.url)
        async with self.pool.acquire() as conn:
            try:
                version = await conn.fetchval("SELECT max(version) FROM deferrun_schema") or 0
            except asyncpg.UndefinedTableError as exc:
                raise ConfigError(
                    f"{safe} has no deferrun tables (another application's database, or "
                    "deferrun never ran there); deferrun left it untouched - point --db at "
                    "deferrun's database, or start a worker or triggerer once to create them"
                ) from exc
        _check_version(safe, version, create=False)

    async def _migrate(self) -> None:
        async with self.pool.acquire() as conn:
            await migrate(conn)

    async def close(self) -> None:
        if self._replacing is not None and not self._replacing.done():
            self._replacing.cancel()
        if self._listener is not None:
            listener, self._listener = self._listener, None
            try:
                await listener.close(timeout=5)
            except Exception as exc:
                log.debug("closing the listening connection failed", error=repr(exc))
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()


def _check_version(where: str, version: int, *, create: bool) -> None:
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"{where} has deferrun schema version {version}, newer than this "
            f"deferrun understands ({SCHEMA_VERSION}); upgrade deferrun"
        )
    if version < SCHEMA_VERSION and not create:
        raise ConfigError(
            f"{where} has deferrun schema version {version}, older than this deferrun's "
            f"({SCHEMA_VERSION}); this command only reads, so it does not migrate it - start a "
            "worker or triggerer of this version once to migrate it, or use the older deferrun"
        )


async def migrate(conn: asyncpg.Connection, *, target: int = SCHEMA_VERSION) -> None:
    """Bring the database up to schema ``target`` through the numbered migrations.

    One transaction per migration, each under a transaction-scoped advisory lock and reading
    the version first: of several processes starting at once, one migrates while the rest
    wait, and each migration runs once.
    """
    more = True
    while more:
        async with conn.transaction():
            more = await _migrate_once(conn, target)


async def _migrate_once(conn: asyncpg.Connection, target: int) -> bool:
    """Apply the migration after the database's version, if that is below ``target``."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
    await conn.execute("CREATE TABLE IF NOT EXISTS deferrun_schema (version integer NOT NULL)")
    version = await conn.fetchval("SELECT max(version) FROM deferrun_schema") or 0
    _check_version("the database", version, create=True)
    if version >= target:
        return False
    migration = migrations("deferrun.store.postgres")[version]
    try:
        await conn.execute(migration.sql)
    except asyncpg.PostgresError as exc:
        if is_connection_error(exc):
            raise
        raise ConfigError(migration_failed("the database", version, exc)) from exc
    await conn.execute("INSERT INTO deferrun_schema (version) VALUES ($1)", migration.version)
    return True


class PostgresStore(SqlStore):
    def __init__(
        self, url: str, *, dead_after: float = 10.0, pool_size: int = 10, create: bool = True
    ) -> None:
        self.connector = PostgresConnector(url, pool_size=pool_size, create=create)
        super().__init__(self.connector, dead_after=dead_after)
