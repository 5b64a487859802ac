"""A stateful property test of the store against a small reference model, on both backends.

Hypothesis drives random claims, defers, fires (also stale and duplicate ones), failures,
reschedules, requeues, cancels, deferral timeouts and reaps of a dead worker's attempts, and
after every step compares the database with the model. Invariants: never two live attempts
of one task, never an outcome recorded on the wrong attempt, no task `running` without an
owner or `deferred` without its trigger, and try_number never skips or repeats.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from deferrun.client import build_task
from deferrun.core import serialization
from deferrun.core.baseoperator import BaseOperator
from deferrun.core.models import Deferral, TaskState
from deferrun.store import Store, make_store
from tests.support.runtime import run_model, wipe
from tests.support.userland import Flaky

T = TypeVar("T")
LIVE, DEAD = "w-live", "w-dead"  # w-dead never heartbeats: reap treats it as gone


@dataclass
class ModelTask:
    id: str
    max_tries: int
    state: TaskState = TaskState.QUEUED
    try_number: int = 0
    token: int = 0  # claim_token of the live attempt (or of the last one)
    worker: str | None = None
    trigger_id: int | None = None
    resumed_with: str | None = None
    expires: bool = False  # deferred with a timeout that has already passed


class StoreModel(RuleBasedStateMachine):
    url: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.store: Store = make_store(self.url, dead_after=60.0)
        self.call(self.store.open())
        self.call(self._reset())
        self.tasks: dict[str, ModelTask] = {}
        self.attempts: list[tuple[str, int]] = []  # every claim ever made, stale ones too
        self.triggers: list[int] = []  # every trigger id ever made

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    async def _reset(self) -> None:

        await wipe(self.store)
        await self.store.register_process(LIVE, "worker", ["default"], 100)

    def teardown(self) -> None:
        try:
            self.call(self.store.close())
        finally:
            self.runner.close()

    # -- rules --------------------------------------------------------------------------------

    @initialize(n=st.integers(1, 4), retries=st.integers(0, 2))
    def submit(self, n: int, retries: int) -> None:
        for _ in range(n):
            task = build_task(Flaky(retries=retries, retry_delay=0))
            self.call(self.store.submit(task))
            self.tasks[task.id] = ModelTask(task.id, max_tries=retries + 1)

    @rule(worker=st.sampled_from([LIVE, DEAD]), limit=st.integers(1, 3))
    def claim(self, worker: str, limit: int) -> None:
        claimed = self.call(self.store.claim_tasks(worker, ["default"], limit))
        runnable = [t for t in self.tasks.values() if t.state in _RUNNABLE]
        assert len(claimed) == min(limit, len(runnable))
        for c in claimed:
            m = self.tasks[c.id]
            assert m.state in _RUNNABLE, f"claimed a {m.state} task"
            new_try = m.state is TaskState.UP_FOR_RETRY or m.try_number == 0
            expected_try = m.try_number + 1 if new_try else m.try_number
            assert c.try_number == expected_try, "try_number skipped or repeated"
            assert c.claim_token > m.token, "claim token did not grow"
            if m.resumed_with is not None:
                assert c.next_method == m.resumed_with
            m.state, m.try_number, m.token, m.worker = (
                TaskState.RUNNING,
                c.try_number,
                c.claim_token,
                worker,
            )
            self.attempts.append((c.id, c.claim_token))

    def _live(self, attempt: tuple[str, int]) -> ModelTask | None:
        m = self.tasks[attempt[0]]
        return m if m.state is TaskState.RUNNING and m.token == attempt[1] else None

    @rule(data=st.data(), how=st.sampled_from(["complete", "skip", "reschedule", "requeue"]))
    def end_attempt(self, data: st.DataObject, how: str) -> None:
        attempt = _pick(data, self.attempts)
        if attempt is None:
            return
        m = self._live(attempt)
        task_id, token = attempt
        if how == "complete":
            ok = self.call(self.store.complete_task(task_id, token, serialization.dumps(token)))
            new = TaskState.SUCCESS
        elif how == "skip":
            ok = self.call(self.store.skip_task(task_id, token, "skip \x00 me"))
            new = TaskState.SKIPPED
        elif how == "reschedule":
            ok = self.call(self.store.reschedule_task(task_id, token, 0))
            new = TaskState.UP_FOR_RESCHEDULE
        else:
            ok = self.call(self.store.requeue_task(task_id, token))
            new = TaskState.QUEUED
        assert ok == (m is not None), f"{how} on {'live' if m else 'stale'} attempt gave {ok}"
        if m is not None:
            m.state, m.worker = new, None
            if new is TaskState.SUCCESS:
                info = self.call(self.store.get_task(task_id))
                assert info is not None and info.result == token, "result on the wrong attempt"

    @rule(data=st.data(), retry=st.booleans())
    def fail(self, data: st.DataObject, retry: bool) -> None:
        picked = _pick(data, self.attempts)
        if picked is None:
            return
        task_id, token = picked
        m = self._live((task_id, token))
        state = self.call(self.store.fail_task(task_id, token, "bad \x00 \ud800", retry=retry))
        if m is None:
            assert state is None, "a stale attempt recorded a failure"
            return
        retrying = retry and m.try_number < m.max_tries
        assert state is (TaskState.UP_FOR_RETRY if retrying else TaskState.FAILED)
        m.state, m.worker, m.resumed_with = state, None, None

    @rule(data=st.data(), timeout=st.sampled_from([None, 0.0]))
    def defer(self, data: st.DataObject, timeout: float | None) -> None:
        picked = _pick(data, self.attempts)
        if picked is None:
            return
        task_id, token = picked
        m = self._live((task_id, token))
        deferral = Deferral(
            "tests.support.userland.EchoTrigger", '{"value": 1}', "resume", "{}", timeout
        )
        trigger_id = self.call(self.store.defer_task(task_id, token, deferral))
        assert (trigger_id is not None) == (m is not None)
        if m is not None and trigger_id is not None:
            m.state, m.worker, m.trigger_id = TaskState.DEFERRED, None, trigger_id
            m.resumed_with, m.expires = None, timeout is not None
            self.triggers.append(trigger_id)

    @rule(data=st.data(), failed=st.booleans())
    def fire(self, data: st.DataObject, failed: bool) -> None:
        trigger_id = _pick(data, self.triggers)
        if trigger_id is None:
            return
        waiting = [t for t in self.tasks.values() if t.trigger_id == trigger_id]
        m = waiting[0] if waiting and waiting[0].state is TaskState.DEFERRED else None
        event = serialization.dumps({"fired": trigger_id})
        if failed:
            method = BaseOperator.TRIGGER_FAILED_METHOD
            n = self.call(self.store.fail_triggers([(trigger_id, method, event)]))
        else:
            method = "resume"
            n = self.call(self.store.fire_triggers([(trigger_id, event)]))
        assert n == (1 if m is not None else 0), "an event resumed a task twice or not at all"
        if m is not None:
            m.state, m.trigger_id, m.resumed_with = TaskState.QUEUED, None, method

    @rule(limit=st.integers(1, 5))
    def claim_triggers(self, limit: int) -> None:
        claimed = self.call(self.store.claim_triggers("t-live", [], limit))
        for c in claimed:
            assert any(
                t.trigger_id == c.id and t.state is TaskState.DEFERRED for t in self.tasks.values()
            )

    @rule()
    def reap(self) -> None:
        report = self.call(self.store.reap(dead_after=60.0))
        for m in self.tasks.values():
            if m.state is TaskState.RUNNING and m.worker == DEAD:
                retrying = m.try_number < m.max_tries
                m.state = TaskState.UP_FOR_RETRY if retrying else TaskState.FAILED
                m.worker, m.resumed_with = None, None
                assert m.id in (report.retried if retrying else report.failed)
        timed_out = set(report.timed_out)
        for m in self.tasks.values():
            if m.state is TaskState.DEFERRED and m.expires:
                assert m.id in timed_out, "a deferral past its deadline was not timed out"
            if m.id in timed_out:
                assert m.state is TaskState.DEFERRED and m.expires
                m.state, m.trigger_id = TaskState.QUEUED, None
                m.resumed_with = BaseOperator.DEFERRAL_TIMEOUT_METHOD

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        picked = _pick(data, list(self.tasks))
        if picked is None:
            return
        m = self.tasks[picked]
        info = self.call(self.store.cancel_task(m.id))
        assert info is not None
        if not m.state.finished:
            m.state, m.worker, m.trigger_id = TaskState.CANCELLED, None, None
        assert info.state is m.state

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def matches_model(self) -> None:
        if not self.tasks:
            return
        infos = {i.id: i for i in self.call(self.store.list_tasks(limit=1000))}
        triggers = self.call(self.store.list_triggers())
        claims = self.call(self.store.owned_claims(LIVE)) | self.call(self.store.owned_claims(DEAD))
        assert len({task_id for task_id, _ in claims}) == len(claims), "two live attempts"
        by_task = {t.task_id: t for t in triggers}
        assert len(by_task) == len(triggers), "two triggers for one task"
        for m in self.tasks.values():
            info = infos[m.id]
            assert info.state is m.state, f"{m.id}: store {info.state}, model {m.state}"
            assert info.try_number == m.try_number
            if m.state is TaskState.RUNNING:
                assert (m.id, m.token) in claims, "running without its owner"
            if m.state is TaskState.DEFERRED:
                assert m.id in by_task and by_task[m.id].id == m.trigger_id, "deferred, no trigger"
            else:
                assert m.id not in by_task, f"a {m.state} task still has a trigger"


_RUNNABLE = {TaskState.QUEUED, TaskState.UP_FOR_RETRY, TaskState.UP_FOR_RESCHEDULE}


def _pick(data: st.DataObject, items: list[T]) -> T | None:
    """An item by position, or None. Always one draw of one type: which tasks a claim takes
    among equals is the database's choice, so what the lists hold may differ between
    Hypothesis's replays, and a precondition or a draw depending on it would be flaky."""
    index = data.draw(st.integers(0, 10_000))
    return items[index % len(items)] if items else None


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_store_matches_reference_model(backend: str, request: pytest.FixtureRequest) -> None:
    run_model(StoreModel, backend, request, examples=40, steps=30)
