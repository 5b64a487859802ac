"""The embedded backend: one SQLite file in WAL mode, shared by processes on one host.

Every transaction is ``BEGIN IMMEDIATE``, which takes SQLite's single write lock up front;
that serializes claims across processes the way ``SKIP LOCKED`` does on PostgreSQL and rules
out the lock-upgrade deadlocks of deferred transactions. A whole transaction runs on the
store's own database thread in one hop, so the event loop never waits on disk and no other
code (an operator's thread, a to_thread call) ever shares that thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import msgspec

from deferrun.exceptions import ConfigError, StoreUnavailable
from deferrun.store.base import Channel, Wakeup, is_connection_error
from deferrun.store.manager import SqlStore
from deferrun.store.schema import SCHEMA_VERSION, migration_failed, migrations
from deferrun.store.sql import Program, Query, Row, Run, SQLiteDialect, drive_sync
from deferrun.store.sqlite import file as sqlite_file
from deferrun.store.sqlite.notify import UdpListener, UdpSender

R = TypeVar("R")

#: sqlite3 errors that say "not now" rather than "this statement is wrong"
_UNAVAILABLE = ("locked", "busy", "disk i/o error", "disk is full", "unable to open")
_PORTS = (
    "SELECT role, wake_port FROM deferrun_processes WHERE wake_port IS NOT NULL "
    "AND heartbeat_at >= ?"
)
_NEWEST = "SELECT max(started_at) FROM deferrun_processes"
#: PostgreSQL's ``ADD COLUMN IF NOT EXISTS``, which SQLite lacks: migrate() gives it that meaning
_ADD_COLUMN = re.compile(
    r"\s*ALTER\s+TABLE\s+(\w+)\s+ADD\s+COLUMN\s+IF\s+NOT\s+EXISTS\s+(\w+)\s+(.*?);?\s*",
    re.IGNORECASE | re.DOTALL,
)


def parse_sqlite_url(url: str) -> str:
    """``sqlite:///relative.db`` or ``sqlite:////absolute/path.db`` -> a file path."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise ConfigError(
            f"SQLite URLs look like sqlite:///deferrun.db (relative) or sqlite:////var/lib/x.db "
            f"(absolute), not {url!r}"
        )
    path = url[len(prefix) :]
    if not path or path == ":memory:":
        raise ConfigError(
            "an in-memory or empty SQLite path cannot be shared between the worker and the "
            "triggerer; give a file, e.g. sqlite:///deferrun.db"
        )
    return path


def _bind(params: Any) -> Any:
    """sqlite3 takes scalars only: list parameters travel as JSON (read by json_each)."""
    return {
        k: msgspec.json.encode(v).decode() if isinstance(v, list | tuple) else v
        for k, v in params.items()
    }


class SQLiteConnector:
    dialect = SQLiteDialect()
    reliable_wakeups = False  # UDP datagrams may be dropped: keep polling every second

    def __init__(self, url: str, *, dead_after: float = 10.0, create: bool = True) -> None:
        self.url = url
        self.path = parse_sqlite_url(url)
        self.dead_after = dead_after
        self.create = create  # False for read-only commands: a missing file is an error
        self._conn: sqlite3.Connection | None = None
        self._guard: sqlite_file.FileGuard | None = None
        self._secret = b""
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite")
        self._sender: UdpSender | None = None
        self._listeners: dict[str, UdpListener] = {}
        self._ports: dict[Channel, list[int]] = {"tasks": [], "triggers": []}
        self._ports_at = 0.0
        self._ports_newest: float | None = None

    # -- plumbing -----------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., R], *args: Any) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, fn, *args)

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("store is not open; call await store.open() first")
        return self._conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        c = self.conn
        if self._guard is not None:
            self._guard.check()  # never write on to a deleted or replaced file
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            sqlite_file.rollback(c)
            raise
        c.execute("COMMIT")

    def _execute(self, step: Run) -> list[Row]:
        text = self.dialect.render(step.query).text
        now = time.time()
        if step.each:
            out: list[Row] = []
            for p in step.params:  # type: ignore[union-attr]
                out += self.conn.execute(text, dict(_bind(p), now_=now)).fetchall()
            return out
        if step.query.many:
            items = [dict(_bind(p), now_=now) for p in step.params]  # type: ignore[union-attr]
            return [(self.conn.executemany(text, items).rowcount,)]
        return self.conn.execute(text, dict(_bind(step.params), now_=now)).fetchall()

    def _translate(self, exc: sqlite3.Error) -> Exception:
        if sqlite_file.is_disk_full(exc):
            return sqlite_file.after_disk_full(self.conn, exc)
        text = str(exc).lower()
        if isinstance(exc, sqlite3.OperationalError) and any(m in text for m in _UNAVAILABLE):
            return StoreUnavailable(f"SQLite database unavailable: {exc}")
        return exc

    # -- connector protocol ---------------------------------------------------------------------

    async def transact(self, program: Program[R], *, atomic: bool = True) -> R:
        # Always one BEGIN IMMEDIATE: it costs nothing extra in-process.
        def job() -> tuple[R, set[Channel]]:
            try:
                with self._tx():
                    result, channels = drive_sync(program, self._execute)
                if channels:
                    self._refresh_ports_if_stale()
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc
            return result, channels

        result, channels = await self._call(job)
        if channels and self._sender is not None:
            for channel in channels:
                self._sender.send(self._ports[channel])
        return result

    async def fetch(self, query: Query, **params: Any) -> list[Row]:
        def job() -> list[Row]:
            try:
                return self._execute(Run(query, params))
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc

        return await self._call(job)

    async def listen(self, process_id: str, channel: Channel) -> tuple[Wakeup, int | None]:
        wakeup = Wakeup()
        listener = UdpListener(wakeup, self._secret)
        self._listeners[process_id] = listener
        return wakeup, listener.port

    async def unlisten(self, process_id: str) -> None:
        listener = self._listeners.pop(process_id, None)
        if listener:
            listener.close()

    async def upkeep(self) -> None:
        await self._call(self._refresh_ports)

    def _refresh_ports_if_stale(self) -> None:
        """Also refresh when a process registered since: it must not miss its first second."""
        newest = self.conn.execute(_NEWEST).fetchone()[0]
        if time.time() - self._ports_at > 1.0 or newest != self._ports_newest:
            self._refresh_ports()
            self._ports_newest = newest

    def _refresh_ports(self) -> None:
        now = time.time()
        ports: dict[Channel, list[int]] = {"tasks": [], "triggers": []}
        for role, port in self.conn.execute(_PORTS, (now - self.dead_after,)):
            ports["triggers" if role == "triggerer" else "tasks"].append(port)
        self._ports, self._ports_at = ports, now

    # -- lifecycle and schema -------------------------------------------------------------------

    async def open(self) -> None:
        await self._call(self._connect)
        self._secret = await self._call(sqlite_file.wake_secret, self.conn)
        self._sender = UdpSender(self._secret)

    async def close(self) -> None:
        for process_id in list(self._listeners):
            await self.unlisten(process_id)
        if self._sender:
            self._sender.close()
            self._sender = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await self._call(conn.close)
            except RuntimeError as exc:
                if "shutdown" not in str(exc):
                    raise
                # only ever at interpreter exit (a client left open is closed then, after the
                # executors stopped taking work): the exit closes the file, and SQLite's WAL
                # keeps every committed transaction, so there is nothing to report
                pass
        self._thread.shutdown(wait=False)

    def _connect(self) -> None:
        try:
            conn, self._guard = sqlite_file.connect(self.path, create=self.create)
            conn.execute("PRAGMA busy_timeout = 30000")
            if not self.create:  # before WAL: a refused file is left as it was
                self._check_schema(conn)
            mode = self._enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        if str(mode).lower() != "wal":
            raise ConfigError(
                f"{self.path!r} could not switch to WAL mode (got {mode}); is it on "
                "a network file system? Use a local disk or PostgreSQL"
            )
        self._conn = conn
        migrate(conn, self.path)

    @staticmethod
    def _enable_wal(conn: sqlite3.Connection) -> str:
        """Switch to WAL, waiting out other processes doing the same on a new file.

        The switch needs an exclusive lock and SQLite does not call the busy handler for it,
        so processes starting together on a fresh database must retry by hand.
        """
        delay = 0.01
        deadline = time.monotonic() + 30.0
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.25)

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        """For read-only commands: an empty file is not created into a database, and an older
        schema is not migrated (that is a worker's or triggerer's job, not a listing's)."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            conn.close()
            raise ConfigError(
                f"{self.path} has no deferrun tables; deferrun left it untouched - point --db at "
                "deferrun's database, or start a worker or triggerer once to create them"
            )
        if 0 < version < SCHEMA_VERSION:
            conn.close()
            raise ConfigError(
                f"{self.path} has deferrun schema version {version}, older than this deferrun's "
                f"({SCHEMA_VERSION}); this command only reads, so it does not migrate it - start "
                "a worker or triggerer of this version once to migrate it, or use the older "
                "deferrun"
            )


def migrate(conn: sqlite3.Connection, where: str, *, target: int = SCHEMA_VERSION) -> None:
    """Bring the database up to schema ``target`` through the numbered migrations.

    One ``BEGIN IMMEDIATE`` transaction per migration, which reads the version first:
    processes starting together on one file take turns, and each migration runs once.
    """
    more = True
    while more:
        conn.execute("BEGIN IMMEDIATE")
        try:
            more = _migrate_once(conn, where, target)
        except BaseException:
            sqlite_file.rollback(conn)
            raise
        conn.execute("COMMIT")


def _migrate_once(conn: sqlite3.Connection, where: str, target: int) -> bool:
    """Apply the migration after the database's version, if that is below ``target``."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"{where} has schema version {version}, newer than this deferrun "
            f"understands ({SCHEMA_VERSION}); upgrade deferrun"
        )
    if version >= target:
        return False
    migration = migrations("deferrun.store.sqlite")[version]
    try:
        for statement in _statements(migration.sql):
            add = _ADD_COLUMN.fullmatch(statement)
            if add:  # a column an older release already added is left as it is
                table, column, kind = add.groups()
                if column in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
                    continue
                statement = f"ALTER TABLE {table} ADD COLUMN {column} {kind}"
            conn.execute(statement)
    except sqlite3.OperationalError as exc:
        if is_connection_error(exc):
            raise  # locked, busy or a full disk: worth retrying, not a broken database
        raise ConfigError(migration_failed(where, version, exc)) from exc
    conn.execute(f"PRAGMA user_version = {migration.version}")
    return True


def _statements(sql: str) -> Iterator[str]:
    """A migration file's statements, one at a time (whole-line comments left out)."""
    pending = ""
    for line in sql.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending
            pending = ""
    if pending.strip():
        yield pending


class SQLiteStore(SqlStore):
    def __init__(self, url: str, *, dead_after: float = 10.0, create: bool = True) -> None:
        self.connector = SQLiteConnector(url, dead_after=dead_after, create=create)
        super().__init__(self.connector, dead_after=dead_after)
        self.path = self.connector.path
