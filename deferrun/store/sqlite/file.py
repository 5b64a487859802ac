"""The SQLite file itself: what to open, whether it is ours, and whether it is still there.

Kept apart from the SQL of :mod:`deferrun.store.sqlite.connector`. A database file is inspected
read-only before anything writes to it (another application's file is refused untouched, not
switched to WAL); read-only commands never create one; and a file deleted or replaced under a
running process stops it with a clear error instead of letting it write on to an unlinked
inode that no other process sees.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
from urllib.parse import quote

from deferrun.exceptions import ConfigError, StoreGone, StoreUnavailable

# Columns every deferrun schema version has had in these tables (named without the deferrun_
# prefix before version 3); a file whose tables lack them belongs to someone else.
_OUR_TABLES = {
    "tasks": {"id", "classpath", "kwargs", "queue", "state", "next_method", "trigger_id"},
    "processes": {"id", "role", "heartbeat_at", "wake_port"},
}
_PREFIX = "deferrun_"
CHECK_INTERVAL = 1.0


class DatabaseFileGone(StoreGone):
    """The database file was deleted or replaced while this process had it open (fatal)."""


def _uri(path: str, mode: str) -> str:
    return f"file:{quote(os.path.abspath(path))}?mode={mode}"


def inspect_file(path: str) -> None:
    """Refuse, before any write, a file that is not an (empty or) deferrun SQLite database.

    Opens read-only and runs no PRAGMA that writes, so a refused file is left as it was.
    """
    if os.path.getsize(path) == 0:
        return
    try:
        conn = sqlite3.connect(_uri(path, "ro"), uri=True, timeout=30.0)
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot open SQLite database {path!r}: {exc}") from None
    try:
        tables = {
            name: {r[1] for r in conn.execute(f"PRAGMA table_info('{name}')")}
            for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if isinstance(name, str) and name.isidentifier()
        }
    except sqlite3.DatabaseError as exc:
        raise ConfigError(
            f"{path!r} is not an SQLite database ({exc}); deferrun left it untouched - "
            "point --db at a deferrun database or a new file"
        ) from None
    finally:
        conn.close()
    if not tables:
        return
    prefix = _PREFIX if _PREFIX + "tasks" in tables else ""
    missing = [t for t, cols in _OUR_TABLES.items() if not cols <= tables.get(prefix + t, set())]
    if missing:
        shown = ", ".join(sorted(tables)[:6])
        raise ConfigError(
            f"{path!r} is an SQLite database of another application (tables: {shown}), not a "
            "deferrun database; deferrun left it untouched - point --db at a new file"
        )


def connect(path: str, *, create: bool) -> tuple[sqlite3.Connection, FileGuard]:
    """Open ``path`` for the store: checked first, created only when ``create``."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConfigError(f"cannot open {path}: directory {directory} does not exist")
    if os.path.exists(path):
        inspect_file(path)
    elif not create:
        raise ConfigError(
            f"no deferrun database at {os.path.abspath(path)}; check --db or DEFERRUN_DB "
            "(this command only reads, so it does not create one)"
        )
    conn = sqlite3.connect(
        _uri(path, "rwc" if create else "rw"),
        uri=True,
        isolation_level=None,
        check_same_thread=False,
        timeout=30.0,
    )
    return conn, FileGuard(path)


class FileGuard:
    """Remembers which file (st_dev, st_ino) was opened; ``check()`` stats it at most once a
    second and fails for good once it was deleted or replaced."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        st = os.stat(self.path)
        self.identity = (st.st_dev, st.st_ino)
        self.fatal: DatabaseFileGone | None = None
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def check(self, *, force: bool = False) -> None:
        if self.fatal is not None:
            raise self.fatal
        now = time.monotonic()
        if not force and now - self._checked < CHECK_INTERVAL:
            return
        with self._lock:
            self._checked = now
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self.fatal = DatabaseFileGone(
                    f"the database file {self.path} was deleted while this process was using "
                    "it; stopping so that nothing is written to a file no one else sees - "
                    "restore it or restart with a new --db"
                )
                raise self.fatal from None
            if (st.st_dev, st.st_ino) != self.identity:
                self.fatal = DatabaseFileGone(
                    f"the database file {self.path} was replaced by another file while this "
                    "process was using it; stopping - restart to use the new file"
                )
                raise self.fatal


def is_disk_full(exc: BaseException) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)


def after_disk_full(conn: sqlite3.Connection, exc: BaseException) -> StoreUnavailable:
    """What callers see for a write that failed on a full disk, with the WAL made reusable.

    A full disk leaves the transaction rolled back and the WAL possibly grown; a passive
    checkpoint lets the next write reuse the WAL once space is freed. The error becomes
    StoreUnavailable (worth retrying) instead of a bare OperationalError.
    """
    if not conn.in_transaction:
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as checkpoint_exc:
            exc.add_note(f"WAL checkpoint after the error failed too: {checkpoint_exc}")
    unavailable = StoreUnavailable(
        f"the disk holding the SQLite database is full ({exc}); free some space: "
        "writes resume as soon as there is room"
    )
    unavailable.__cause__ = exc
    return unavailable


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back if SQLite has not already (it does by itself on SQLITE_FULL)."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def wake_secret(conn: sqlite3.Connection) -> bytes:
    """This database's wake-up secret (created once): datagrams without it are ignored."""
    select = "SELECT value FROM deferrun_meta WHERE key = 'wake_secret'"
    try:
        row = conn.execute(select).fetchone()
    except sqlite3.OperationalError:  # a version-3 file from before the meta table
        row = None
    if row is None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS deferrun_meta "
                "(key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            conn.execute(
                "INSERT OR IGNORE INTO deferrun_meta (key, value) VALUES ('wake_secret', ?)",
                (secrets.token_hex(16),),
            )
            row = conn.execute(
                "SELECT value FROM deferrun_meta WHERE key = 'wake_secret'"
            ).fetchone()
        except BaseException:
            rollback(conn)
            raise
        conn.execute("COMMIT")
    return str(row[0]).encode("ascii")
