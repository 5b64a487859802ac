"""Client and AsyncClient: submit operators, read and wait for tasks, cancel them."""

from __future__ import annotations

import atexit
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

import anyio
from anyio.from_thread import BlockingPortal, start_blocking_portal

from deferrun.core import classpaths, serialization
from deferrun.core.baseoperator import BaseOperator
from deferrun.core.basetrigger import BaseTrigger
from deferrun.core.deferral import prepare_deferral
from deferrun.core.models import NewTask, TaskInfo, TaskState, TriggerInfo
from deferrun.exceptions import SerializationError, TaskDeferred, TaskEnded, TaskNotFound
from deferrun.store import Store, make_store
from deferrun.store.pipelines import TRIGGER_RULES

T = TypeVar("T")


def new_task_id() -> str:
    """Time-ordered and unique: sorts by submission, never collides across hosts."""
    return f"{int(time.time() * 1000):011x}{uuid.uuid4().hex[:13]}"


def build_task(
    operator: BaseOperator,
    *,
    after: Sequence[str] = (),
    trigger_rule: str | None = None,
    start_trigger: BaseTrigger | None = None,
) -> NewTask:
    """Serialize an operator for submission; refuses what workers could not rebuild.

    ``after``: upstream task ids this task waits on (holding no slot) until ``trigger_rule``
    holds over their outcomes (when not given: the operator's ``trigger_rule`` attribute, as
    Airflow-style operators have, else ``all_success``). ``start_trigger``: a trigger to wait
    on before the first try (also the operator's own ``start_trigger()`` when its
    ``start_from_trigger`` is set).
    """
    if not isinstance(operator, BaseOperator):
        raise TypeError(f"submit() takes a BaseOperator instance, got {operator!r}")
    after = [after] if isinstance(after, str) else list(after)  # a generator is read once
    for upstream in after:
        if type(upstream) is not str:
            raise TypeError(f"after= takes task ids as returned by submit(), got {upstream!r}")
        if not upstream or "\x00" in upstream or not upstream.isprintable():
            raise ValueError(f"after= takes task ids as returned by submit(), got {upstream!r}")
    if trigger_rule is None:  # the operator's own (Airflow's trigger_rule=), else all_success
        own = getattr(operator, "trigger_rule", None) if after else None
        trigger_rule = own if isinstance(own, str) else "all_success"
    if trigger_rule not in TRIGGER_RULES:
        raise ValueError(
            f"unknown trigger_rule {trigger_rule!r}; use one of {', '.join(TRIGGER_RULES)}"
        )
    if start_trigger is None and operator.start_from_trigger:
        start_trigger = operator.start_trigger()
    start = None
    if start_trigger is not None:
        signal = TaskDeferred(start_trigger, BaseOperator.START_METHOD, None, None)
        start = prepare_deferral(signal)
    classpath, kwargs = operator.serialize()
    cls = classpaths.load_class(classpath, BaseOperator)
    classpaths.check_kwargs_fit(cls, kwargs, "operator")
    kwargs_json = serialization.dumps(kwargs, f"{cls.__qualname__} kwargs")
    return NewTask(
        id=new_task_id(),
        name=operator.task_id,
        classpath=classpath,
        kwargs=kwargs_json,
        queue=operator.queue,
        max_tries=operator.retries + 1,
        retry_delay=operator.retry_delay,
        execution_timeout=operator.execution_timeout,
        after=tuple(after),
        trigger_rule=trigger_rule if after else None,
        start=start,
    )


class AsyncClient:
    """``async with AsyncClient(db) as client: task_id = await client.submit(op)``."""

    def __init__(
        self, db: str | None = None, *, store: Store | None = None, owns_store: bool = False
    ) -> None:
        self._store = store
        self._db = db
        self._owns_store = store is None or owns_store
        self._opened = store is not None

    async def _get_store(self) -> Store:
        if self._store is None:
            self._store = make_store(self._db)
        if not self._opened:
            await self._store.open()
            self._opened = True
        return self._store

    async def __aenter__(self) -> AsyncClient:
        await self._get_store()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the store this client opened (not one it was given)."""
        if self._store is not None and self._owns_store and self._opened:
            await self._store.close()
            self._opened = False

    async def submit(
        self,
        operator: BaseOperator,
        *,
        after: Sequence[str] = (),
        trigger_rule: str | None = None,
        start_trigger: BaseTrigger | None = None,
    ) -> str:
        """Submit ``operator``; see :func:`build_task` for ``after`` and ``start_trigger``."""
        task = build_task(
            operator, after=after, trigger_rule=trigger_rule, start_trigger=start_trigger
        )
        await (await self._get_store()).submit(task)
        return task.id

    async def submit_many(self, operators: Sequence[BaseOperator]) -> list[str]:
        """Submit several operators in one transaction; all are refused if one is."""
        tasks = [build_task(op) for op in operators]
        await (await self._get_store()).submit_many(tasks)
        return [t.id for t in tasks]

    async def submit_classpath(
        self,
        classpath: str,
        kwargs: dict[str, Any] | None = None,
        *,
        after: Sequence[str] = (),
        trigger_rule: str | None = None,
    ) -> str:
        """Submit by name (the CLI's path): the class is loaded and checked here first."""
        cls = classpaths.load_class(classpath, BaseOperator)
        kwargs = kwargs or {}
        classpaths.check_kwargs_fit(cls, kwargs, "operator")
        try:
            operator = cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise SerializationError(
                f"the given kwargs do not fit operator {classpath}: {exc}"
            ) from exc
        return await self.submit(operator, after=after, trigger_rule=trigger_rule)

    async def get(self, task_id: str) -> TaskInfo:
        """The task as it is now; TaskNotFound if no task has that id."""
        info = await (await self._get_store()).get_task(task_id)
        if info is None:
            raise TaskNotFound(
                f"no task {task_id!r} in this database; list them with `deferrun tasks`"
            )
        return info

    async def wait(self, task_id: str, timeout: float | None = None) -> TaskInfo:
        """Poll until the task finishes; ``TimeoutError`` after ``timeout`` seconds."""
        delay = 0.02
        with anyio.fail_after(timeout):
            while True:
                info = await self.get(task_id)
                if info.finished:
                    return info
                await anyio.sleep(delay)
                delay = min(delay * 1.5, 0.5)

    async def list(
        self,
        state: TaskState | str | None = None,
        limit: int = 1000,
        before: str | TaskInfo | None = None,
    ) -> list[TaskInfo]:
        """Newest first; pass the last TaskInfo of a page as ``before`` for the next page (it
        still works once that task is deleted). A task id works too while the task exists;
        an unknown one raises TaskNotFound."""
        parsed = TaskState(state) if state is not None else None
        return await (await self._get_store()).list_tasks(parsed, limit, before)

    async def cancel(self, task_id: str) -> TaskInfo:
        """Cancel a task that has not ended; a task that has ended raises TaskEnded."""
        store = await self._get_store()
        before = await store.get_task(task_id)
        if before is not None and before.finished:
            raise TaskEnded(
                f"task {task_id} already ended {before.state}; nothing to cancel "
                "(use `deferrun retry` to run it again)"
            )
        info = await store.cancel_task(task_id)
        if info is None:
            raise TaskNotFound(f"no task {task_id!r} in this database")
        if info.state is not TaskState.CANCELLED:  # it ended on its own meanwhile
            raise TaskEnded(f"task {task_id} ended {info.state} before it could be cancelled")
        return info

    async def retry(self, task_id: str, downstream: bool = False) -> list[str]:
        """Re-run a finished task with a fresh try; ``downstream`` re-arms every task after it.

        Returns the ids put back to run (the task first). A task that has not finished (or
        was just retried by a call that ran at the same time) raises RetryRefused.
        """
        return await (await self._get_store()).retry_task(task_id, downstream=downstream)

    async def dependencies(self, task_id: str) -> tuple[list[str], list[str]]:
        """(upstream ids, downstream ids) of a task."""
        return await (await self._get_store()).dependencies(task_id)

    async def triggers(self) -> list[TriggerInfo]:
        """The live triggers: which triggerer holds each, with their classpaths and tasks."""
        return await (await self._get_store()).list_triggers()

    async def counts(self) -> dict[str, int]:
        """How many tasks are in each state."""
        return await (await self._get_store()).count_tasks()


class Client:
    """The synchronous twin of :class:`AsyncClient`, for scripts and notebooks.

    Runs an event loop in a background thread; close it (or use ``with``) when done. A client
    left open is closed at interpreter exit: otherwise finalizing its portal waits on the
    loop thread, which the exiting interpreter no longer runs, and the script never ends.
    """

    def __init__(self, db: str | None = None) -> None:
        self._portal_cm = start_blocking_portal()
        self._portal: BlockingPortal = self._portal_cm.__enter__()
        atexit.register(self.close)
        self._async = AsyncClient(db)
        try:
            self._call(self._async._get_store)
        except BaseException:
            self.close()
            raise

    def _call(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
        return self._portal.call(fn, *args)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the client's store and stop its event loop thread (``with Client()`` does it)."""
        atexit.unregister(self.close)
        if self._portal_cm is not None:
            try:
                self._portal.call(self._async.aclose)
            finally:
                self._portal_cm.__exit__(None, None, None)
                self._portal_cm = None  # type: ignore[assignment]

    def submit(
        self,
        operator: BaseOperator,
        *,
        after: Sequence[str] = (),
        trigger_rule: str | None = None,
        start_trigger: BaseTrigger | None = None,
    ) -> str:
        """Submit ``operator``; see :func:`build_task` for ``after`` and ``start_trigger``."""
        task = build_task(  # serialization errors raise in the caller's thread
            operator, after=after, trigger_rule=trigger_rule, start_trigger=start_trigger
        )
        return self._call(self._store_submit, task)

    async def _store_submit(self, task: NewTask) -> str:
        await (await self._async._get_store()).submit(task)
        return task.id

    def submit_many(self, operators: Sequence[BaseOperator]) -> list[str]:
        """Submit several operators in one transaction; their task ids in order."""
        return self._call(self._async.submit_many, list(operators))

    def get(self, task_id: str) -> TaskInfo:
        """The task as it is now; TaskNotFound if no task has that id."""
        return self._call(self._async.get, task_id)

    def wait(self, task_id: str, timeout: float | None = None) -> TaskInfo:
        """Block until the task ends (or ``timeout`` seconds pass: TimeoutError); its TaskInfo."""
        return self._call(self._async.wait, task_id, timeout)

    def list(
        self,
        state: TaskState | str | None = None,
        limit: int = 1000,
        before: str | TaskInfo | None = None,
    ) -> list[TaskInfo]:
        """Newest first; pass the last TaskInfo of a page as ``before`` for the next page."""
        return self._call(self._async.list, state, limit, before)

    def cancel(self, task_id: str) -> TaskInfo:
        """Cancel the task unless it already ended; its TaskInfo afterwards."""
        return self._call(self._async.cancel, task_id)

    def retry(self, task_id: str, downstream: bool = False) -> list[str]:
        """Re-run a finished task with a fresh try; ``downstream`` re-arms every task after it."""
        return self._call(self._async.retry, task_id, downstream)

    def dependencies(self, task_id: str) -> tuple[list[str], list[str]]:
        """The task's upstream and downstream task ids (tasks submitted with ``after=``)."""
        return self._call(self._async.dependencies, task_id)

    def triggers(self) -> list[TriggerInfo]:
        """The live triggers: which triggerer holds each, with their classpaths and tasks."""
        return self._call(self._async.triggers)

    def counts(self) -> dict[str, int]:
        """Number of tasks per state."""
        return self._call(self._async.counts)


__all__ = [
    "AsyncClient",
    "Client",
]
