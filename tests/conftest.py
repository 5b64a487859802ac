"""Shared fixtures: real stores on temp files, an in-process runtime, and real subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pgcluster import PgCluster, find_bindir, free_port
from services import FakeServices, Moto, start_moto

from deferrun.store import Store, make_store

TESTS_DIR = Path(__file__).parent
REPO = TESTS_DIR.parent


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


# --------------------------------------------------------------------------- subprocesses


def deferrun_env(db_url: str, pythonpath: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DEFERRUN_DB"] = db_url
    env["DEFERRUN_DEAD_AFTER"] = extra.pop("dead_after", "3")
    paths = [str(REPO)]
    if pythonpath is not None:
        paths.insert(0, str(pythonpath))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Proc:
    """A real ``deferrun`` subprocess, its output captured to a file for post-mortems."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "deferrun", *args, "--log-format", "json"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=log_path.parent,
        )

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


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


def wait_until(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.1, message: str = "condition"
) -> Any:
    """Poll ``predicate`` (bounded in time and count) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 2):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


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
