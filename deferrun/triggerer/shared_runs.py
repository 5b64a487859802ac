"""Identical triggers run once: one ``run()`` per affinity key in a triggerer.

Tasks that defer on the same trigger (same classpath and kwargs, see ``sharing``) wait on the
same thing, so the triggerer runs that trigger's ``run()`` once for all of them. Each trigger
row is a :class:`Member` in ``Triggerer.running`` (so claims, reconcile, capacity and release
treat it like any trigger); the shared run is a :class:`Group` with one asyncio task. Its first
event (or failure) becomes one outcome per member still waiting, all queued in the same step,
so the event writer stores them in one batch (one transaction). A member that leaves (its
row removed, its deadline passed, shutdown) leaves the rest waiting; the run is cancelled only
when no member is left. A class that sets ``shareable = False`` never groups.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from deferrun.connections.redaction import format_error
from deferrun.core import trigger_keys as sharing
from deferrun.core.basetrigger import BaseTrigger
from deferrun.core.models import ClaimedTrigger
from deferrun.process.containment import TriggerCode
from deferrun.process.watchdog import LoopWatchdog
from deferrun.triggerer import shared_polls
from deferrun.triggerer.trigger_run import Limits, Loaded, Outcome, failure, run_until_event

log = structlog.get_logger("deferrun.triggerer")

#: where outcomes go: ``Triggerer._outcome(outcome, task_id)``
Emit = Callable[[Outcome, str], None]


class Member(TriggerCode):
    """One trigger row served by a shared run; also the lead's code marker (``TriggerCode``)
    while its run() runs, so a live trigger holds one record, not two."""

    __slots__ = ("group",)

    def __init__(self, id: int, task_id: str, classpath: str, group: Group) -> None:
        super().__init__(classpath, id, task_id)
        self.group = group

    @property
    def id(self) -> int:
        return self.trigger_id


@dataclass(slots=True, eq=False)
class Group:
    """One ``run()`` shared by every member with the same affinity key."""

    key: str | int  # the affinity key (see _compact)
    trigger: BaseTrigger  # the lead's trigger: the one whose run() runs
    lead: Member  # the trigger whose object runs: log lines carry its ids
    #: the members by trigger id; None while the lead is the only one (most runs: a dict
    #: per run costs about 220 bytes), created when an identical trigger joins
    members: dict[int, Member] | None = None
    task: asyncio.Task[Outcome] | None = None
    #: the stored poll key (None: not in a shared poll, shown as "<classpath> (identical)")
    poll_key: str | None = None
    owner: Any = None  # the SharedRuns, called back when the run's task is done

    def __call__(self, task: asyncio.Task[Outcome]) -> None:
        self.owner._finished(self, task)

    def served(self) -> list[tuple[int, str]]:
        """The ``(trigger id, task id)`` of every member (``shared_polls.serve``)."""
        return [(m.id, m.task_id) for m in self.waiting()]

    def waiting(self) -> list[Member]:
        """The members still waiting on this run."""
        return [self.lead] if self.members is None else list(self.members.values())

    def count(self) -> int:
        return 1 if self.members is None else len(self.members)

    def add(self, member: Member) -> None:
        if self.members is None:
            self.members = {self.lead.id: self.lead}
        self.members[member.id] = member

    def remove(self, member: Member) -> bool:
        """Take ``member`` out; False if it was not waiting here."""
        if self.members is None:
            if member is not self.lead:
                return False
            self.members = {}
            return True
        return self.members.pop(member.id, None) is not None


class SharedRuns:
    """The groups of one triggerer, and the deadlines of their members."""

    def __init__(
        self,
        running: dict[int, Any],
        emit: Emit,
        limits: Limits,
        watchdog: Callable[[], LoopWatchdog | None],
    ) -> None:
        self.running = running
        self.emit = emit
        self.limits = limits
        self.watchdog = watchdog
        self.groups: dict[str | int, Group] = {}
        #: runs cancelled but not ended yet (their cleanup may still run), and hook tasks:
        #: what shutdown waits for besides the runs in ``groups``
        self.tasks: set[asyncio.Task[Any]] = set()
        #: (due, seq, member, joined at): a member's start time is kept only when it has a
        #: deadline (its timeout message says how long it ran)
        self._deadlines: list[tuple[float, int, Member, float]] = []
        self._seq = itertools.count()
        self._deadline_changed = anyio.Event()
        self._callback_context = contextvars.copy_context()  # one for every done callback
        self._describe = self.describe  # one bound method for every run, not one each

    @staticmethod
    def accepts(loaded: Loaded) -> bool:
        return sharing.shareable(type(loaded.trigger))

    def join(self, claimed: ClaimedTrigger, loaded: Loaded) -> Member:
        """Put ``claimed`` in the group of its identical triggers (a new one if none runs)."""
        # the key stored at deferral is the one claims group by; computed only for rows
        # stored without one
        key = _compact(claimed.affinity or sharing.affinity_key(loaded.classpath, claimed.kwargs))
        group = self.groups.get(key)
        if group is None:
            lead = Member(claimed.id, claimed.task_id, loaded.classpath, None)  # type: ignore[arg-type]
            group = lead.group = Group(
                key, loaded.trigger, lead, poll_key=_poll_key(loaded), owner=self
            )
            self.groups[key] = group
            if group.poll_key is not None:  # only a shared poll asks whom a run serves
                shared_polls.serve(loaded.trigger, group.served)
            task = asyncio.get_running_loop().create_task(
                run_until_event(
                    loaded.trigger, lead, self.limits, None, self.watchdog(), self._describe
                ),
                name=f"trigger:{claimed.id}",
            )
            group.task = task
            # also when cancelled before its first step
            task.add_done_callback(group, context=self._callback_context)
            member = lead
        else:
            member = Member(claimed.id, claimed.task_id, loaded.classpath, group)
            group.add(member)
            log.debug(
                "trigger joined an identical running trigger",
                trigger_id=claimed.id,
                lead=group.lead.id,
                members=group.count(),
            )
        if claimed.timeout_in is not None:
            now = time.monotonic()
            due = now + max(float(claimed.timeout_in), 0.0)
            if not self._deadlines or due < self._deadlines[0][0]:
                self._deadline_changed.set()
            heapq.heappush(self._deadlines, (due, next(self._seq), member, now))
        return member

    def leave(self, member: Member) -> None:
        """``member`` stops waiting (removed, shutdown); the run stops once nobody waits."""
        group = member.group
        if not group.remove(member):
            return
        if self.running.get(member.id) is member:
            del self.running[member.id]
        if not group.count():
            self._close(group)

    def size(self, trigger_id: int) -> int:
        """How many tasks the run that serves ``trigger_id`` waits for (1 when not shared)."""
        member = self.running.get(trigger_id)
        return member.group.count() if isinstance(member, Member) else 1

    def snapshot(self) -> list[tuple[str, int, int]]:
        """``(name, distinct triggers, tasks)`` per class of identical triggers not in a shared
        poll, named and counted as ``deferrun triggers`` shows them (two or more tasks)."""
        rows: dict[str, list[int]] = {}
        for group in list(self.groups.values()):
            if group.poll_key is None:
                row = rows.setdefault(f"{group.lead.classpath} (identical)", [0, 0])
                row[0] += 1
                row[1] += group.count()
        return [(name, groups, tasks) for name, (groups, tasks) in rows.items() if tasks > 1]

    def describe(self, name: str) -> dict[str, Any]:
        """Watchdog describer: the trigger behind a shared run's task ``trigger:<lead>``."""
        if not name.startswith("trigger:"):
            return {}
        name = ":".join(name.split(":", 2)[:2])  # trigger:<lead>:cleanup is the lead's code too
        for group in self.groups.values():
            if group.task is not None and group.task.get_name() == name:
                lead = group.lead
                return {
                    "trigger_id": lead.id,
                    "task_id": lead.task_id,
                    "trigger": lead.classpath,
                    "tasks_waiting": group.count(),
                }
        return {}

    def _close(self, group: Group) -> None:
        if self.groups.get(group.key) is group:
            del self.groups[group.key]
        if group.task is not None and not group.task.done():
            self.tasks.add(group.task)  # shutdown waits for its cleanup
            group.task.cancel()

    def _finished(self, group: Group, task: asyncio.Task[Outcome]) -> None:
        """Done callback of a shared run's task: one outcome per member still waiting, all in
        this one step (a callback, not a coroutine around the run: one frame less per run)."""
        self.tasks.discard(task)
        if group.poll_key is not None:
            shared_polls.unserve(group.trigger)
        if self.groups.get(group.key) is group:
            del self.groups[group.key]
        lead = group.lead
        outcome: Outcome
        if task.cancelled():
            log.info(
                "trigger cancelled: no task waits on it any more",
                trigger_id=lead.id,
                task_id=lead.task_id,
            )
            return
        exc = task.exception()
        if exc is None:
            outcome = task.result()
        else:  # run_until_event turns the trigger's own errors into outcomes
            log.error(
                "internal error running a trigger",
                error=format_error(exc),
                trigger_id=lead.id,
                task_id=lead.task_id,
            )
            outcome = failure(
                lead.id, f"triggerer internal error running {lead.classpath}: {exc!r}"
            )
        members = group.waiting()
        group.members = {}
        if len(members) > 1:
            log.info(
                "shared trigger run ended; every waiting task gets its outcome",
                tasks=len(members),
                trigger_id=lead.id,
                task_id=lead.task_id,
            )
        for member in members:  # one step: the writer stores them in one batch
            if self.running.get(member.id) is member:
                del self.running[member.id]
                self.emit(_for(outcome, member.id), member.task_id)

    async def run_deadlines(self) -> None:
        """Time out members whose deferral deadline passed; the others keep waiting."""
        while True:
            now = time.monotonic()
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, member, started = heapq.heappop(self._deadlines)
                if self.running.get(member.id) is not member:
                    continue  # fired, left or replaced meanwhile
                self.leave(member)
                self.emit(
                    failure(
                        member.id,
                        f"deferral timed out: trigger {member.id} ({member.classpath}) did not "
                        f"fire within its timeout (ran {now - started:.1f}s here)",
                        timeout=True,
                    ),
                    member.task_id,
                )
            wait = min(self._deadlines[0][0] - now, 1.0) if self._deadlines else 1.0
            self._deadline_changed = anyio.Event()
            with anyio.move_on_after(max(wait, 0.0)):
                await self._deadline_changed.wait()


def _compact(key: str) -> str | int:
    """An affinity key as ``sharing.affinity_key`` makes it (32 lowercase hex digits) as an
    int: 44 bytes instead of 81 for each live run; any other text stays as it is (a str never
    equals an int, so the two kinds cannot collide)."""
    if len(key) == 32 and key.isascii() and key.isalnum() and key == key.lower():
        try:
            return int(key, 16)
        except ValueError:
            pass  # not hex: used as it is
    return key


def _poll_key(loaded: Loaded) -> str | None:
    try:
        return sharing.poll_key_of(loaded.trigger)
    except Exception as exc:  # run() meets the same error and fails the group with it
        log.debug("shared_poll_key() raised", trigger=loaded.classpath, error=repr(exc))
        return None


def _for(outcome: Outcome, trigger_id: int) -> Outcome:
    """``outcome`` addressed to another member of the same group."""
    if outcome.trigger_id == trigger_id:
        return outcome
    return Outcome(
        trigger_id, outcome.method, outcome.payload, outcome.error, None, outcome.end_state
    )
