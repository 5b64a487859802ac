"""Task listing pages newest first by keyset (created_at, id), with ties from one bulk submit."""

from __future__ import annotations

import pytest
from userland import DeferOnce

from deferrun.client import build_task
from deferrun.models import TaskState
from deferrun.store import Store

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
