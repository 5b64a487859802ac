"""Shared runs and shared polls with user triggers that are unusual but legal: unhashable or
equal-comparing triggers, a poll_many that blocks the loop or raises GeneratorExit. A real
worker and triggerer on both backends."""

from __future__ import annotations

import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from deferrun import TaskState
from deferrun.store import Store
from tests.support import shared_userland
from tests.support.runtime import runtime_for, wait_for
from tests.support.shared_userland import WaitOn

pytestmark = pytest.mark.anyio


@pytest.fixture
def arrived() -> Iterator[set[str]]:
    shared_userland.ARRIVED.clear()
    yield shared_userland.ARRIVED
    shared_userland.ARRIVED.clear()


def resumes(log: Path) -> Counter[str]:
    return Counter(log.read_text().split()) if log.exists() else Counter()


def members(rt: Any) -> int:
    return sum(g.count() for g in rt.triggerer.shared.groups.values())


async def test_unhashable_identical_triggers_share_one_run(
    store: Store, arrived: set[str], tmp_path: Path
) -> None:
    name = f"eq-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "resumes.log"
    async with runtime_for(store) as rt:
        ids = [
            await rt.client.submit(WaitOn(tclass="EqTrigger", tkwargs={"name": name}, log=str(log)))
            for _ in range(3)
        ]
        await wait_for(lambda: members(rt) == 3)
        assert len(rt.triggerer.shared.groups) == 1  # type: ignore[union-attr]
        arrived.add(name)
        infos = [await rt.client.wait(i, timeout=20) for i in ids]
    assert [i.state for i in infos] == [TaskState.SUCCESS] * 3, [i.error for i in infos]
    assert resumes(log) == Counter({i: 1 for i in ids})


async def test_poll_members_that_compare_equal_each_get_their_answer(
    store: Store, arrived: set[str], tmp_path: Path
) -> None:
    feed = f"feed-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "resumes.log"
    names = [f"{feed}-{i}" for i in range(3)]
    async with runtime_for(store) as rt:
        ids = [
            await rt.client.submit(
                WaitOn(tclass="FeedEqTrigger", tkwargs={"feed": feed, "name": n}, log=str(log))
            )
            for n in names
        ]
        await wait_for(lambda: members(rt) == 3)
        arrived.update(names)
        infos = [await rt.client.wait(i, timeout=10) for i in ids]
    assert [i.state for i in infos] == [TaskState.SUCCESS] * 3, [i.state for i in infos]
    assert resumes(log) == Counter({i: 1 for i in ids})


async def test_identical_runs_are_in_the_shared_poll_metric(
    store: Store, db_url: str, arrived: set[str], tmp_path: Path
) -> None:
    name = f"gate-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "resumes.log"
    async with runtime_for(store) as rt:
        assert rt.triggerer is not None
        ids = [
            await rt.client.submit(
                WaitOn(tclass="GateTrigger", tkwargs={"name": name}, log=str(log))
            )
            for _ in range(3)
        ]
        await wait_for(lambda: members(rt) == 3)
        poll = "tests.support.shared_userland.GateTrigger (identical)"
        metrics = rt.triggerer.metrics.render().decode()
        assert f'deferrun_shared_poll_members{{poll="{poll}"}} 3.0' in metrics, metrics
        shown = await anyio.run_process(
            [sys.executable, "-m", "deferrun", "triggers", "--db", db_url], check=True
        )
        [row] = [line for line in shown.stdout.decode().splitlines() if line.startswith(poll)]
        assert row.split()[-2:] == ["3", "1"], row  # the same count as the metric
        arrived.add(name)
        infos = [await rt.client.wait(i, timeout=20) for i in ids]
        metrics = rt.triggerer.metrics.render().decode()
    assert [i.state for i in infos] == [TaskState.SUCCESS] * 3
    assert poll not in metrics  # gone once nobody waits


async def test_a_blocking_poll_many_is_named_with_its_members(
    store: Store, arrived: set[str], tmp_path: Path
) -> None:
    feed = f"feed-{uuid.uuid4().hex[:8]}"
    names = [f"{feed}-{i}" for i in range(2)]
    with structlog.testing.capture_logs() as logs:
        async with runtime_for(store) as rt:
            ids = [
                await rt.client.submit(
                    WaitOn(
                        tclass="BadFeedTrigger",
                        tkwargs={"feed": feed, "name": n, "mode": "block"},
                        log=str(tmp_path / "resumes.log"),
                    )
                )
                for n in names
            ]
            await wait_for(lambda: members(rt) == 2)
            arrived.update(names)
            infos = [await rt.client.wait(i, timeout=20) for i in ids]
    assert [i.state for i in infos] == [TaskState.SUCCESS] * 2
    blocked = [e for e in logs if "blocked the event loop" in e["event"]]
    assert blocked, [e["event"] for e in logs]
    assert blocked[0]["trigger"] == "tests.support.shared_userland.BadFeedTrigger", blocked[0]
    assert blocked[0]["task_id"] in ids and sorted(blocked[0]["task_ids"]) == sorted(ids)
    assert isinstance(blocked[0]["trigger_id"], int) and blocked[0]["tasks_waiting"] == 2
    assert blocked[0]["blocked_seconds"] >= 0.4


async def test_generator_exit_from_poll_many_fails_members_with_a_clear_error(
    store: Store, arrived: set[str], tmp_path: Path
) -> None:
    feed = f"feed-{uuid.uuid4().hex[:8]}"
    names = [f"{feed}-{i}" for i in range(2)]
    async with runtime_for(store) as rt:
        ids = [
            await rt.client.submit(
                WaitOn(
                    tclass="BadFeedTrigger",
                    tkwargs={"feed": feed, "name": n, "mode": "genexit"},
                    log=str(tmp_path / "resumes.log"),
                )
            )
            for n in names
        ]
        await wait_for(lambda: members(rt) == 2)
        arrived.update(names)
        infos = [await rt.client.wait(i, timeout=20) for i in ids]
    assert [i.state for i in infos] == [TaskState.FAILED] * 2
    for info in infos:
        assert "BadFeedTrigger.poll_many() raised GeneratorExit" in (info.error or ""), info.error
        assert "internal error" not in (info.error or "")


def test_large_kwargs_are_hashed_as_stored_not_reparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    from deferrun.core import trigger_keys as sharing

    small = sharing.affinity_key("c.T", '{"a":1,"b":2}')
    assert small == sharing.affinity_key("c.T", '{"b": 2, "a": 1}')  # key order ignored
    big = '{"a":"' + "x" * (sharing.MAX_CANONICAL_CHARS + 1) + '"}'

    def no_parse(text: str) -> Any:
        raise AssertionError("large kwargs re-parsed on the event loop at every claim")

    monkeypatch.setattr(sharing.json, "loads", no_parse)
    assert sharing.affinity_key("c.T", big) == sharing.affinity_key("c.T", big)
    assert sharing.affinity_key("c.T", big) != sharing.affinity_key("c.U", big)
