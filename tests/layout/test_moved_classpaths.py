"""Rows written before the rooms (every module flat in ``deferrun/``) still load: a stored
classpath under a module that moved is loaded from where that module lives now."""

from __future__ import annotations

import enum
import importlib
import inspect
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from deferrun import BaseOperator, BaseTrigger, TaskState, TriggerEvent
from deferrun.client import AsyncClient
from deferrun.core.classpaths import MOVED_MODULES, load_class
from deferrun.store import Store
from deferrun.store.sql import Program, Query, run
from tests.support.runtime import runtime_for

OLD_PATHS = [
    (old, new, name)
    for old, new in sorted(MOVED_MODULES.items())
    for name, obj in vars(importlib.import_module(new)).items()
    if inspect.isclass(obj) and obj.__module__ == new and not name.startswith("_")
]


@pytest.mark.parametrize(("old", "new", "name"), OLD_PATHS)
def test_a_class_under_an_old_module_path_loads_from_its_new_module(
    old: str, new: str, name: str
) -> None:
    assert load_class(f"{old}.{name}", object) is getattr(importlib.import_module(new), name)


@pytest.mark.parametrize(("old", "new"), sorted(MOVED_MODULES.items()))
def test_every_moved_module_names_a_module_that_exists(old: str, new: str) -> None:
    assert importlib.import_module(new).__name__ == new
    try:
        module = importlib.import_module(old)
    except ModuleNotFoundError:
        return  # the old module is gone
    assert hasattr(module, "__path__"), f"{old} is still a module beside {new}"  # a room now


def test_an_unknown_old_path_still_fails_clearly() -> None:
    from deferrun.exceptions import ClassLoadError

    with pytest.raises(ClassLoadError, match=r"nor as 'deferrun\.core\.models\.NoSuchClass'"):
        load_class("deferrun.models.NoSuchClass", enum.Enum)


def test_a_refused_old_path_is_refused_as_stored_and_never_tried_elsewhere() -> None:
    # found by an attack: the error named our rewrite of the path, not the stored one
    from deferrun.exceptions import ClassLoadError

    with pytest.raises(ClassLoadError) as refused:
        load_class("deferrun.cli.__main__.Anything", BaseOperator)
    assert "__main__" in str(refused.value) and "commands" not in str(refused.value)


def test_an_enum_tag_naming_the_enum_base_fails_as_a_serialization_error() -> None:
    # found by an attack: Enum(1) raised a bare TypeError, stored as a raw traceback
    from deferrun.core.serialization import TAG, loads
    from deferrun.exceptions import SerializationError

    forged = f'{{"{TAG}": "enum", "cls": "deferrun.models.enum.Enum", "v": 1}}'
    with pytest.raises(SerializationError, match="not a member of"):
        loads(forged)


class ReportsState(BaseOperator):
    """Returns what its stored enum kwarg loaded as, then what its resume event held."""

    def __init__(self, state: TaskState, wait: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = state
        self.wait = wait

    def execute(self, context: Any) -> Any:
        if self.wait:
            moment = datetime.now(UTC) + timedelta(milliseconds=200)
            self.defer(trigger=StateAt(moment=moment, state=self.state), method_name="resumed")
        return {"enum": isinstance(self.state, TaskState), "value": self.state.value}

    def resumed(self, context: Any, event: Any = None) -> Any:
        return {"enum": isinstance(event, TaskState), "value": event.value}


class StateAt(BaseTrigger):
    def __init__(self, moment: datetime, state: TaskState) -> None:
        self.moment = moment
        self.state = state

    async def run(self) -> Any:
        import anyio

        await anyio.sleep(max((self.moment - datetime.now(UTC)).total_seconds(), 0))
        yield TriggerEvent(self.state)


OLD = "deferrun.models.TaskState"
NEW = "deferrun.core.models.TaskState"
AS_BEFORE = Query(
    "test_as_before",
    "UPDATE deferrun_tasks SET kwargs = replace(kwargs, :new, :old) WHERE id = :task_id",
)
TRIGGER_AS_BEFORE = Query(
    "test_trigger_as_before",
    "UPDATE deferrun_triggers SET kwargs = replace(kwargs, :new, :old)",
)


COUNT_OLD = Query(
    "test_count_old",
    "SELECT (SELECT count(*) FROM deferrun_tasks WHERE kwargs LIKE :pattern), "
    "(SELECT count(*) FROM deferrun_triggers WHERE kwargs LIKE :pattern)",
)


def _as_before(task_id: str) -> Program[None]:
    yield run(AS_BEFORE, task_id=task_id, new=NEW, old=OLD)


def _triggers_as_before() -> Program[None]:
    yield run(TRIGGER_AS_BEFORE, new=NEW, old=OLD)


async def _old_paths(store: Store) -> tuple[int, int]:
    [row] = await store.db.fetch(COUNT_OLD, pattern=f"%{OLD}%")  # type: ignore[attr-defined]
    return int(row[0]), int(row[1])


@pytest.mark.anyio
async def test_a_stored_task_and_trigger_naming_old_paths_run_and_resume(store: Store) -> None:
    client = AsyncClient(store=store)
    plain = await client.submit(ReportsState(state=TaskState.SKIPPED))
    waits = await client.submit(ReportsState(state=TaskState.FAILED, wait=True))
    for task_id in (plain, waits):
        await store.db.transact(_as_before(task_id))  # type: ignore[attr-defined]
    assert await _old_paths(store) == (2, 0)  # as an older release wrote them

    async with runtime_for(store, triggerer=False) as rt:
        info = await rt.client.wait(plain, timeout=20)
        assert info.state is TaskState.SUCCESS, info.error
        assert info.result == {"enum": True, "value": "skipped"}
        deferred: list[Any] = []

        async def is_deferred() -> bool:
            deferred[:] = [await store.get_task(waits)]
            return deferred[0] is not None and deferred[0].state is TaskState.DEFERRED

        with anyio.fail_after(20):
            while not await is_deferred():
                await anyio.sleep(0.02)
    await store.db.transact(_triggers_as_before())  # type: ignore[attr-defined]
    assert (await _old_paths(store))[1] == 1  # its trigger row names the old path too

    async with runtime_for(store, worker=True, triggerer=True) as rt:
        done = await rt.client.wait(waits, timeout=20)
    assert done.state is TaskState.SUCCESS, done.error
    assert done.result == {"enum": True, "value": "failed"}
