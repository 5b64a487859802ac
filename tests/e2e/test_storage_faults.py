"""Storage faults: the database file deleted or replaced under a running process, read-only
commands on a mistyped path, another application's file, a full disk, and a PostgreSQL server
that accepts connections but never answers."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from deferrun.client import AsyncClient
from deferrun.exceptions import ConfigError, StoreUnavailable
from deferrun.store import open_store
from tests.support.processes import Proc, deferrun_env, wait_until

pytestmark = pytest.mark.e2e


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deferrun", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


async def _create(url: str) -> None:
    store = await open_store(url)
    await store.close()


def _started(proc: Proc, role: str) -> bool:
    return f"{role} started" in proc.output()


# --------------------------------------------------------------------------- file identity


@pytest.mark.slow
@pytest.mark.parametrize(("role", "how"), [("worker", "deleted"), ("triggerer", "replaced")])
def test_database_file_deleted_or_replaced_stops_the_process(
    tmp_path: Path, procs: Callable[..., Proc], role: str, how: str
) -> None:
    path = tmp_path / "deferrun.db"
    url = f"sqlite:///{path}"
    proc = procs([role], deferrun_env(url))
    wait_until(lambda: _started(proc, role), 20, message=f"{role} started")
    if how == "deleted":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    else:
        other = tmp_path / "other.db"
        anyio.run(_create, f"sqlite:///{other}")
        os.replace(other, path)
    started = time.monotonic()
    returncode = wait_until(lambda: proc.popen.poll(), 15, message=f"{role} to stop")
    elapsed = time.monotonic() - started
    out = proc.output()
    assert returncode == 2, out
    lines = _error_lines(out)
    assert len(lines) == 1 and f"was {how}" in lines[0], out
    assert "Traceback" not in out
    assert elapsed < 10, f"took {elapsed:.1f}s to notice"
    if how == "deleted":
        assert not path.exists(), "the process re-created the deleted database"


# --------------------------------------------------------------------------- read-only commands


@pytest.mark.parametrize(
    "args", [["tasks"], ["task", "abc"], ["logs", "abc"], ["triggers"]], ids=lambda a: a[0]
)
def test_read_only_commands_never_create_a_database(tmp_path: Path, args: list[str]) -> None:
    path = tmp_path / "mistyped.db"
    done = cli(*args, env=deferrun_env(f"sqlite:///{path}"), cwd=tmp_path)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no deferrun database at" in lines[0], done.stderr
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- foreign files


def _snapshot(path: Path) -> tuple[bytes, int, list[str]]:
    siblings = sorted(p.name for p in path.parent.iterdir())
    return path.read_bytes(), path.stat().st_mtime_ns, siblings


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["other-app", "not-sqlite"])
def test_foreign_file_is_refused_untouched(
    tmp_path: Path, procs: Callable[..., Proc], kind: str
) -> None:
    path = tmp_path / "app.db"
    if kind == "other-app":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY, title TEXT, done INTEGER)")
        conn.execute("INSERT INTO tasks (title, done) VALUES ('buy milk', 0)")
        conn.commit()
        conn.close()
    else:
        path.write_text("name,amount\nalice,3\n")
    before = _snapshot(path)
    env = deferrun_env(f"sqlite:///{path}")
    for args in (["tasks"], ["submit", "tests.support.userland.DeferOnce"]):
        done = cli(*args, env=env, cwd=tmp_path)
        assert done.returncode == 2, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "left it untouched" in lines[0], done.stderr
    worker = procs(["worker"], env)
    assert worker.popen.wait(30) == 2
    assert len(_error_lines(worker.output())) == 1, worker.output()
    worker.stop()
    after = _snapshot(path)
    assert after[0] == before[0] and after[1] == before[1]
    assert [n for n in after[2] if not n.endswith(".log")] == before[2]  # no -wal / -shm
    if kind == "other-app":
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        conn.close()


# --------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for the full-disk test: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (65536, 4096, 512, 1):  # fill to the last byte
            for _ in range(10_000):  # 4 MiB disk: ends long before the bound
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


async def _submit_and_wait(url: str, timeout: float) -> str:
    from tests.support.userland import DeferOnce  # type: ignore[import-not-found]

    async with AsyncClient(url) as client:
        task_id = await client.submit(DeferOnce(task_id="after-disk-full"))
        return str((await client.wait(task_id, timeout=timeout)).state)


async def _submit_until_full(url: str) -> BaseException | None:
    from tests.support.userland import DeferOnce

    async with AsyncClient(url) as client:
        for _ in range(500):
            try:
                await client.submit(DeferOnce(task_id="filling"))
            except Exception as exc:
                return exc
    return None


def test_full_disk_recovers_once_space_is_freed_and_sigterm_works(
    small_disk: Path, procs: Callable[..., Proc]
) -> None:
    url = f"sqlite:///{small_disk / 'deferrun.db'}"
    proc = procs(["standalone"], deferrun_env(url))
    wait_until(lambda: _started(proc, "worker"), 20, message="standalone started")
    assert anyio.run(_submit_and_wait, url, 20.0) == "success"

    filler = _fill(small_disk)
    error = anyio.run(_submit_until_full, url)
    assert isinstance(error, StoreUnavailable), repr(error)
    assert "disk" in str(error) and "full" in str(error)

    filler.unlink()
    state = wait_until(
        lambda: _try(lambda: anyio.run(_submit_and_wait, url, 15.0)), 30, 0.5, "a write again"
    )
    assert state == "success"
    assert proc.popen.poll() is None

    filler = _fill(small_disk)
    proc.kill(15)  # SIGTERM while the disk is full
    started = time.monotonic()
    wait_until(lambda: proc.popen.poll() is not None, 30, message="exit after SIGTERM")
    assert time.monotonic() - started < 30
    assert "Traceback" not in proc.output()
    filler.unlink()


def _try(fn: Callable[[], str]) -> str | None:
    try:
        return fn()
    except StoreUnavailable:
        return None


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server on loopback that accepts connections and never says anything."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    server.close()


@pytest.mark.slow
def test_postgres_server_that_never_answers_times_out(silent_server: int, tmp_path: Path) -> None:
    url = f"postgresql://u:secret-pw@127.0.0.1:{silent_server}/db"
    env = deferrun_env(url, DEFERRUN_CONNECT_TIMEOUT="2")
    started = time.monotonic()
    done = cli("tasks", env=env, cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not answer within 2s" in lines[0], done.stderr
    assert "secret-pw" not in done.stderr
    assert elapsed < 10, f"took {elapsed:.1f}s"


@pytest.mark.anyio
async def test_bad_connect_timeout_setting_is_a_config_error(
    silent_server: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEFERRUN_CONNECT_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="DEFERRUN_CONNECT_TIMEOUT"):
        await open_store(f"postgresql://u@127.0.0.1:{silent_server}/db")
