"""Schema migrations on both backends: a database made by any older schema version, once a
worker or triggerer opens it, has the schema of a new database, as the database itself
reports it, and keeps its rows; starters that race on a new database migrate it once."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from deferrun.core.models import TaskState
from deferrun.exceptions import ConfigError
from deferrun.store import open_store
from deferrun.store.postgres.connector import migrate as migrate_postgres
from deferrun.store.schema import SCHEMA_VERSION, migrations
from deferrun.store.sqlite.connector import migrate as migrate_sqlite

pytestmark = pytest.mark.anyio

PACKAGES = {"sqlite": "deferrun.store.sqlite", "postgres": "deferrun.store.postgres"}
REPO = Path(__file__).resolve().parents[2]
#: where version 1's schema file was when that version was written (git history)
VERSION_1 = {
    "sqlite": ("9acd230", "deferrun/store/sqlite_schema.sql"),
    "postgres": ("50ddd8e", "deferrun/store/postgres_schema.sql"),
}


def _backend(url: str) -> str:
    return "sqlite" if url.startswith("sqlite") else "postgres"


@pytest.fixture
def new_url(db_url: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[], str]:
    """Another empty database of ``db_url``'s backend, each time it is called."""
    count = iter(range(100))
    if _backend(db_url) == "sqlite":
        return lambda: f"sqlite:///{tmp_path / f'other-{next(count)}.db'}"
    cluster = request.getfixturevalue("pg_cluster")
    return lambda: str(cluster.create_database())


# --------------------------------------------------------------------------- the schema


def _sqlite_schema(url: str) -> dict[str, Any]:
    """The schema as SQLite reports it, table by table. Stored CREATE TABLE text is left
    out: ALTER TABLE ADD COLUMN rewrites it, so equal tables may read differently."""
    conn = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        tables: dict[str, Any] = {}
        for (table,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            indexes = {
                row[1]: (row[2:], conn.execute(f"PRAGMA index_xinfo('{row[1]}')").fetchall())
                for row in conn.execute(f"PRAGMA index_list('{table}')")
            }
            tables[table] = {
                "columns": conn.execute(f"PRAGMA table_info('{table}')").fetchall(),
                "indexes": indexes,
                "foreign_keys": conn.execute(f"PRAGMA foreign_key_list('{table}')").fetchall(),
            }
        sql = {
            (kind, name): re.sub(r"\s+", " ", text).strip()
            for kind, name, text in conn.execute(
                "SELECT type, name, sql FROM sqlite_master "
                "WHERE type IN ('index', 'trigger', 'view') AND sql IS NOT NULL"
            )
        }
        return {"tables": tables, "sql": sql}
    finally:
        conn.close()


_PG_SCHEMA = {
    "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default "
    "FROM information_schema.columns WHERE table_schema = current_schema() "
    "ORDER BY table_name, ordinal_position",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes "
    "WHERE schemaname = current_schema() ORDER BY 1, 2",
    "constraints": "SELECT conrelid::regclass::text, conname, contype, "
    "pg_get_constraintdef(oid) FROM pg_constraint "
    "WHERE connamespace = current_schema()::regnamespace ORDER BY 1, 2",
    "sequences": "SELECT sequencename, data_type::text, start_value, increment_by "
    "FROM pg_sequences WHERE schemaname = current_schema() ORDER BY 1",
    "triggers": "SELECT event_object_table, trigger_name, action_timing, "
    "event_manipulation, action_statement FROM information_schema.triggers "
    "WHERE trigger_schema = current_schema() ORDER BY 1, 2, 4",
    "functions": "SELECT proname, pg_get_functiondef(oid) FROM pg_proc "
    "WHERE pronamespace = current_schema()::regnamespace ORDER BY 1",
}


async def _pg_schema(url: str) -> dict[str, Any]:
    """The schema as PostgreSQL's catalogs report it."""
    conn = await asyncpg.connect(url)
    try:
        return {key: [tuple(r) for r in await conn.fetch(q)] for key, q in _PG_SCHEMA.items()}
    finally:
        await conn.close()


async def _schema(url: str) -> dict[str, Any]:
    return _sqlite_schema(url) if _backend(url) == "sqlite" else await _pg_schema(url)


async def _version(url: str) -> int:
    if _backend(url) == "sqlite":
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT max(version) FROM deferrun_schema"))
    finally:
        await conn.close()


# --------------------------------------------------------------------------- helpers


async def _at_version(url: str, version: int) -> None:
    """Make ``url`` a database at schema ``version``, through the migrations up to it."""
    if _backend(url) == "sqlite":
        path = url.removeprefix("sqlite:///")
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            migrate_sqlite(conn, path, target=version)
        finally:
            conn.close()
    else:
        pg = await asyncpg.connect(url)
        try:
            await migrate_postgres(pg, target=version)
        finally:
            await pg.close()
    assert await _version(url) == version


async def _open(url: str) -> None:
    """What a worker or triggerer does at start: open the store (which migrates)."""
    store = await open_store(url)
    await store.close()


async def _fresh_schema(url: str) -> dict[str, Any]:
    await _open(url)
    assert await _version(url) == SCHEMA_VERSION
    return await _schema(url)


# --------------------------------------------------------------------------- the files


def test_each_backend_has_one_migration_per_version_with_the_same_names() -> None:
    files = {backend: migrations(package) for backend, package in PACKAGES.items()}
    for found in files.values():
        assert [m.version for m in found] == list(range(1, SCHEMA_VERSION + 1))
    assert [m.name for m in files["sqlite"]] == [m.name for m in files["postgres"]]
    assert files["sqlite"][0].name == "initial"


@pytest.mark.parametrize("backend", sorted(PACKAGES))
def test_migration_1_is_the_schema_version_1_created(backend: str) -> None:
    """0001 is the schema file that version 1 ran on a new database, as git holds it."""
    commit, path = VERSION_1[backend]
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{commit}:{path}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if done.returncode != 0:
        pytest.skip(f"git history without version 1 (a shallow clone?): {done.stderr.strip()}")
    assert migrations(PACKAGES[backend])[0].sql == done.stdout


# --------------------------------------------------------------------------- migrations


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
async def test_a_database_at_an_older_version_migrates_to_the_new_schema(
    db_url: str, new_url: Callable[[], str], version: int
) -> None:
    await _at_version(db_url, version)
    await _open(db_url)
    assert await _version(db_url) == SCHEMA_VERSION
    assert await _schema(db_url) == await _fresh_schema(new_url())


async def test_rows_written_at_version_1_are_kept(db_url: str, new_url: Callable[[], str]) -> None:
    """A task inserted as version 1 wrote it is read, and claimed, through today's store."""
    await _at_version(db_url, 1)
    now = time.time()
    row = ("v1-task", "old", "tests.support.userland.DeferOnce", "{}", "default", "queued")
    rest = (1, 0.0, now - 1, now - 1, now - 1)
    columns = "id, name, classpath, kwargs, queue, state, max_tries, retry_delay, "
    columns += "ready_at, created_at, updated_at"
    if _backend(db_url) == "sqlite":
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
        with conn:
            conn.execute(
                f"INSERT INTO tasks ({columns}) VALUES ({', '.join('?' * 11)})", row + rest
            )
        conn.close()
    else:
        pg = await asyncpg.connect(db_url)
        try:
            marks = ", ".join(f"${n}" for n in range(1, 12))
            await pg.execute(
                f"INSERT INTO deferrun_tasks ({columns}) VALUES ({marks})", *row, *rest
            )
        finally:
            await pg.close()
    store = await open_store(db_url)
    try:
        info = await store.get_task("v1-task")
        assert info is not None
        assert (info.name, info.classpath, info.state) == ("old", row[2], TaskState.QUEUED)
        await store.register_process("w1", "worker", ["default"], 1)
        [claimed] = await store.claim_tasks("w1", ["default"], 5)
        assert (claimed.id, claimed.try_number, claimed.claim_token) == ("v1-task", 1, 1)
        await store.append_task_logs([("v1-task", now, "worker", "x")], keep=5)  # version 2
        assert await store.load_xcoms("v1-task") == {}  # version 6
    finally:
        await store.close()
    assert await _schema(db_url) == await _fresh_schema(new_url())


async def test_starters_racing_on_a_new_database_migrate_it_once(
    db_url: str, new_url: Callable[[], str]
) -> None:
    """Four workers starting at once: each migration runs once (a second run of version 3's
    table renames would fail), and every one of them opens."""
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(_open, db_url)
    assert await _schema(db_url) == await _fresh_schema(new_url())
    if _backend(db_url) == "postgres":
        conn = await asyncpg.connect(db_url)
        try:
            rows = await conn.fetch("SELECT version FROM deferrun_schema ORDER BY version")
        finally:
            await conn.close()
        assert [r[0] for r in rows] == list(range(1, SCHEMA_VERSION + 1))


async def test_a_newer_schema_version_is_refused(db_url: str) -> None:
    await _open(db_url)
    newer = SCHEMA_VERSION + 1
    if _backend(db_url) == "sqlite":
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
        conn.execute(f"PRAGMA user_version = {newer}")
        conn.close()
    else:
        pg = await asyncpg.connect(db_url)
        try:
            await pg.execute(f"INSERT INTO deferrun_schema VALUES ({newer})")
        finally:
            await pg.close()
    with pytest.raises(ConfigError, match=f"version {newer}, newer than this deferrun"):
        await _open(db_url)
    assert await _version(db_url) == newer


# --------------------------------------------------------------------------- found by an attack


async def _execute(url: str, *statements: str) -> None:
    if _backend(url) == "sqlite":
        conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            for statement in statements:
                conn.execute(statement)
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(url)
    try:
        for statement in statements:
            await pg.execute(statement)
    finally:
        await pg.close()


async def test_a_development_build_database_without_versions_5_and_6_is_repaired(
    db_url: str, new_url: Callable[[], str]
) -> None:
    """Branch builds numbered 6 to 8 before versions 5 and 6 were merged: their databases
    lack the shared-poll columns and index and the XCom table; migrating to 9 repairs them
    (it left a triggerer failing on 'no such column: affinity')."""
    await _at_version(db_url, 8)
    await _execute(
        db_url,
        "DROP INDEX deferrun_triggers_affinity",
        "ALTER TABLE deferrun_triggers DROP COLUMN affinity",
        "ALTER TABLE deferrun_triggers DROP COLUMN poll_key",
        "DROP TABLE deferrun_xcom",
    )
    await _open(db_url)
    assert await _version(db_url) == SCHEMA_VERSION
    assert await _schema(db_url) == await _fresh_schema(new_url())


async def test_a_migration_that_cannot_apply_fails_in_one_line_and_changes_nothing(
    db_url: str,
) -> None:
    """A version-3 database of a development build with the tables' old names: one line that
    says what failed and what to do (it was a 59-line traceback)."""
    await _at_version(db_url, 3)
    if _backend(db_url) == "sqlite":  # every table unprefixed, as that build named them
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"))
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        conn.close()
        renames = [
            f"ALTER TABLE {n} RENAME TO {n.removeprefix('deferrun_')}"
            for n in names
            if n.startswith("deferrun_")
        ]
    else:
        renames = ["ALTER TABLE deferrun_tasks RENAME TO tasks"]
    await _execute(db_url, *renames)
    with pytest.raises(ConfigError, match="from version 3 to 4 failed") as failed:
        await _open(db_url)
    assert "\n" not in str(failed.value) and "new database" in str(failed.value)
    assert await _version(db_url) == 3
