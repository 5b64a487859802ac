"""Shared polls: every live PollingTrigger with the same shared-poll key is answered by one
batch poll per interval.

A trigger opts in with ``shared_poll_key()`` (a string; None keeps polling alone) and a
classmethod ``poll_many(triggers)`` returning one result per trigger: a ``TriggerEvent``
(fires that trigger), None (not yet) or an exception (fails that trigger). Its ``run()`` then
joins the :class:`SharedPoll` of its key in this event loop instead of polling itself. One
loop per key polls at the smallest interval among its members; a ``TransientError`` from
``poll_many`` backs off once for all of them; any other error fails every member with the
same error. A trigger that joins while a poll is in flight is answered by the next one; one
that leaves (fired elsewhere, cancelled, timed out) is dropped from the next batch, and the
loop ends when no member is left.
"""

from __future__ import annotations

import asyncio
import contextvars
import copy
import inspect
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from deferrun.core.basetrigger import poll_outcome, report_poll
from deferrun.exceptions import TransientError
from deferrun.process.watchdog import LoopWatchdog, timed_steps

if TYPE_CHECKING:
    from deferrun.core.basetrigger import PollingTrigger, TriggerEvent

log = structlog.get_logger("deferrun.shared_polls")

#: Served = the ``(trigger id, task id)`` of each task one trigger object's run() serves
Served = Callable[[], list[tuple[int, str]]]
#: ``id(trigger) -> (trigger, served)``, set and removed by the triggerer's shared runs. Keyed
#: by id(): a user's trigger may be unhashable (``__eq__`` without ``__hash__``) or have
#: ``__slots__`` without ``__weakref__``; the entry holds the trigger so its id is not reused.
SERVED: dict[int, tuple[Any, Served]] = {}
#: how many member ids a blocked shared poll names in the watchdog's warning
DESCRIBE_MEMBERS = 5
_POLLS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[type, str], SharedPoll]]
_POLLS = weakref.WeakKeyDictionary()


def serve(trigger: Any, served: Served) -> None:
    """Record which tasks ``trigger``'s run() serves (metrics, blocked-loop warnings)."""
    SERVED[id(trigger)] = (trigger, served)


def unserve(trigger: Any) -> None:
    entry = SERVED.get(id(trigger))
    if entry is not None and entry[0] is trigger:
        del SERVED[id(trigger)]


def served_by(trigger: Any) -> list[tuple[int, str]] | None:
    """The ``(trigger id, task id)`` pairs ``trigger`` serves, None when not recorded."""
    entry = SERVED.get(id(trigger))
    return entry[1]() if entry is not None and entry[0] is trigger else None


def polls() -> dict[tuple[type, str], SharedPoll]:
    """The shared polls running in this event loop."""
    loop = asyncio.get_running_loop()
    found = _POLLS.get(loop)
    if found is None:
        found = _POLLS[loop] = {}
    return found


def snapshot(loop: asyncio.AbstractEventLoop) -> list[tuple[str, int, int]]:
    """``(name, triggers, tasks)`` per shared poll running in ``loop`` (metrics, logs)."""
    return [(p.name, len(p.members), p.tasks()) for p in list(_POLLS.get(loop, {}).values())]


async def join(trigger: PollingTrigger, key: str) -> TriggerEvent:
    """Wait in the shared poll of ``key`` until it answers ``trigger`` with an event."""
    owner = _batch_owner(type(trigger))
    registry = polls()
    poll = registry.get((owner, key))
    if poll is None:
        poll = registry[(owner, key)] = SharedPoll(owner, key, registry)
    return await poll.wait(trigger)


def _batch_owner(cls: type) -> type:
    """The class whose ``poll_many`` answers ``cls``: triggers of two classes sharing one
    inherited batch poll (and key) share one loop."""
    for klass in cls.__mro__:
        if "poll_many" in vars(klass):
            return klass
    return cls


class SharedPoll:
    """One poll loop for every member trigger with the same owner class and key."""

    def __init__(self, owner: type, key: str, registry: dict[tuple[type, str], SharedPoll]):
        self.owner = owner
        self.key = key
        self.name = f"{owner.__qualname__} {key}"
        self.registry = registry
        # keyed by id(): members may be unhashable or compare equal to each other
        self.members: dict[int, tuple[PollingTrigger, asyncio.Future[TriggerEvent]]] = {}
        self.polls = 0
        self.failures = 0
        self._next_due = 0.0  # monotonic; 0: poll at once
        self._changed = anyio.Event()
        # a fresh context: the loop's log lines must not carry the first member's task id;
        # only the triggerer's health sink comes along (each poll reports every member)
        context = contextvars.Context()
        context.run(poll_outcome.set, poll_outcome.get())
        self._task = asyncio.get_running_loop().create_task(
            self._loop(), name=f"shared-poll:{self.name}"[:200], context=context
        )

    def tasks(self) -> int:
        # a member the shared runs do not track (shareable = False) serves one task
        return sum(_count(served_by(t)) for t, _ in list(self.members.values()))

    def describe(self, name: str) -> dict[str, Any]:
        """Watchdog describer: the class and the first member trigger and task ids."""
        pairs: list[tuple[int, str]] = []
        untracked = 0
        for trigger, _ in list(self.members.values()):
            found = served_by(trigger)
            if found is None:
                untracked += 1
            pairs.extend(found or ())
        details: dict[str, Any] = {
            "trigger": f"{self.owner.__module__}.{self.owner.__qualname__}",
            "shared_poll": self.name,
            "tasks_waiting": len(pairs) + untracked,
        }
        if pairs:
            details["trigger_id"], details["task_id"] = pairs[0]
            details["trigger_ids"] = [p[0] for p in pairs[:DESCRIBE_MEMBERS]]
            details["task_ids"] = [p[1] for p in pairs[:DESCRIBE_MEMBERS]]
        return details

    async def wait(self, trigger: PollingTrigger) -> TriggerEvent:
        future: asyncio.Future[TriggerEvent] = asyncio.get_running_loop().create_future()
        self.members[id(trigger)] = (trigger, future)
        self._changed.set()  # a shorter interval may bring the next poll forward
        try:
            return await future
        finally:
            if self.members.get(id(trigger), (None, None))[1] is future:
                del self.members[id(trigger)]
            if not self.members:
                self._stop()

    def _stop(self) -> None:
        if self.registry.get((self.owner, self.key)) is self:
            del self.registry[(self.owner, self.key)]
        if not self._task.done():
            self._task.cancel()

    def _interval(self) -> float:
        return min(t.poll_interval for t, _ in self.members.values())

    async def _loop(self) -> None:
        try:
            while self.members:
                wait = self._next_due - time.monotonic()
                if wait > 0:
                    self._changed = anyio.Event()
                    with anyio.move_on_after(wait):
                        await self._changed.wait()
                    if self._changed.is_set() and self.failures == 0:
                        # a member joined: its interval may be shorter than the one waited for
                        self._next_due = min(self._next_due, self._last + self._interval())
                    continue
                await self._poll_once()
        finally:
            if self.registry.get((self.owner, self.key)) is self:
                del self.registry[(self.owner, self.key)]
            for _, future in self.members.values():  # only on our own failure: never leave waiters
                if not future.done():
                    future.set_exception(RuntimeError(f"shared poll {self.name} stopped"))

    _last = 0.0

    async def _poll_once(self) -> None:
        batch = [t for t, _ in self.members.values()]
        lead = min(batch, key=lambda t: t.poll_interval)
        self._last = time.monotonic()
        self.polls += 1
        try:
            results = list(await self._call_poll_many(batch))
        except TransientError as exc:
            self.failures += 1
            for trigger in batch:
                report_poll(trigger, exc)
            retry_after = getattr(exc, "retry_after", None)
            if not isinstance(retry_after, int | float) or isinstance(retry_after, bool):
                retry_after = None
            delay = lead.retry_delay(self.failures, retry_after)
            log.warning(
                "shared poll failed; every member retries together",
                poll=self.name,
                members=len(batch),
                error=str(exc),
                attempt=self.failures,
                retry_in=round(delay, 2),
            )
            self._next_due = time.monotonic() + delay
            return
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # ours: the last member left
            self._fail(batch, self._clear(exc))
            self._next_due = time.monotonic() + lead.poll_interval
            return
        except BaseException as exc:  # a permanent error: every member fails with it
            self._fail(batch, exc if isinstance(exc, Exception) else self._clear(exc))
            self._next_due = time.monotonic() + lead.poll_interval
            return
        self.failures = 0
        if len(results) != len(batch):
            error = RuntimeError(
                f"{self.owner.__qualname__}.poll_many() returned {len(results)} results for "
                f"{len(batch)} triggers; return one result per trigger, in order"
            )
            self._fail(batch, error)
            self._next_due = time.monotonic() + lead.poll_interval
            return
        self._answer(batch, results)
        self._next_due = self._last + lead._jittered(self._interval() if self.members else 1.0)

    async def _call_poll_many(self, batch: list[PollingTrigger]) -> Any:
        """``poll_many(batch)``, each step timed by the loop's watchdog: a poll that blocks
        the loop is named with its class and member ids (:meth:`describe`)."""
        call = self.owner.poll_many(batch)  # type: ignore[attr-defined]
        watchdog = LoopWatchdog.of_running_loop()
        if watchdog is None or not inspect.iscoroutine(call):
            return await call
        return await timed_steps(call, watchdog, self.describe)

    def _clear(self, exc: BaseException) -> RuntimeError:
        """A clear trigger error for a BaseException that is not an Exception (GeneratorExit,
        SystemExit, KeyboardInterrupt, its own CancelledError): raised in each member's
        run(), GeneratorExit would read as "generator ignored GeneratorExit"."""
        error = RuntimeError(
            f"{self.owner.__qualname__}.poll_many() raised {type(exc).__name__}"
            f"{f': {exc}' if str(exc) else ''}; a poll must return its results or raise an "
            "Exception"
        )
        error.__cause__ = exc
        return error

    def _answer(self, batch: list[PollingTrigger], results: list[Any]) -> None:
        from deferrun.core.basetrigger import TriggerEvent

        for trigger, result in zip(batch, results, strict=True):
            future = self._future_of(trigger)
            if future is None or future.done():
                continue  # left while the poll was in flight
            report_poll(trigger, result if isinstance(result, TransientError) else None)
            if isinstance(result, TriggerEvent):
                del self.members[id(trigger)]  # answered: out of the next batch at once
                future.set_result(result)
            elif isinstance(result, TransientError):
                log.warning("shared poll: retrying one member", poll=self.name, error=str(result))
            elif isinstance(result, BaseException):
                del self.members[id(trigger)]
                clear = result if isinstance(result, Exception) else self._clear(result)
                future.set_exception(clear)
            elif result is not None:
                del self.members[id(trigger)]
                future.set_exception(
                    RuntimeError(
                        f"{self.owner.__qualname__}.poll_many() gave {type(result).__name__} "
                        "for a trigger; give a TriggerEvent, None or an exception"
                    )
                )

    def _fail(self, batch: list[PollingTrigger], exc: BaseException) -> None:
        log.warning(
            "shared poll failed; failing every member",
            poll=self.name,
            members=len(batch),
            error=repr(exc),
        )
        for trigger in batch:
            future = self._future_of(trigger)
            if future is not None and not future.done():
                del self.members[id(trigger)]
                future.set_exception(_copy(exc))

    def _future_of(self, trigger: PollingTrigger) -> asyncio.Future[TriggerEvent] | None:
        entry = self.members.get(id(trigger))
        return entry[1] if entry is not None and entry[0] is trigger else None


def _copy(exc: BaseException) -> BaseException:
    """One exception object per member (each raise extends its own traceback)."""
    try:
        twin = copy.copy(exc)
    except Exception:
        return exc
    twin.__cause__, twin.__context__ = exc.__cause__, exc.__context__
    return twin.with_traceback(exc.__traceback__)


def _count(served: list[tuple[int, str]] | None) -> int:
    return 1 if served is None else len(served)
