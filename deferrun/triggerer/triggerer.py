"""The triggerer process: claims triggers, runs them, and hands their outcomes to the writer.

The parts live in their own modules: ``trigger_run`` runs one trigger to its first event (and
turns every misbehaviour into a failure of that trigger's task alone), ``timer_heap`` holds
time triggers without a coroutine each, ``event_writer`` stores outcomes. This module keeps
claiming, reconciling with the store and the process lifecycle. A trigger id lives in
exactly one place here: ``running`` (a task or a timer) or ``writer.pending`` (fired, not yet
written); it is never started twice nor released while in either.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Sequence
from typing import Any

import anyio
import structlog

from deferrun.connections.cache import close_loop_clients
from deferrun.connections.redaction import format_error
from deferrun.core import config
from deferrun.core.basetrigger import BaseTrigger, poll_outcome
from deferrun.core.models import ClaimedTrigger
from deferrun.process import containment
from deferrun.process.containment import TriggerCode
from deferrun.process.liveness import heartbeat_loop, new_process_id, outage, register
from deferrun.process.metrics import Metrics
from deferrun.process.watchdog import LoopWatchdog
from deferrun.store.base import Store, Wakeup, is_connection_error
from deferrun.triggerer import reconcile, shared_polls
from deferrun.triggerer.event_writer import EventWriter
from deferrun.triggerer.gc_freeze import LoadedFreezer
from deferrun.triggerer.health import FLUSH_EVERY, PollHealth
from deferrun.triggerer.hooks import bounded
from deferrun.triggerer.outcomes import OutcomeLog
from deferrun.triggerer.reconcile import TASK_CANCELLED, LivenessGaps, Reconciler
from deferrun.triggerer.shared_runs import Member, SharedRuns
from deferrun.triggerer.timers import Timer, TimerHeap, fire_timers, timer_for
from deferrun.triggerer.trigger_run import (
    Limits,
    Outcome,
    failure,
    load,
    max_event_bytes_from_env,
    run_until_event,
)

log = structlog.get_logger("deferrun.triggerer")

#: most triggers one claim takes; a full batch claims again at once. Triggerers that start
#: together then share a backlog (each claim's fair share counts the live triggerers anew)
#: instead of the first one up taking all of it.
CLAIM_BATCH = 5000
WRITER_UNHEALTHY_AFTER = 5.0  # /healthz fails once outcomes have failed to store this long


class _Live(dict[int, "_Running | Timer | Member"]):
    """The live triggers by id; a removal calls ``freed`` so a full triggerer, which has nothing
    to claim into, sleeps until a slot frees instead of spinning on a claim it cannot make."""

    def __init__(self) -> None:
        super().__init__()
        self.freed: Any = None

    def __delitem__(self, key: int) -> None:
        super().__delitem__(key)
        if self.freed is not None:
            self.freed()

    def pop(self, key: int, *default: Any) -> Any:
        value = super().pop(key, *default)
        if self.freed is not None:
            self.freed()
        return value


class _Running(TriggerCode):
    """A trigger whose ``run()`` executes as its own asyncio task ``trigger:<id>``; also its
    code marker (``TriggerCode``) while that runs: one record per live trigger, not two."""

    __slots__ = ("cancel_reason", "on_task_cancelled", "owner", "task")

    def __init__(self, id: int, task_id: str, classpath: str, owner: Any = None) -> None:
        super().__init__(classpath, id, task_id)
        self.task: asyncio.Task[Outcome] | None = None
        self.cancel_reason: str | None = None
        #: the trigger's own on_task_cancelled(), when it overrides BaseTrigger's (else None)
        self.on_task_cancelled: Any = None
        #: called with the task once it is done (Triggerer._finished); no partial per trigger
        self.owner = owner

    @property
    def id(self) -> int:
        return self.trigger_id

    def __call__(self, task: asyncio.Task[Outcome]) -> None:
        self.owner._finished(self, task)


class Triggerer:
    def __init__(
        self,
        store: Store,
        *,
        capacity: int = 1000,
        queues: Sequence[str] = (),
        dead_after: float | None = None,
        poll_interval: float | None = None,
        reconcile_interval: float = 5.0,
        block_threshold: float = 0.2,
        cleanup_timeout: float | None = None,
        grace_period: float | None = None,
        max_event_bytes: int | None = None,
        process_id: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"--capacity must be at least 1, got {capacity}")
        self.store = store
        self.capacity = capacity
        self.queues = list(queues)
        self.dead_after = config.dead_after() if dead_after is None else dead_after
        self.health: dict[str, float] = {}
        self.poll_interval = config.idle_poll(store) if poll_interval is None else poll_interval
        self.reconcile_interval = self._reconcile_every = reconcile_interval
        self.claim_debounce = 0.02
        if cleanup_timeout is None:
            cleanup_timeout = config.env_float("DEFERRUN_TRIGGER_CLEANUP_TIMEOUT", 10.0)
        self.cleanup_timeout = cleanup_timeout
        self.grace_period = (
            config.env_float("DEFERRUN_TRIGGERER_GRACE_PERIOD", 30.0)
            if grace_period is None
            else grace_period
        )
        self.limits = Limits(
            max_event_bytes=max_event_bytes or max_event_bytes_from_env(),
            cleanup_timeout=cleanup_timeout,
        )
        self.id = process_id or new_process_id("triggerer")
        self.running: dict[int, _Running | Timer | Member] = _Live()
        self.running.freed = self._slot_freed  # type: ignore[attr-defined]
        self._waiting_full = False  # the claim loop sleeps at capacity (see _slot_freed)
        self.timers = TimerHeap()
        self.writer = EventWriter(store)
        self.shared = SharedRuns(self.running, self._outcome, self.limits, lambda: self.watchdog)
        self.writer_unhealthy_after = WRITER_UNHEALTHY_AFTER
        self._freezer = LoadedFreezer()
        # liveness gaps (monotonic): after one, vanished triggers may have been adopted
        self.gaps = LivenessGaps(self.dead_after)
        self.reconciler = Reconciler(
            store, self.id, self.running, self.writer, self._cancel, self.gaps
        )
        self.block_threshold = block_threshold
        self.metrics = metrics or Metrics()
        self.outcomes = OutcomeLog(self.metrics)
        self.metrics.triggers_running.set_function(lambda: len(self.running))
        self.metrics.capacity_left.set_function(lambda: self.capacity - len(self.running))
        self.metrics.health_checks.append(self.writer_health)
        self.metrics.event_write_failing.set_function(self.writer.failing_for)
        self.writer.on_failed = self.metrics.event_write_failures.inc
        #: each trigger's poll health, stored in batches (``_health_loop``)
        self.poll_health = PollHealth()
        self.metrics.watch_failing_triggers(self.poll_health.by_class)
        self.started = anyio.Event()
        self._stopping = anyio.Event()
        self._wakeup: Wakeup | None = None
        self.watchdog: LoopWatchdog | None = None
        #: done callbacks of trigger tasks share one context instead of a copy each
        self._callback_context = contextvars.copy_context()
        self._describe = self._describe_task  # one bound method for every run, not one each

    # -- lifecycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming, cancel every trigger (running cleanup) and release them."""
        self._stopping.set()
        if self._wakeup:
            self._wakeup.set()

    def writer_health(self) -> tuple[bool, dict[str, Any]]:
        failing = self.writer.failing_for()
        details: dict[str, Any] = {
            "events_pending_write": len(self.writer.pending),
            "events_write_failing_seconds": round(failing, 3),
        }
        if failing:
            details["events_write_error"] = self.writer.last_error
        return failing < self.writer_unhealthy_after, details

    async def run(self) -> None:
        containment.install()  # user code's own tasks must not stop this process
        self.outcomes.start()
        self._wakeup = await register(self.store, self.id, "triggerer", self.queues, self.capacity)
        log.info(
            "triggerer started",
            triggerer_id=self.id,
            capacity=self.capacity,
            queues=self.queues or "all",
            db=config.redact_url(self.store.url),
        )
        self.started.set()
        health_token = poll_outcome.set(self.poll_health)  # every trigger task inherits it
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat_loop, name="triggerer-heartbeat")
                tg.start_soon(self._health_loop, name="trigger-health")
                watchdog = LoopWatchdog.for_current_loop(self.block_threshold)
                watchdog.describers.append(self._describe_task)
                watchdog.describers.append(self.shared.describe)
                watchdog.metrics = watchdog.metrics or self.metrics
                self.watchdog = watchdog
                loop = asyncio.get_running_loop()
                self.metrics.watch_shared_polls(
                    lambda: shared_polls.snapshot(loop) + self.shared.snapshot()
                )
                tg.start_soon(watchdog.run, name="loop-watchdog")
                tg.start_soon(self.writer.run, name="event-writer")
                tg.start_soon(self._timer_loop, name="timers")
                tg.start_soon(self.shared.run_deadlines, name="shared-run-deadlines")
                try:
                    await self._main_loop()
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._shutdown()
                tg.cancel_scope.cancel()
        finally:
            poll_outcome.reset(health_token)
            with anyio.CancelScope(shield=True):
                await close_loop_clients()
                try:
                    await self.store.deregister_process(self.id)
                except Exception as exc:
                    log.error(
                        "could not release triggers at shutdown; they will be adopted "
                        f"after {self.dead_after:g}s",
                        error=repr(exc),
                    )
            log.info(
                "triggerer stopped",
                triggerer_id=self.id,
                events=self.outcomes.events_total,
                failures=self.outcomes.failures_total,
            )

    async def _shutdown(self) -> None:
        """Cancel every trigger, wait (bounded) for cleanups, then for pending writes."""
        deadline = time.monotonic() + self.grace_period
        tasks = []
        for run in list(self.running.values()):
            self._cancel(run, "shutdown")
            if isinstance(run, _Running) and run.task is not None:
                tasks.append(run.task)
        tasks += self.shared.tasks
        if tasks:
            wait = min(self.cleanup_timeout + 1.0, max(self.grace_period - 1.0, 0.1))
            _, stuck = await asyncio.wait(tasks, timeout=wait)
            if stuck:
                log.error(
                    f"{len(stuck)} trigger(s) did not end within {wait:g}s of cancellation "
                    "(they ignore cancellation); abandoned",
                    triggers=sorted(t.get_name() for t in stuck)[:20],
                )
        self.writer.close()
        with anyio.move_on_after(max(deadline - time.monotonic(), 0.5)) as scope:
            await self._writer_drained()
        if scope.cancelled_caught:
            log.error(
                "grace period over with trigger outcomes not stored; their triggers are "
                "released and will run again elsewhere",
                pending=len(self.writer.pending),
            )

    async def _writer_drained(self) -> None:
        delay = 0.01
        while self.writer.pending:
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _main_loop(self) -> None:
        assert self._wakeup is not None
        last_reconcile = last_claim = time.monotonic()
        claim = True
        got = 0
        full = False
        while not self._stopping.is_set():
            try:
                free = self.capacity - len(self.running)
                if free > 0 and claim:
                    last_claim = time.monotonic()
                    limit = min(free, CLAIM_BATCH)
                    batch = await self.store.claim_triggers(self.id, self.queues, limit)
                    # the batch cap, not capacity, stopped it: more may be waiting
                    got, full = len(batch), limit < free and len(batch) >= limit
                    for claimed in batch:
                        self._start_one(claimed)
                    self._freezer.loaded(len(self.running))
                    claim = False  # done; the next one is due after the wait below
                since, every = time.monotonic() - last_reconcile, self._reconcile_every
                if since >= every and (not full or since >= 6 * every):  # backlog claims first
                    last_reconcile = time.monotonic()
                    if await self._reconcile():  # paced by what a full pass costs
                        took = time.monotonic() - last_reconcile
                        self._reconcile_every = max(
                            self.reconcile_interval, reconcile.RECONCILE_SHARE * took
                        )
            except Exception as exc:
                if not outage.failed("claiming triggers", exc):
                    log.error("claiming triggers failed; retrying", error=repr(exc))
                full = False
                last_claim = time.monotonic() - self.poll_interval + 1.0  # again in 1 s
                # A claim whose COMMIT landed but whose reply was lost left rows assigned here
                # that nothing runs: reconcile in 1 s too, releasing them, not in up to 5 s.
                last_reconcile = min(last_reconcile, time.monotonic() - self._reconcile_every + 1)
            # Reconciling keeps its own pace (it stops the triggers of cancelled tasks); a
            # claim waits for a wake-up or the poll interval, which is long on PostgreSQL.
            # A claim that found triggers may have left more (its fair share of a dead
            # triggerer's release, say): look again after 1 s, not the long idle interval.
            now = time.monotonic()
            after = 0.0 if full else min(1.0, self.poll_interval) if got else self.poll_interval
            next_claim = last_claim + after
            reconcile_at = last_reconcile + self._reconcile_every
            if len(self.running) >= self.capacity:
                # No slot to claim into: a claim that is due cannot happen, so sleep until a
                # trigger ends (``_slot_freed``), a notification or reconcile is due. A claim
                # already due (or notified) stays due and runs once a slot frees.
                self._waiting_full = True
                try:
                    woken = await self._wakeup.wait(max(reconcile_at - now, 0.0))
                finally:
                    self._waiting_full = False
                claim = claim or woken or time.monotonic() >= next_claim
                full = False  # no backlog can be taken at capacity
                continue
            wait = min(next_claim, reconcile_at) - now
            woken = await self._wakeup.wait(max(wait, 0.0))
            claim = woken or time.monotonic() >= next_claim
            if woken:
                # Deferrals arrive in bursts, one notification each: gather them for one
                # claim instead of one claim per trigger (not on the event->resume path).
                await anyio.sleep(self.claim_debounce)

    def _slot_freed(self) -> None:
        """A trigger ended: wake the claim loop if it sleeps at capacity."""
        if self._waiting_full and self._wakeup is not None:
            self._waiting_full = False
            self._wakeup.set()

    async def _reconcile(self) -> bool:
        return await self.reconciler.run()

    async def _health_loop(self) -> None:
        """Store what changed in the triggers' poll health, one batch every FLUSH_EVERY s."""
        while True:
            await anyio.sleep(FLUSH_EVERY)
            rows = self.poll_health.take(self.running)
            if not rows:
                continue
            try:
                await self.store.record_trigger_health(self.id, rows)
            except Exception as exc:
                self.poll_health.put_back(rows)
                if not is_connection_error(exc):  # an outage is logged once, elsewhere
                    log.warning("storing trigger health failed; retrying", error=repr(exc))

    async def _heartbeat_loop(self) -> None:
        self.gaps.beat_at = time.monotonic()  # registered just now: a beat of sorts
        await heartbeat_loop(self.store, self.id, self.dead_after, self._on_beat, self.health)

    async def _on_beat(self) -> None:
        self.gaps.beat()

    def _describe_task(self, name: str) -> dict[str, Any]:
        """Called from the watchdog thread while the loop is blocked in task ``name``
        (``trigger:<id>``, or ``trigger:<id>:cleanup`` and the like for its other code)."""
        if not name.startswith("trigger:"):
            return {}
        try:
            run = self.running.get(int(name.split(":", 2)[1]))
        except ValueError:
            return {}
        if not isinstance(run, _Running):
            return {}
        return {"trigger_id": run.id, "task_id": run.task_id, "trigger": run.classpath}

    # -- one trigger --------------------------------------------------------------------------

    def _start_one(self, claimed: ClaimedTrigger) -> None:
        """Start one claimed trigger; whatever goes wrong fails that trigger alone."""
        began = time.monotonic()
        try:
            self._start(claimed)
        except Exception as exc:
            log.error("could not start a trigger", trigger_id=claimed.id, error=repr(exc))
            self._outcome(
                failure(claimed.id, f"deferrun could not start this trigger: {exc!r}"),
                claimed.task_id,
            )
        took = time.monotonic() - began
        # its __init__ or timer() ran on the loop that long, unless the process was stopped
        if took > self.block_threshold and not (
            self.watchdog is not None and self.watchdog.paused_during(began, began + took)
        ):
            log.warning(
                "a trigger blocked the event loop while it was rebuilt (__init__ or timer()); "
                "do no blocking work there",
                trigger_id=claimed.id,
                task_id=claimed.task_id,
                trigger=claimed.classpath,
                seconds=round(took, 2),
            )

    def _start(self, claimed: ClaimedTrigger) -> None:
        tid = claimed.id
        if tid in self.running or tid in self.writer:
            log.info(
                "trigger claimed again while it still runs or its outcome waits to be stored "
                "here; not starting it twice",
                trigger_id=tid,
            )
            return
        loaded = load(claimed, self.limits)
        if isinstance(loaded, Outcome):
            self._outcome(loaded, claimed.task_id)
            return
        if loaded.timer is not None:
            timer = self.running[tid] = timer_for(claimed, *loaded.timer)
            self.timers.push(timer)
            return
        if self.shared.accepts(loaded):  # identical triggers share one run()
            self.running[tid] = self.shared.join(claimed, loaded)
            return
        run = _Running(tid, claimed.task_id, loaded.classpath, owner=self)
        if type(loaded.trigger).on_task_cancelled is not BaseTrigger.on_task_cancelled:
            run.on_task_cancelled = loaded.trigger.on_task_cancelled
        self.running[tid] = run
        task = asyncio.get_running_loop().create_task(
            run_until_event(
                loaded.trigger, run, self.limits, claimed.timeout_in, self.watchdog, self._describe
            ),
            name=f"trigger:{tid}",
        )
        run.task = task
        task.add_done_callback(run, context=self._callback_context)

    def _finished(self, run: _Running, task: asyncio.Task[Outcome]) -> None:
        """Done callback of a trigger's task: out of ``running`` and into the writer at once.

        A callback rather than a coroutine around ``run_until_event``: one frame less for every
        live trigger. Ids are passed to the log calls (this runs outside the trigger's context).
        """
        if self.running.get(run.id) is run:
            del self.running[run.id]
        ids = {"trigger_id": run.id, "task_id": run.task_id}
        outcome: Outcome | None
        # A trigger may answer its cancellation with an event (``except CancelledError:
        # yield ...``, as Airflow triggers often do): its task was cancelled all the same.
        if task.cancelled() or run.cancel_reason == TASK_CANCELLED:
            log.info("trigger cancelled", reason=run.cancel_reason, **ids)
            if run.cancel_reason == TASK_CANCELLED and run.on_task_cancelled is not None:
                self._call_hook(run)
            return
        exc = task.exception()
        if exc is None:
            outcome = task.result()
        else:  # run_until_event turns the trigger's own errors into outcomes
            log.error("internal error running a trigger", error=format_error(exc), **ids)
            outcome = failure(run.id, f"triggerer internal error running {run.classpath}: {exc!r}")
        # A failure after we cancelled it is dropped: the trigger may be running elsewhere
        # now; an event still counts.
        if outcome.fired or run.cancel_reason is None:
            self._outcome(outcome, run.task_id)

    def _call_hook(self, run: _Running) -> None:
        """Run the trigger's on_task_cancelled() (bounded) in a task marked as its code."""
        context = contextvars.copy_context()
        context.run(containment.enter_trigger, run)
        hook = bounded(
            run.on_task_cancelled, self.cleanup_timeout, run.classpath, "on_task_cancelled()"
        )
        task = asyncio.get_running_loop().create_task(
            hook, name=f"trigger:{run.id}:on_task_cancelled", context=context
        )
        self.shared.tasks.add(task)  # shutdown waits for it like for a shared run
        task.add_done_callback(self.shared.tasks.discard)

    async def _timer_loop(self) -> None:
        await fire_timers(self.timers, self.running, self._outcome, self.metrics.fire_lateness)

    def _cancel(self, run: _Running | Timer | Member, reason: str) -> None:
        if isinstance(run, Member):
            self.shared.leave(run)
            return
        if isinstance(run, Timer):
            self.timers.remove(run.id)
            self.running.pop(run.id, None)
            return
        if run.cancel_reason is None:
            run.cancel_reason = reason
        if run.task is not None:
            run.task.cancel()

    def _outcome(self, outcome: Outcome, task_id: str | None = None, timer: bool = False) -> None:
        """Count and log ``outcome`` and queue it for writing (in the trigger's own step)."""
        self.outcomes.record(outcome, task_id, timer)
        self.writer.put(outcome)
