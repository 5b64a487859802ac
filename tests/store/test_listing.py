"""Task listing pages newest first by keyset (created_at, id), with ties from one bulk submit."""

from __future__ import annotations

from typing import Any

import pytest

from deferrun.client import build_task
from deferrun.core.models import TaskState
from deferrun.exceptions import TaskNotFound
from deferrun.store import Store
from deferrun.store.sql import Query, run
from tests.support.userland import DeferOnce

pytestmark = pytest.mark.anyio


async def test_keyset_pages_cover_every_task_once_newest_first(store: Store) -> None:
    # one transaction: every row shares created_at, so only the id tiebreak orders them
    first = [build_task(DeferOnce()) for _ in range(7)]
    await store.submit_many(first)
    later = [build_task(DeferOnce()) for _ in range(3)]
    await store.submit_many(later)
    seen: list[str] = []
    before = None
    for _ in range(10):  # bounded: 10 tasks in pages of 3 need 4 pages
        page = await store.list_tasks(limit=3, before=before)
        if not page:
            break
        seen += [t.id for t in page]
        before = page[-1].id
    assert len(seen) == len(set(seen)) == 10
    assert set(seen[:3]) == {t.id for t in later}  # the newest submit comes first
    assert seen == [t.id for t in await store.list_tasks(limit=100)]
    queued = await store.list_tasks(TaskState.QUEUED, limit=4, before=seen[1])
    assert [t.id for t in queued] == seen[2:6]


async def test_a_page_continues_after_its_last_task_is_deleted(store: Store) -> None:
    """``deferrun db clean`` (or anyone) may delete the last row of a page before the next
    page is asked for: the listed TaskInfo still says where to continue."""
    tasks = [build_task(DeferOnce()) for _ in range(5)]
    await store.submit_many(tasks[:2])
    await store.submit_many(tasks[2:])
    everything = [t.id for t in await store.list_tasks(limit=10)]
    page = await store.list_tasks(limit=2)
    await wipe_task(store, page[-1].id)
    rest = await store.list_tasks(limit=10, before=page[-1])
    assert [t.id for t in page + rest] == everything
    in_state = await store.list_tasks(TaskState.QUEUED, limit=10, before=page[-1])
    assert [t.id for t in in_state] == [t.id for t in rest]


async def test_an_unknown_task_id_to_list_from_is_refused(store: Store) -> None:
    await store.submit_many([build_task(DeferOnce()) for _ in range(3)])
    for before in ("no-such-task", "' OR 1=1 --"):
        with pytest.raises(TaskNotFound, match=r"no task .* to list from"):
            await store.list_tasks(limit=10, before=before)


async def wipe_task(store: Store, task_id: str) -> None:
    def program() -> Any:
        yield run(Query("delete_task", "DELETE FROM deferrun_tasks WHERE id = :id"), id=task_id)

    await store.db.transact(program())  # type: ignore[attr-defined]
