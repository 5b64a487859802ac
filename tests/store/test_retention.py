"""Retention (`deferrun db clean`, the triggerer's --retention) on both backends."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from deferrun.client import build_task
from deferrun.core.models import TaskState
from deferrun.store import Store, make_store
from deferrun.store.sql import Program, Query, run
from tests.support.processes import REPO, Proc, deferrun_env
from tests.support.userland import DeferOnce, Outcome

pytestmark = pytest.mark.anyio

FINISH = Query(
    "test_finish",
    "UPDATE deferrun_tasks SET state = :state, finished_at = {now} - :ago, updated_at = {now} "
    "WHERE id IN_TEXTS(:ids)",
)


PUT_XCOM = Query(
    "test_put_xcom",
    "INSERT INTO deferrun_xcom (task_id, xcom_key, value) VALUES (:task_id, 'k', '1')",
)
COUNT_XCOM = Query("test_count_xcom", "SELECT count(*) FROM deferrun_xcom WHERE task_id = :task_id")


def _put_xcom(task_id: str) -> Program[None]:
    yield run(PUT_XCOM, task_id=task_id)


def _finish(ids: list[str], state: str, ago: float) -> Program[None]:
    yield run(FINISH, ids=ids, state=state, ago=ago)


async def finished_tasks(
    store: Store, n: int, state: str = "success", ago: float = 100.0
) -> list[str]:
    """``n`` tasks that ended ``ago`` seconds ago, with two log lines each."""
    tasks = [build_task(Outcome(what="ok", task_id=f"old-{i}")) for i in range(n)]
    await store.submit_many(tasks)
    ids = [t.id for t in tasks]
    await store.db.transact(_finish(ids, state, ago))  # type: ignore[attr-defined]
    now = time.time()
    await store.append_task_logs(
        [(i, now, "worker", f"line {k}") for i in ids for k in range(2)], keep=100
    )
    return ids


async def test_clean_deletes_old_finished_tasks_with_their_logs(store: Store) -> None:
    old = await finished_tasks(store, 30, "success", ago=100)
    failed = await finished_tasks(store, 5, "failed", ago=100)
    recent = await finished_tasks(store, 5, "success", ago=1)
    [live] = [build_task(DeferOnce(value=1))]
    await store.submit(live)

    dry = await store.clean_finished(50, dry_run=True)
    assert dry.dry_run and dry.deleted == 35
    assert await store.get_task(old[0]) is not None

    only_failed = await store.clean_finished(50, ["failed"], batch_size=2)
    assert only_failed.deleted == 5 and only_failed.batches == 3
    assert await store.get_task(failed[0]) is None and await store.get_task(old[0]) is not None

    report = await store.clean_finished(50, batch_size=7)
    assert report.deleted == 30 and report.batches == 5
    for task_id in old:
        assert await store.get_task(task_id) is None
        assert await store.task_logs(task_id) == []
    for task_id in recent:  # too recent
        assert await store.get_task(task_id) is not None
        assert len(await store.task_logs(task_id)) == 2
    info = await store.get_task(live.id)
    assert info is not None and info.state is TaskState.QUEUED


async def test_clean_deletes_the_xcoms_of_what_it_deletes(store: Store) -> None:
    [old] = await finished_tasks(store, 1, "success", ago=100)
    recent = build_task(Outcome(what="ok", task_id="recent"))
    await store.submit(recent)
    db = store.db  # type: ignore[attr-defined]
    for task_id in (old, recent.id):
        await db.transact(_put_xcom(task_id))
    assert (await store.clean_finished(50)).deleted == 1
    assert [r[0] for r in await db.fetch(COUNT_XCOM, task_id=old)] == [0]
    assert [r[0] for r in await db.fetch(COUNT_XCOM, task_id=recent.id)] == [1]


async def test_clean_refuses_unfinished_states(store: Store) -> None:
    with pytest.raises(ValueError, match="only finished tasks"):
        await store.clean_finished(0, ["deferred"])


async def test_clean_keeps_an_upstream_its_downstream_still_waits_on(store: Store) -> None:
    [upstream] = await finished_tasks(store, 1, "success", ago=100)
    [other] = await finished_tasks(store, 1, "success", ago=100)
    waiter = build_task(DeferOnce(value=1), after=[upstream, other], trigger_rule="all_done")
    # the waiter is released at submit (both upstreams ended): make it wait by hand instead
    await store.submit(waiter)
    assert (await store.get_task(waiter.id)).state is TaskState.QUEUED  # type: ignore[union-attr]
    [claim] = await store.claim_tasks("w", ["default"], 1)
    # still running: its upstreams' results are read from them, so they must stay
    report = await store.clean_finished(50)
    assert report.deleted == 0
    assert await store.get_task(upstream) is not None
    assert await store.upstream_results(waiter.id)

    assert await store.complete_task(waiter.id, claim.claim_token, None)
    # the downstream ended only now: still too recent, so its upstreams stay too
    assert (await store.clean_finished(50)).deleted == 0
    await store.db.transact(_finish([waiter.id], "success", 100))  # type: ignore[attr-defined]
    report = await store.clean_finished(50)
    assert report.deleted == 3
    assert await store.dependencies(waiter.id) == ([], [])


@pytest.mark.slow
async def test_clean_while_deferred_tasks_resume(
    db_url: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """Cleaning many finished tasks next to a live triggerer and worker: every deferred task
    resumes and succeeds, none is deleted, and the clean finishes."""
    store = make_store(db_url, dead_after=3.0)
    await store.open()
    try:
        old: list[str] = []
        for _ in range(4):
            old += await finished_tasks(store, 1000, "success", ago=3600)
        env = deferrun_env(db_url)
        procs(["triggerer"], env)
        procs(["worker", "--slots", "8"], env)
        live = [build_task(DeferOnce(value=i, delay=1.0)) for i in range(200)]
        await store.submit_many(live)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "deferrun",
                "db",
                "clean",
                "--older-than",
                "30m",
                "--batch-size",
                "200",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "deleted 4000 finished task(s)" in result.stdout

        async def all_done() -> bool:
            infos = [await store.get_task(t.id) for t in live]
            assert all(i is not None for i in infos), "a live task was deleted"
            return all(i.state is TaskState.SUCCESS for i in infos)  # type: ignore[union-attr]

        with anyio.fail_after(60):
            while not await all_done():
                await anyio.sleep(0.2)
        for task_id in old[:50]:
            assert await store.get_task(task_id) is None
    finally:
        await store.close()


def test_db_clean_command_errors(sqlite_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    bad = subprocess.run(
        [sys.executable, "-m", "deferrun", "--db", sqlite_url, "db", "clean", "--older-than", "7x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "30s, 15m, 12h or 7d" in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "deferrun", "--db", sqlite_url, "db", "clean", "--older-than", "7d"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2 and "error:" in missing.stderr

    async def create() -> None:
        created = make_store(sqlite_url)
        await created.open()
        await created.close()

    anyio.run(create)
    for option in (
        ["--older-than", "٣s"],
        ["--older-than", "1d", "--batch-size", "99999999999999999999999"],
        ["--older-than", "1d", "--batch-size", "0"],
        ["--older-than", "1d", "--batch-size", "٣"],
    ):
        wrong = subprocess.run(
            [sys.executable, "-m", "deferrun", "--db", sqlite_url, "db", "clean", *option],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert wrong.returncode == 2 and "Traceback" not in wrong.stderr, (option, wrong.stderr)
        assert len(wrong.stderr.strip().splitlines()[-1]) < 200, wrong.stderr


async def test_triggerer_retention_cleans_periodically(
    db_url: str, procs: Callable[..., Proc]
) -> None:
    """`deferrun triggerer --retention 1h` cleans at start (then every 150 s): old finished
    tasks go, recent ones and live ones stay."""
    store = make_store(db_url, dead_after=3.0)
    await store.open()
    try:
        old = await finished_tasks(store, 50, "failed", ago=7200)
        recent = await finished_tasks(store, 5, "success", ago=60)
        proc = procs(["triggerer", "--retention", "1h"], deferrun_env(db_url))
        with anyio.fail_after(30):
            while await store.get_task(old[-1]) is not None:
                await anyio.sleep(0.2)
        assert all([await store.get_task(t) is None for t in old])
        assert all([await store.get_task(t) is not None for t in recent])
        with anyio.fail_after(10):  # and says so in its log
            while '"deleted": 50' not in proc.output():
                await anyio.sleep(0.1)
    finally:
        await store.close()


async def test_sqlite_reuses_the_pages_a_clean_frees(sqlite_url: str) -> None:
    """The SQLite file does not shrink after a clean; its free pages take the next rows."""
    store = make_store(sqlite_url)
    await store.open()
    try:
        conn = store.connector.conn  # type: ignore[attr-defined]

        def pages() -> tuple[int, int]:
            return (
                int(conn.execute("PRAGMA page_count").fetchone()[0]),
                int(conn.execute("PRAGMA freelist_count").fetchone()[0]),
            )

        await finished_tasks(store, 2000, "success", ago=100)
        before, free_before = pages()
        assert (await store.clean_finished(50)).deleted == 2000
        after, free_after = pages()
        assert after == before and free_after > before // 2  # not shrunk: pages on the free list
        await finished_tasks(store, 2000, "success", ago=100)
        refilled, free_refilled = pages()
        assert refilled <= before * 1.05 and free_refilled < free_after // 4  # reused
        assert free_before == 0
    finally:
        await store.close()


async def test_clean_never_deletes_an_upstream_a_new_downstream_is_submitted_on(
    db_url: str,
) -> None:
    """A clean racing with submits `after=` old tasks: every accepted downstream keeps its
    upstream (a submit that loses the race is refused with TaskNotFound instead)."""
    from deferrun.exceptions import TaskNotFound

    submitter = make_store(db_url)
    cleaner = make_store(db_url)
    await submitter.open()
    await cleaner.open()
    try:
        old = await finished_tasks(submitter, 2000, "success", ago=3600)
        accepted: list[tuple[str, str]] = []
        refused = 0
        done = anyio.Event()

        async def clean() -> None:
            try:
                await cleaner.clean_finished(60, batch_size=25)
            finally:
                done.set()

        async def submit() -> None:
            nonlocal refused
            # walk the old ids in the clean's rough order, so submits hit rows being cleaned
            for n in range(4000):
                if done.is_set():
                    break
                up = old[(n * 7) % len(old)]
                task = build_task(Outcome(what="ok", task_id=f"down-{n}"), after=[up])
                try:
                    await submitter.submit(task)
                except TaskNotFound:
                    refused += 1
                else:
                    accepted.append((task.id, up))
                await anyio.sleep(0)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(clean)
                tg.start_soon(submit)
        assert accepted, "no submit ran during the clean"
        lost = [(d, u) for d, u in accepted if await submitter.get_task(u) is None]
        assert not lost, f"{len(lost)} of {len(accepted)} downstream tasks lost their upstream"
        for d, u in accepted[:20]:
            detail = await submitter.task_detail(d)
            assert detail is not None and [x["id"] for x in detail["upstream"]] == [u]
    finally:
        await submitter.close()
        await cleaner.close()
