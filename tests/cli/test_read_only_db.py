"""Read-only commands on a database deferrun did not set up: another application's PostgreSQL
database or an empty SQLite file is refused with one line and left untouched, and an older
deferrun schema is not migrated by a listing (on both backends)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio
import asyncpg
import pytest

from deferrun.store import open_store
from deferrun.store.schema import SCHEMA_VERSION
from tests.support.pgcluster import free_port
from tests.support.processes import deferrun_env

pytestmark = pytest.mark.e2e

READ_ONLY = [
    ["tasks"],
    ["triggers"],
    ["task", "abc"],
    ["logs", "abc"],
    ["cancel", "abc"],
    ["db", "clean", "--older-than", "7d"],
]


def cli(*args: str, url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deferrun", *args],
        env=deferrun_env(url),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def _pg(url: str, *statements: str) -> list[str]:
    """Run ``statements``, then list the database's tables."""
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
        rows = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )
        return [r[0] for r in rows]
    finally:
        await conn.close()


def _refused(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, done
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], done.stderr


@pytest.mark.slow
def test_a_database_without_deferrun_tables_is_refused_untouched(
    db_url: str, tmp_path: Path
) -> None:
    if db_url.startswith("sqlite"):
        path = Path(db_url.removeprefix("sqlite:///"))
        path.touch()  # an empty file: what `touch` or another tool left there
        name = str(path)
    else:
        tables = anyio.run(
            _pg, db_url, "CREATE TABLE customers (id int)", "INSERT INTO customers VALUES (1)"
        )
        assert tables == ["customers"]
        name = db_url.rsplit("/", 1)[1]
    for args in [*READ_ONLY, ["web", "--port", str(free_port())]]:
        done = cli(*args, url=db_url, cwd=tmp_path)
        _refused(done, name, "no deferrun tables", "left it untouched", "start a worker")
    if db_url.startswith("sqlite"):
        assert path.stat().st_size == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no -wal / -shm
    else:
        assert anyio.run(_pg, db_url) == ["customers"]


async def _open(url: str) -> None:
    store = await open_store(url)  # what a worker or triggerer does at start
    await store.close()


async def _set_version(url: str, version: int) -> None:
    await _open(url)
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        conn.execute(f"PRAGMA user_version = {version}")
        conn.close()
    else:
        await _pg(
            url, "DELETE FROM deferrun_schema", f"INSERT INTO deferrun_schema VALUES ({version})"
        )


async def _version(url: str) -> int:
    if url.startswith("sqlite"):
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


def test_read_only_commands_do_not_migrate_an_older_schema(db_url: str, tmp_path: Path) -> None:
    old = SCHEMA_VERSION - 1
    anyio.run(_set_version, db_url, old)
    for args in (["tasks"], ["logs", "abc"]):
        done = cli(*args, url=db_url, cwd=tmp_path)
        _refused(done, f"schema version {old}", "does not migrate", "start a worker")
    assert anyio.run(_version, db_url) == old
    anyio.run(_open, db_url)  # a worker's or triggerer's open still migrates it
    assert anyio.run(_version, db_url) == SCHEMA_VERSION
    assert cli("tasks", url=db_url, cwd=tmp_path).returncode == 0


def _tasks_through(
    pg_url: str, tmp_path: Path, silences: bool, **env: str
) -> subprocess.CompletedProcess[str]:
    """``deferrun tasks`` through a proxy that, once the command reads the tasks (after the
    schema check), cuts the connection or (``silences``) swallows everything after."""
    from tests.support.loopback_proxy import LoopbackProxy

    async def init_schema() -> None:
        store = await open_store(pg_url)
        await store.close()

    anyio.run(init_schema)

    class AtTheListing(LoopbackProxy):
        def handle(self, from_client: bool, data: bytes, state: dict, server: object) -> str:
            if from_client and b"FROM deferrun_tasks" in data:
                state["hit"] = True
            if not state.get("hit"):
                return "pass"
            return "drop" if silences else "stop"

    real_port = int(pg_url.split("@127.0.0.1:")[1].split("/")[0])
    proxy = AtTheListing(real_port)
    try:
        proxied = pg_url.replace(f":{real_port}/", f":{proxy.port}/")
        return subprocess.run(
            [sys.executable, "-m", "deferrun", "tasks"],
            env={**deferrun_env(proxied), **env},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        proxy.close()


def test_a_connection_lost_mid_command_is_one_line(pg_url: str, tmp_path: Path) -> None:
    """The database drops the connection once the command reads the tasks (after the schema
    check): one line, exit 2, no traceback."""
    done = _tasks_through(pg_url, tmp_path, silences=False)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "unavailable" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_server_that_stops_answering_is_one_line(pg_url: str, tmp_path: Path) -> None:
    """The server accepts the connection and the schema check, then never answers the
    listing: the command gives up after DEFERRUN_QUERY_TIMEOUT with one line and exit 2."""
    done = _tasks_through(pg_url, tmp_path, silences=True, DEFERRUN_QUERY_TIMEOUT="2")
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not answer in time" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_odd_arguments_and_rows_are_one_line(pg_url: str, tmp_path: Path) -> None:
    """A bad --limit, a log line stored with a NaN time, and a database whose tasks table
    is gone: each one line (or shown), never a traceback."""

    async def prepare() -> str:
        from deferrun.client import AsyncClient
        from tests.support.hostile_ops import Returns

        store = await open_store(pg_url)
        try:
            task_id = await AsyncClient(store=store).submit(Returns(what="x"))
        finally:
            await store.close()
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute(
                "INSERT INTO deferrun_task_logs (task_id, at, source, line) "
                "VALUES ($1, 'NaN', 'worker', 'not json \x1b[2J')",
                task_id,
            )
        finally:
            await conn.close()
        return task_id

    task_id = anyio.run(prepare)
    done = cli("tasks", "--limit", "-1", url=pg_url, cwd=tmp_path)
    assert done.returncode == 2 and "below 1" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    done = cli("logs", task_id, url=pg_url, cwd=tmp_path)
    assert done.returncode == 0 and "nan" in done.stdout and "\x1b" not in done.stdout, done
    anyio.run(_pg, pg_url, "DROP TABLE deferrun_tasks CASCADE")
    done = cli("tasks", url=pg_url, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "refused a query" in lines[0], done
