"""A stateful property test of pipelines: random DAGs, random ends, against a reference model.

Hypothesis builds a small DAG (each task after a random subset of earlier ones, with a
random trigger rule), then ends tasks in a random order (success, failure, skip, cancel).
After every step the store must agree with a model that settles waiters in Python: which
are queued, which ended ``upstream_failed`` or ``skipped``, and which still wait, with every
cascade applied in the same step. Each task has a queue of its own, so a claim takes exactly
the task the test means.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from deferrun.client import build_task
from deferrun.core.models import TaskState
from deferrun.store import Store, make_store
from deferrun.store.pipelines import TRIGGER_RULES, verdict
from tests.support.pipeline_userland import Step
from tests.support.runtime import run_model, wipe

T = TypeVar("T")
_BAD = {TaskState.FAILED, TaskState.UPSTREAM_FAILED, TaskState.CANCELLED}


class PipelineModel(RuleBasedStateMachine):
    url: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.store: Store = make_store(self.url, dead_after=60.0)
        self.call(self.store.open())
        self.call(wipe(self.store))
        self.ids: list[str] = []
        self.ups: dict[str, list[str]] = {}
        self.rules: dict[str, str] = {}
        self.state: dict[str, TaskState] = {}

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def teardown(self) -> None:
        try:
            self.call(self.store.close())
        finally:
            self.runner.close()

    @initialize(
        shape=st.lists(
            st.tuples(st.sets(st.integers(0, 7), max_size=3), st.sampled_from(TRIGGER_RULES)),
            min_size=3,
            max_size=8,
        )
    )
    def build(self, shape: list[tuple[set[int], str]]) -> None:
        for i, (picks, trigger_rule) in enumerate(shape):
            after = sorted({self.ids[p % i] for p in picks} if i else set())
            task = build_task(
                Step(queue=f"q{i}"),
                after=after,
                trigger_rule=trigger_rule if after else "all_success",
            )
            self.call(self.store.submit(task))
            self.ids.append(task.id)
            self.ups[task.id] = after
            self.rules[task.id] = trigger_rule
            self.state[task.id] = TaskState.DEFERRED if after else TaskState.QUEUED
            self._settle([task.id], by_id=True)

    def _settle(self, ended: list[str], by_id: bool = False) -> None:
        """The reference, as the README states it: when tasks end, every task waiting on one
        of them is decided on its upstreams' states at that moment; the waiters that end
        then settle their own waiters the same way, round after round."""
        frontier = ended
        while frontier:
            if by_id:
                waiters = [t for t in frontier if self.state[t] is TaskState.DEFERRED]
                by_id = False
            else:
                waiters = [
                    t
                    for t, ups in self.ups.items()
                    if self.state[t] is TaskState.DEFERRED and set(ups) & set(frontier)
                ]
            decided: dict[str, TaskState] = {}
            for tid in waiters:
                states = [self.state[u] for u in self.ups[tid]]
                ok = sum(s is TaskState.SUCCESS for s in states)
                bad = sum(s in _BAD for s in states)
                skipped = sum(s is TaskState.SKIPPED for s in states)
                new = verdict(self.rules[tid], len(states), ok, bad, skipped)
                if new is not None:
                    decided[tid] = new
            self.state.update(decided)
            frontier = [t for t, s in decided.items() if s is not TaskState.QUEUED]

    @rule(data=st.data(), how=st.sampled_from(["success", "failed", "skipped", "cancel"]))
    def end(self, data: st.DataObject, how: str) -> None:
        i = data.draw(st.integers(0, 7)) % len(self.ids)
        tid = self.ids[i]
        ended = False
        if how == "cancel":
            info = self.call(self.store.cancel_task(tid))
            assert info is not None
            if not self.state[tid].finished:
                self.state[tid] = TaskState.CANCELLED
                ended = True
        elif self.state[tid] is TaskState.QUEUED:
            [claim] = self.call(self.store.claim_tasks("w", [f"q{i}"], 1))
            token = claim.claim_token
            if how == "success":
                assert self.call(self.store.complete_task(tid, token, '"ok"'))
                self.state[tid] = TaskState.SUCCESS
            elif how == "failed":
                assert self.call(self.store.fail_task(tid, token, "no", retry=False))
                self.state[tid] = TaskState.FAILED
            else:
                assert self.call(self.store.skip_task(tid, token, "skip"))
                self.state[tid] = TaskState.SKIPPED
            ended = True
        if ended:
            self._settle([tid])

    @invariant()
    def store_agrees(self) -> None:
        for tid in self.ids:
            info = self.call(self.store.get_task(tid))
            assert info is not None
            assert info.state == self.state[tid], (
                f"{tid} ({self.rules[tid]} after {len(self.ups[tid])}): "
                f"store {info.state}, model {self.state[tid]}"
            )


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_pipelines_match_reference_model(backend: str, request: pytest.FixtureRequest) -> None:
    run_model(PipelineModel, backend, request, examples=30, steps=15)
