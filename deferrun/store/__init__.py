"""The store room: one protocol (``base``), the task state machine written once as SQL programs
(``machine``), and one folder per backend (``sqlite/``, ``postgres/``); ``open_store(url)``
picks one by URL scheme. Internal: users reach the store through ``Client``."""

from __future__ import annotations

from deferrun.core import config
from deferrun.exceptions import ConfigError
from deferrun.store.base import ReapReport, Store, Wakeup


def make_store(
    url: str | None = None,
    *,
    dead_after: float | None = None,
    create: bool = True,
    one_shot: bool = False,
) -> Store:
    """A store for ``url`` (``--db``/``DEFERRUN_DB``/default), not yet opened.

    ``create=False`` (read-only commands) creates no database and no tables and migrates
    no older schema: a missing SQLite file, or a database without deferrun's current schema,
    is refused with one line. ``one_shot`` (a command that makes a few queries, one at a
    time, and exits) opens one plain PostgreSQL connection instead of a pool.
    """
    url = config.db_url(url)
    dead = config.dead_after() if dead_after is None else dead_after
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        from deferrun.store.sqlite.connector import SQLiteStore

        return SQLiteStore(url, dead_after=dead, create=create)
    if scheme in ("postgresql", "postgres"):
        try:
            from deferrun.store.postgres.connector import PostgresStore
        except ImportError as exc:
            raise ConfigError(f"the PostgreSQL backend could not be loaded: {exc}") from exc
        return PostgresStore(url, dead_after=dead, create=create, pool_size=1 if one_shot else 10)
    raise ConfigError(
        f"unsupported database URL {config.redact_url(url)!r}: use sqlite:///path/to/file.db "
        "(one host) or postgresql://user:password@host:5432/dbname (several hosts)"
    )


async def open_store(
    url: str | None = None,
    *,
    dead_after: float | None = None,
    create: bool = True,
    one_shot: bool = False,
) -> Store:
    store = make_store(url, dead_after=dead_after, create=create, one_shot=one_shot)
    await store.open()
    return store


__all__ = ["ReapReport", "Store", "Wakeup", "make_store", "open_store"]
