"""Rows and values at the edges: each fails only its own task, never the worker or a listing.

Found by attacking the runtime from outside: a forged ``next_kwargs`` list or a string
``execution_timeout`` killed the worker on every restart; a NaN timeout did on PostgreSQL; one
row with a retry due in the year 33715 made ``deferrun tasks`` fail for the whole database;
``nan`` durations in the environment disabled reaping; a password with an unencoded ``/``
was printed in connection errors.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from deferrun import TaskState
from deferrun.client import build_task
from deferrun.core.baseoperator import as_seconds
from deferrun.core.config import redact_url, scrub
from deferrun.exceptions import ConfigError
from deferrun.store import Store
from tests.support.processes import REPO
from tests.support.runtime import runtime_for
from tests.support.userland import DeferOnce, Outcome

pytestmark = pytest.mark.anyio


async def _forge(store: Store, task_id: str, column: str, value: Any) -> None:
    """Write ``value`` into a task's column behind the store's back, as a hostile writer would."""
    from deferrun.store.postgres.connector import PostgresStore
    from deferrun.store.sqlite.connector import SQLiteStore

    sql = f"UPDATE deferrun_tasks SET {column} = $1 WHERE id = $2"
    if isinstance(store, SQLiteStore):
        conn = store.connector.conn
        await anyio.to_thread.run_sync(
            conn.execute, sql.replace("$1", "?").replace("$2", "?"), (value, task_id)
        )
    else:
        assert isinstance(store, PostgresStore)
        await store.connector.pool.execute(sql, value, task_id)


@pytest.mark.parametrize(
    ("column", "sqlite_value", "pg_value", "expected"),
    [
        ("next_kwargs", "[1]", "[1]", "resume kwargs are a list"),
        ("execution_timeout", "abc", math.nan, "execution_timeout"),
        ("execution_timeout", -5.0, math.inf, "execution_timeout"),
    ],
)
async def test_forged_column_fails_only_its_task(
    store: Store, db_url: str, column: str, sqlite_value: Any, pg_value: Any, expected: str
) -> None:
    value = sqlite_value if db_url.startswith("sqlite") else pg_value
    task = build_task(DeferOnce(value="x", delay=0.2))
    await store.submit(task)
    if column == "next_kwargs":  # a resume: defer once, then corrupt what the resume reads
        [claim] = await store.claim_tasks("forger", ["default"], 1)
        from deferrun.core.models import Deferral

        deferral = Deferral(
            "tests.support.userland.EchoTrigger", '{"value": 1}', "resume", "{}", None
        )
        trigger_id = await store.defer_task(task.id, claim.claim_token, deferral)
        assert trigger_id is not None
        assert await store.fire_triggers([(trigger_id, '"fired"')]) == 1
    await _forge(store, task.id, column, value)
    async with runtime_for(store) as rt:
        bad = await rt.client.wait(task.id, timeout=20)
        good = await rt.run_to_end(Outcome(what="fine"))
    assert bad.state is TaskState.FAILED, bad
    assert expected in (bad.error or ""), bad.error
    assert good.state is TaskState.SUCCESS, "the worker did not survive the forged row"


async def test_one_odd_row_never_breaks_a_listing(store: Store, db_url: str) -> None:
    odd = build_task(Outcome(what="one"))
    fine = build_task(Outcome(what="two"))
    await store.submit_many([odd, fine])
    await _forge(store, odd.id, "ready_at", 1e15)  # a due time past the year 9999
    await _forge(store, odd.id, "state", "bogus")
    if db_url.startswith("sqlite"):
        await _forge(store, odd.id, "created_at", "yesterday")
    listed = {i.id: i for i in await store.list_tasks()}
    assert set(listed) == {odd.id, fine.id}
    assert listed[odd.id].state == "bogus" and listed[fine.id].state is TaskState.QUEUED
    info = await store.get_task(odd.id)
    assert info is not None and info.not_before is None


def test_durations_no_clock_can_wait_for_are_refused() -> None:
    for bad in (math.nan, math.inf, -1, 1e12, 2**1100):
        with pytest.raises(ValueError):
            as_seconds(bad, "retry_delay")
    assert as_seconds(3 * 365 * 86400, "timeout") == 3 * 365 * 86400  # years are fine
    with pytest.raises(ValueError, match="retries"):
        Outcome(what="x", retries=2**63)
    with pytest.raises(ValueError, match="NUL"):
        Outcome(what="x", queue="q\x00")


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("DEFERRUN_DEAD_AFTER", "nan"),
        ("DEFERRUN_DEAD_AFTER", "1e-9"),
        ("DEFERRUN_CONNECT_TIMEOUT", "inf"),
        ("DEFERRUN_RECORD_RETRY_FOR", "-1"),
    ],
)
def test_environment_durations_must_be_finite(
    monkeypatch: pytest.MonkeyPatch, name: str, raw: str
) -> None:
    from deferrun.core import config

    monkeypatch.setenv(name, raw)
    with pytest.raises(ConfigError, match=name):
        config.env_float(name, 10.0, minimum=1.0 if name == "DEFERRUN_DEAD_AFTER" else 0.001)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:SEKRIT/x@127.0.0.1:1/y",
        "postgresql://u:SE#KRIT@127.0.0.1:1/y",
        "postgresql://u:SEK?RIT@127.0.0.1:1/y",
        "postgresql://u@127.0.0.1:1/y?password=SEKRIT&sslmode=disable",
    ],
)
def test_passwords_never_reach_an_error_line(url: str) -> None:
    assert "SEKRIT" not in redact_url(url).replace("SE#KRIT", "").replace("SEK?RIT", "")
    assert "KRIT" not in redact_url(url)
    assert "KRIT" not in scrub(f"invalid literal for int(): 'SEKRIT' in {url}", url)
    done = subprocess.run(
        [sys.executable, "-m", "deferrun", "--db", url, "tasks"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "DEFERRUN_CONNECT_TIMEOUT": "5"},
    )
    assert done.returncode == 2, done
    assert "KRIT" not in done.stdout + done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_cli_refuses_a_nan_wait_before_submitting(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'x.db'}"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deferrun",
            "--db",
            db,
            "submit",
            "tests.support.userland.Outcome",
            "--wait=nan",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert done.returncode == 2 and "--wait" in done.stderr
    assert not (tmp_path / "x.db").exists(), "the task was submitted before --wait was checked"


def test_a_reader_that_leaves_early_is_no_error(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'x.db'}"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    script = f"""
import anyio
from deferrun import AsyncClient
from tests.support.userland import Outcome
async def main():
    async with AsyncClient({db!r}) as c:
        await c.submit_many([Outcome(what=str(i)) for i in range(3000)])
anyio.run(main)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60, env=env, cwd=REPO)
    done = subprocess.run(
        f"{sys.executable} -m deferrun --db {db} tasks --limit 3000 | head -c 100 >/dev/null",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )
    assert "Traceback" not in done.stderr, done.stderr
