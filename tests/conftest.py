"""Fixtures shared by every room: real stores on temp files, a throwaway PostgreSQL cluster,
real subprocesses, and servers on loopback (HTTP/job services, moto, a fake dbt Cloud)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from deferrun.store import Store, make_store
from tests.support.dbt_cloud import FakeDbtCloud
from tests.support.pgcluster import PgCluster, find_bindir, free_port
from tests.support.processes import REPO, Proc, deferrun_env, wait_until
from tests.support.services import FakeServices, Moto, start_moto

__all__ = ["REPO", "Proc", "deferrun_env", "wait_until"]  # importable from here, as before


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'deferrun.db'}"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One PostgreSQL server for the whole session; each test gets its own database."""
    bindir = find_bindir()
    if bindir is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "PostgreSQL server binaries not found; .ci/run installs the "
                "'postgresql' Debian package"
            )
        pytest.skip(
            "PostgreSQL server not installed (apt-get install postgresql) - "
            "PostgreSQL tests skipped"
        )
    cluster = PgCluster(bindir)
    cluster.init()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    return pg_cluster.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every backend the shared suite runs against."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'deferrun.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    s = make_store(db_url, dead_after=2.0)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []
    counter = iter(range(1000))

    def start(args: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(args, env, tmp_path / f"{args[0]}-{next(counter)}.log")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def services() -> Iterator[FakeServices]:
    svc = FakeServices()
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    server = start_moto(free_port())
    try:
        yield server
    finally:
        server.server.stop()


@pytest.fixture
async def aws(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Moto]:
    """The session's moto server as the ``aws_default`` connection; this loop's shared AWS
    clients are closed after the test."""
    from deferrun.connections.cache import close_loop_clients

    monkeypatch.setenv("DEFERRUN_CONN_AWS_DEFAULT", moto.uri())
    yield moto
    await close_loop_clients()


@pytest.fixture
def bucket(aws: Moto) -> str:
    """A fresh S3 bucket on the moto server."""
    import uuid

    name = f"bucket-{uuid.uuid4().hex[:10]}"
    aws.boto("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def dbt() -> Iterator[FakeDbtCloud]:
    """A fake dbt Cloud v2 API of the module's own (its runs and counters start empty)."""
    server = FakeDbtCloud()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_app_user(pg_cluster: PgCluster) -> tuple[str, str]:
    """A password-checked role: pg_hba asks it for scram-sha-256 (everyone else: trust)."""
    import anyio
    import asyncpg

    user, password = "deferrun_app", "pg-Pa55-w0rd"
    hba = pg_cluster.datadir / "pg_hba.conf"
    rules = f"host all {user} 127.0.0.1/32 scram-sha-256\n"
    hba_text = hba.read_text() if hba.exists() else ""
    if rules not in hba_text:
        hba.write_text(rules + hba_text)

    async def create() -> None:
        conn = await asyncpg.connect(pg_cluster.url())
        try:
            await conn.execute("SET password_encryption = 'scram-sha-256'")
            await conn.execute(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
        finally:
            await conn.close()

    anyio.run(create)
    pg_cluster.reload()
    return user, password


@pytest.fixture(autouse=True)
def _no_leftover_log_handler() -> Iterator[None]:
    """A test that runs ``cli.main`` in-process installs deferrun's root log handler on that
    test's captured stderr; later records (aiohttp's "Unclosed client session" at exit) would
    be written to a closed stream."""
    import logging

    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__name__ == "_StdlibHandler":
            root.removeHandler(handler)
