"""Retention never orphans a task it keeps, and a waiter with no upstream left is settled
(issue 24, bug 1), on both backends. Driven through the store (claim, complete, fail) so
every step is deterministic."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from deferrun.client import build_task
from deferrun.core.models import NewTask, TaskState
from deferrun.store import Store
from deferrun.store.sql import Program, Query, run
from tests.support.pipeline_userland import Step

pytestmark = pytest.mark.anyio

AGE = Query(
    "test_age", "UPDATE deferrun_tasks SET finished_at = {now} - :ago WHERE id IN_TEXTS(:ids)"
)
DROP_DEP = Query(
    "test_drop_dep", "DELETE FROM deferrun_deps WHERE task_id = :task_id AND upstream_id = :up"
)


def _age(ids: list[str], ago: float) -> Program[None]:
    yield run(AGE, ids=ids, ago=ago)


def _drop_dep(task_id: str, up: str) -> Program[None]:
    yield run(DROP_DEP, task_id=task_id, up=up)


async def _submit(store: Store, after: Sequence[str] = (), rule: str | None = None) -> NewTask:
    task = build_task(Step(), after=after, trigger_rule=rule)
    await store.submit(task)
    return task


async def _run(store: Store, task_id: str, outcome: str = "success") -> None:
    """Claim the one runnable task (it must be ``task_id``) and end it as told."""
    [claim] = await store.claim_tasks("w1", ["default"], 1)
    assert claim.id == task_id
    if outcome == "success":
        assert await store.complete_task(task_id, claim.claim_token, '"ok"')
    else:
        assert await store.fail_task(task_id, claim.claim_token, "told to", retry=False)


async def _state(store: Store, task_id: str) -> TaskState:
    info = await store.get_task(task_id)
    assert info is not None, f"task {task_id} was deleted"
    return info.state


async def test_clean_keeps_the_upstreams_of_a_kept_subgraph_and_retry_downstream_runs(
    store: Store,
) -> None:
    """A >> B >> D, D failed: a clean of old successes must keep A (B is kept for D), and
    `retry B --downstream` then runs B and D instead of leaving both waiting forever."""
    a = await _submit(store)
    b = await _submit(store, [a.id])
    d = await _submit(store, [b.id])
    await _run(store, a.id)
    await _run(store, b.id)
    await _run(store, d.id, "failed")
    await store.db.transact(_age([a.id, b.id, d.id], 100))  # type: ignore[attr-defined]

    dry = await store.clean_finished(1, ["success"], dry_run=True)
    report = await store.clean_finished(1, ["success"])
    assert dry.deleted == report.deleted == 0
    assert await store.dependencies(b.id) == ([a.id], [d.id])

    assert await store.retry_task(b.id, downstream=True) == [b.id, d.id]
    assert await _state(store, b.id) is TaskState.UP_FOR_RETRY
    assert await _state(store, d.id) is TaskState.DEFERRED
    await _run(store, b.id)
    assert await _state(store, d.id) is TaskState.UP_FOR_RETRY  # released: its second try
    await _run(store, d.id)
    assert await _state(store, d.id) is TaskState.SUCCESS


async def test_plain_retry_of_a_task_kept_for_an_unfinished_downstream(store: Store) -> None:
    """B kept because its downstream D has not ended (D waits on C too): its upstream A stays,
    and a plain `retry B` runs B again."""
    a = await _submit(store)
    c = await _submit(store)
    b = await _submit(store, [a.id])
    d = await _submit(store, [b.id, c.id])
    await _run(store, a.id)
    [claim_c] = await store.claim_tasks("w1", ["default"], 1)
    assert claim_c.id == c.id  # C runs on
    await _run(store, b.id)
    await store.db.transact(_age([a.id, b.id], 100))  # type: ignore[attr-defined]

    assert (await store.clean_finished(1, ["success"])).deleted == 0
    assert await _state(store, a.id) is TaskState.SUCCESS
    assert await store.retry_task(b.id) == [b.id]
    assert await _state(store, b.id) is TaskState.UP_FOR_RETRY
    await _run(store, b.id)
    assert await store.complete_task(c.id, claim_c.claim_token, None)
    assert await _state(store, d.id) is TaskState.QUEUED


async def test_a_waiter_whose_upstreams_are_all_gone_is_settled(store: Store) -> None:
    """A task orphaned by an older clean (its dependency rows gone) is settled on retry as a
    task with no upstreams (Airflow: its rule holds), never left waiting on nothing."""
    a = await _submit(store)
    b = await _submit(store, [a.id], rule="one_success")
    await _run(store, a.id)
    await _run(store, b.id)
    await store.db.transact(_drop_dep(b.id, a.id))  # type: ignore[attr-defined]
    assert await store.dependencies(b.id) == ([], [])
    assert await store.retry_task(b.id) == [b.id]
    assert await _state(store, b.id) is TaskState.UP_FOR_RETRY


async def test_a_whole_old_pipeline_goes_in_one_clean_and_dry_run_counts_it(store: Store) -> None:
    """Keeping kept sub-graphs whole must not leave ended chains behind: A >> B >> D all old
    successes go in one clean, and next to them a chain under a kept task stays whole."""
    chain = [await _submit(store)]
    for _ in range(4):
        chain.append(await _submit(store, [chain[-1].id]))
    for task in chain:
        await _run(store, task.id)
    kept = [await _submit(store)]
    kept.append(await _submit(store, [kept[0].id]))
    kept.append(await _submit(store, [kept[1].id]))
    await _run(store, kept[0].id)
    await _run(store, kept[1].id)
    await _run(store, kept[2].id, "failed")
    every = [t.id for t in chain + kept]
    await store.db.transact(_age(every, 100))  # type: ignore[attr-defined]

    dry = await store.clean_finished(1, ["success"], dry_run=True)
    report = await store.clean_finished(1, ["success"], batch_size=2)
    assert dry.deleted == report.deleted == len(chain)
    for task in chain:
        assert await store.get_task(task.id) is None
    for task in kept:
        assert await store.get_task(task.id) is not None
    # the failed bottom goes too once failures are cleaned: then the rest of its chain follows
    assert (await store.clean_finished(1)).deleted == len(kept)
