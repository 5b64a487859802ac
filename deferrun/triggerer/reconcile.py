"""Keeping the rows a triggerer holds and the triggers it runs the same.

Every few seconds the triggerer asks the database which triggers it holds: one whose row is
gone (its task cancelled, or adopted by another triggerer after a liveness gap) is stopped
here, and a row held here that nothing runs (a claim whose reply was lost) is released. A
trigger whose outcome waits in the event writer is neither: releasing it would run it again
while its event is about to be stored. With a million live triggers, fetching every held id
took both cores for about 0.2 s each time, so between full passes a count and id-sum check
stands in while it matches.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import structlog

from deferrun.core.models import TaskState
from deferrun.triggerer.gc_freeze import collections_paused

if TYPE_CHECKING:
    from deferrun.store.base import Store
    from deferrun.triggerer.event_writer import EventWriter

log = structlog.get_logger("deferrun.triggerer")

#: reconciling yields after this many triggers (1M in one step stalled the timers ~1 s); the
#: next waits >= RECONCILE_SHARE x the last one's time (seconds at 500,000 live: each claim
#: of a backlog waited on one)
RECONCILE_STEP, RECONCILE_SHARE = 20_000, 10
#: between full reconciles (every held id fetched and compared) a count and id-sum check
#: stands in when it matches; at most this long apart, and only with this few writes under way
FULL_RECONCILE_EVERY, QUICK_CHECK_UNITS = 60.0, 6
#: the reason a trigger is cancelled when a user cancelled its task (not shutdown or failover)
TASK_CANCELLED = "task cancelled"


class LivenessGaps:
    """When this process's heartbeats stalled long enough that it may have been declared dead
    (3/4 of dead_after, a margin): after such a gap, triggers that vanished from its rows may
    have been adopted by another triggerer."""

    def __init__(self, dead_after: float) -> None:
        self.dead_after = dead_after
        self.beat_at: float | None = None  # monotonic
        self.gap_at = float("-inf")

    def beat(self) -> None:
        now = time.monotonic()
        if self.beat_at is not None and now - self.beat_at > self.dead_after * 0.75:
            self.gap_at = now  # we may have been declared dead meanwhile
        self.beat_at = now

    def since(self, moment: float, now: float) -> bool:
        """Whether a gap began after ``moment``, or one is under way at ``now``."""
        return self.gap_at > moment or (
            self.beat_at is not None and now - self.beat_at > self.dead_after * 0.75
        )


class Reconciler:
    """Takes what it compares and acts on: the store and this process's id, the triggers run
    here and the event writer's pending outcomes, ``cancel(run, reason)`` to stop one, and
    the process's liveness gaps."""

    def __init__(
        self,
        store: Store,
        process_id: str,
        running: dict[int, Any],
        writer: EventWriter,
        cancel: Callable[[Any, str], None],
        gaps: LivenessGaps,
    ) -> None:
        self.store = store
        self.process_id = process_id
        self.running = running
        self.writer = writer
        self.cancel = cancel
        self.gaps = gaps
        #: when every trigger run here was last seen held here (monotonic)
        self.reconciled_at = float("-inf")
        #: the next full pass (every held id fetched and compared) is due by then
        self.full_at = float("-inf")

    async def run(self) -> bool:
        """Stop triggers whose row is gone or taken over; release rows we hold but don't run.
        True if that took a full pass (the triggerer paces reconciles by what one costs: the
        check's count is a scan of the held rows too, on the database's side).

        A trigger whose outcome waits in the writer is neither: releasing it would run it
        again while its event is about to be stored.
        """
        if time.monotonic() < self.full_at and await self._held_as_known():
            self.reconciled_at = time.monotonic()
            return False
        self.full_at = time.monotonic() + FULL_RECONCILE_EVERY
        with collections_paused():
            owned = await self.store.owned_trigger_ids(self.process_id)
        checked_at = time.monotonic()
        # Measured once the answer is here: paused or cut off long enough to be declared dead
        # (3/4 of dead_after, a margin), our triggers may have been adopted, and a cancel seen
        # now was the adopter's to act on (it calls on_task_cancelled, not us).
        adoptable = self.gaps.since(self.reconciled_at, checked_at)
        # ids only: ints are not tracked by the cyclic gc, a list of (id, run) tuples is
        for index, trigger_id in enumerate(list(self.running)):
            if index % RECONCILE_STEP == RECONCILE_STEP - 1:
                await anyio.sleep(0)  # 1M live timers: let due ones fire between steps
            if trigger_id not in owned and (run := self.running.get(trigger_id)) is not None:
                log.info("trigger no longer assigned here; cancelling it", trigger_id=trigger_id)
                reason = "removed" if adoptable else await self._removal_reason(run)
                if adoptable and getattr(run, "on_task_cancelled", None):
                    log.warning(
                        "trigger gone after a liveness gap; not calling on_task_cancelled() "
                        "(another triggerer may have adopted it and acts on a cancel)",
                        trigger_id=trigger_id,
                    )
                self.cancel(run, reason)
        self.reconciled_at = checked_at
        strays = []
        for index, tid in enumerate(owned):
            if index % RECONCILE_STEP == RECONCILE_STEP - 1:
                await anyio.sleep(0)
            if tid not in self.running and tid not in self.writer:
                strays.append(tid)
        if strays:
            log.info("releasing triggers assigned here but not running", count=len(strays))
            await self.store.release_triggers(self.process_id, strays)
        return True

    async def _held_as_known(self) -> bool:
        """Whether the rows held here are exactly the triggers run here (or whose outcome
        waits in the writer), by their count and id sum, allowing for the writer's store
        calls under way: fetching 1,000,000 ids and comparing them took both cores for
        about 0.2 s at every reconcile. Any other difference (a trigger removed elsewhere,
        one adopted, a stray claim) means a full reconcile."""
        pending = [t for t in self.writer.pending if t not in self.running]
        count, total = (
            len(self.running) + len(pending),
            sum(self.running) + sum(pending),
        )
        open_before, seq_before = set(self.writer.open_units), self.writer.unit_seq
        held = await self.store.owned_trigger_sum(self.process_id)
        try:
            units = self.writer.possibly_stored(open_before, seq_before)
        except LookupError:
            return False
        if len(units) > QUICK_CHECK_UNITS:
            return False
        for chosen in itertools.product((False, True), repeat=len(units)):
            stored = [u for u, c in zip(units, chosen, strict=True) if c]
            expected = (count - sum(u[0] for u in stored), total - sum(u[1] for u in stored))
            if held == expected:
                return True
        return False

    async def _removal_reason(self, run: Any) -> str:
        """TASK_CANCELLED if a user cancelled the task (asked only of triggers with the hook:
        a run of one trigger, never a timer or a shared run's member)."""
        if getattr(run, "on_task_cancelled", None) is None:
            return "removed"
        info = await self.store.get_task(run.task_id)
        return (
            TASK_CANCELLED if info is not None and info.state is TaskState.CANCELLED else "removed"
        )
