"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from deferrun.client import AsyncClient
from deferrun.exceptions import StoreUnavailable
from deferrun.store import Store
from deferrun.triggerer.triggerer import Triggerer
from deferrun.worker.worker import Worker


class Runtime:
    """A worker and a triggerer running in this event loop on one store."""

    def __init__(self, store: Store, worker: Worker | None, triggerer: Triggerer | None) -> None:
        self.store = store
        self.worker = worker
        self.triggerer = triggerer
        self.client = AsyncClient(store=store)

    async def run_to_end(self, op: Any, timeout: float = 20.0) -> Any:
        task_id = await self.client.submit(op)
        return await self.client.wait(task_id, timeout=timeout)


async def wait_for(condition: Callable[[], Any], timeout: float = 20.0) -> None:
    """Await until ``condition()`` is true, polling every 20 ms for at most ``timeout`` s."""
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


@asynccontextmanager
async def runtime_for(
    store: Store,
    *,
    slots: int = 4,
    worker: bool = True,
    triggerer: bool = True,
    queues: tuple[str, ...] = ("default",),
    dead_after: float = 2.0,
    **triggerer_kwargs: Any,
) -> AsyncIterator[Runtime]:
    w = (
        Worker(store, slots=slots, queues=queues, dead_after=dead_after, grace_period=2.0)
        if worker
        else None
    )
    t = Triggerer(store, dead_after=dead_after, **triggerer_kwargs) if triggerer else None
    async with anyio.create_task_group() as tg:
        for component in (w, t):
            if component is not None:
                tg.start_soon(component.run)
                with anyio.fail_after(10):
                    await component.started.wait()
        try:
            yield Runtime(store, w, t)
        finally:
            for component in (w, t):
                if component is not None:
                    component.stop()


def install_user_module(tmp_path: Path, monkeypatch: Any, name: str, source: str) -> Path:
    """Write user code as module ``name`` in a temp dir on sys.path (and, through the
    returned dir, on PYTHONPATH of deferrun subprocesses), as a user deployment would."""
    import sys
    import textwrap

    moddir = tmp_path / "usercode"
    moddir.mkdir(exist_ok=True)
    (moddir / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(moddir))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return moddir


#: every table a model test empties between examples
TABLES = (
    "deferrun_task_logs",
    "deferrun_deps",
    "deferrun_triggers",
    "deferrun_tasks",
    "deferrun_processes",
)


async def wipe(store: Store) -> None:
    """Empty every deferrun table (a model test starts each example from nothing)."""
    from deferrun.store.sql import Query, run

    def program(table: str) -> Any:
        yield run(Query(f"wipe_{table}", f"DELETE FROM {table}"))

    for table in TABLES:
        await store.db.transact(program(table))  # type: ignore[attr-defined]


def run_model(base: type, backend: str, request: Any, *, examples: int, steps: int) -> None:
    """Run the Hypothesis state machine ``base`` against a fresh database of ``backend``."""
    from hypothesis import HealthCheck, settings

    if backend == "sqlite":
        url = f"sqlite:///{request.getfixturevalue('tmp_path') / 'model.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    machine = type("Model", (base,), {"url": url})
    machine.TestCase.settings = settings(  # type: ignore[attr-defined]
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    machine.TestCase().runTest()  # type: ignore[attr-defined]


class OutageStore:
    """The real store, whose every outcome write fails as if the database were down while
    ``down`` (reads go through): what a worker sees in a database outage."""

    WRITES = (
        "complete_task",
        "fail_task",
        "skip_task",
        "defer_task",
        "requeue_task",
        "reschedule_task",
        "write_xcoms",
        "record_outcomes",  # the worker's group commit of the writes above
    )

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.down = False
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self.WRITES:
            return attr

        async def write(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                self.refused += 1
                raise StoreUnavailable("simulated outage: connection refused")
            return await attr(*args, **kwargs)

        return write
