"""The worker process: claims queued tasks, runs each claim in one of N slots, records outcomes.

Running one attempt of operator code (threads, timeouts, hostile exceptions) lives in
deferrun.worker.attempt; writing its outcome (fenced on the claim token, kept through database
outages) in deferrun.worker.recording. This module keeps the slots.

One task never runs twice at once here: the worker tracks every attempt whose code still runs,
by task id. Should it claim a task again while an older attempt of it still runs here (this
worker was reaped after a pause or an outage, and the task came back to it), that older attempt
is stale: it is cancelled, and the new claim waits in its slot for the old code to stop (up to
``supersede_wait`` seconds). If the old code will not stop (stuck in a C call), the new claim is
put back on the queue (not before ``2 * supersede_wait`` seconds, so no worker spins on it),
fenced on its own token, for a worker that can run it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import anyio
import structlog

from deferrun.connections.cache import close_loop_clients
from deferrun.connections.redaction import format_error
from deferrun.core import config, serialization
from deferrun.core.baseoperator import DEFAULT_QUEUE
from deferrun.core.deferral import prepare_deferral
from deferrun.core.models import ClaimedTask
from deferrun.exceptions import SerializationError, SkipTask, TaskDeferred, TaskReschedule
from deferrun.process import containment
from deferrun.process.liveness import heartbeat_loop, new_process_id, outage, register
from deferrun.process.metrics import Metrics
from deferrun.process.watchdog import LoopWatchdog
from deferrun.store.base import Store, Wakeup
from deferrun.worker.attempt import Attempt, Failed, Outcome, Succeeded, run_attempt
from deferrun.worker.attempt_threads import AttemptThreads
from deferrun.worker.context import kill_if_cancelled, load_xcoms, xcom_write
from deferrun.worker.recording import Recorder, Write

log = structlog.get_logger("deferrun.worker")

__all__ = ["Worker"]


class Worker:
    def __init__(
        self,
        store: Store,
        *,
        slots: int = 8,
        queues: Sequence[str] = (DEFAULT_QUEUE,),
        dead_after: float | None = None,
        poll_interval: float | None = None,
        grace_period: float = 30.0,
        process_id: str | None = None,
        metrics: Metrics | None = None,
        record_retry_for: float | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"--slots must be at least 1, got {slots}")
        self.store = store
        self.slots = slots
        self.queues = list(queues) or [DEFAULT_QUEUE]
        self.dead_after = config.dead_after() if dead_after is None else dead_after
        self.health: dict[str, float] = {}
        if record_retry_for is None:
            record_retry_for = config.env_float("DEFERRUN_RECORD_RETRY_FOR", 120.0)
        self.claim_debounce = 0.002
        self.poll_interval = config.idle_poll(store) if poll_interval is None else poll_interval
        self.grace_period = grace_period
        self.supersede_wait = 5.0
        self.max_result_bytes = int(
            config.env_float("DEFERRUN_MAX_RESULT_BYTES", 16 * 2**20, minimum=1)
        )
        self.id = process_id or new_process_id("worker")
        #: slots in use: attempts by (task id, claim token)
        self.running: dict[tuple[str, int], Attempt] = {}
        self.threads = AttemptThreads()
        #: attempts whose operator code may still run here, by task id (threads included)
        self._live: dict[str, list[Attempt]] = {}
        self.tasks_done = 0
        self._stopping = anyio.Event()
        self._wakeup: Wakeup | None = None
        self.started = anyio.Event()
        self.metrics = metrics or Metrics()
        self.metrics.slots.set(slots)
        self.metrics.slots_busy.set_function(lambda: len(self.running))
        self.recorder = Recorder(store, self.metrics, record_retry_for)
        # A slot's next task is claimed in the transaction that records its outcome, on every
        # backend (SQLite too since its claims walk the runnable index: A/B of 10,000-task
        # bursts, last resume 8.4 / 6.1 s with it, 9.5 / 9.6 s without)
        self._claim_in_record = True
        #: claims the database gives this worker that it does not run, first seen with the
        #: claim calls then awaiting their answer
        self._orphans: dict[tuple[str, int], frozenset[int]] = {}

    # -- lifecycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; running tasks get ``grace_period`` seconds, then are re-queued."""
        self._stopping.set()
        if self._wakeup:
            self._wakeup.set()

    async def run(self) -> None:
        containment.install()  # user code's own tasks must not stop this process
        self._wakeup = await register(self.store, self.id, "worker", self.queues, self.slots)
        log.info(
            "worker started",
            worker_id=self.id,
            slots=self.slots,
            queues=self.queues,
            db=config.redact_url(self.store.url),
        )
        self.started.set()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat_loop, name="worker-heartbeat")
                tg.start_soon(self.recorder.run, name="outcome-recorder")
                watchdog = LoopWatchdog.for_current_loop()
                watchdog.describers.append(self._describe_task)
                watchdog.metrics = watchdog.metrics or self.metrics
                tg.start_soon(watchdog.run, name="loop-watchdog")
                async with anyio.create_task_group() as slots_tg:
                    self.recorder.claim_args = self._claim_with_outcomes
                    self.recorder.on_claimed = lambda tasks: self._start_all(slots_tg, tasks)
                    await self._claim_loop(slots_tg)
                    await self._drain()
                self.recorder.give_up()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.store.deregister_process(self.id)
                await close_loop_clients()
            self.threads.close()
            log.info("worker stopped", worker_id=self.id, tasks_done=self.tasks_done)

    async def _claim_loop(self, slots_tg: anyio.abc.TaskGroup) -> None:
        assert self._wakeup is not None
        while not self._stopping.is_set():
            try:
                free = self.slots - len(self.running)
                if free > 0:
                    with self.recorder.claims.call():
                        claimed = await self.store.claim_tasks(self.id, self.queues, free)
                    for task in claimed:  # no await before they are started: see _orphans
                        self._start(slots_tg, task)
                wait = (
                    await self._idle_wait()
                    if self.slots - len(self.running) > 0
                    else self.poll_interval
                )  # slots full: a finishing task wakes us
            except Exception as exc:
                if not outage.failed("claiming tasks", exc):  # an outage is said once
                    log.error("claiming tasks failed; retrying", error=repr(exc))
                wait = self.poll_interval
            if await self._wakeup.wait(wait):
                await anyio.sleep(self.claim_debounce)  # one claim for a burst of arrivals

    async def _idle_wait(self) -> float:
        due = await self.store.next_due(self.queues)
        wait = self.poll_interval
        if due is not None:
            wait = min(wait, max(0.0, due - time.time()) + 0.005)
        return max(wait, 0.005)

    async def _drain(self) -> None:
        """Give running tasks the grace period, then stop the rest; records then give up fast."""
        if self.running:
            log.info(
                "waiting for running tasks to finish",
                count=len(self.running),
                grace_period=self.grace_period,
            )
            with anyio.move_on_after(self.grace_period):
                while self.running:
                    await anyio.sleep(0.05)
        self.recorder.closing.set()
        for attempt in list(self.running.values()):
            if not attempt.recording:
                attempt.cancel("shutdown")

    def _claim_with_outcomes(self, freeing: int) -> tuple[str, Sequence[str], int] | None:
        """Claim for the slots ``freeing`` outcome writes free, in their transaction: a slot
        goes from one task to the next in one round trip (None while stopping)."""
        if self._stopping.is_set() or not self._claim_in_record:
            return None
        free = self.slots - len(self.running) + freeing
        return (self.id, self.queues, free) if free > 0 else None

    def _start_all(self, tg: anyio.abc.TaskGroup, tasks: list[ClaimedTask]) -> None:
        for task in tasks:
            self._start(tg, task)

    def _start(self, tg: anyio.abc.TaskGroup, task: ClaimedTask) -> None:
        attempt = Attempt(task)
        attempt.threads = self.threads
        self.running[attempt.key] = attempt
        older = [a for a in self._live.get(task.id, []) if not a.code_done.is_set()]
        self._live[task.id] = [*older, attempt]
        tg.start_soon(self._run_slot, attempt, older, name=f"task:{task.id}:{task.claim_token}")

    def _describe_task(self, name: str) -> dict[str, Any] | None:
        """Called from the watchdog thread while async task code blocks the loop."""
        if not name.startswith("task:"):
            return None
        task_id, _, token = name[5:].rpartition(":")
        attempt = self.running.get((task_id, int(token))) if token.isdigit() else None
        if attempt is None:
            return None
        return {"task_id": task_id, "operator": attempt.claimed.classpath}

    async def _heartbeat_loop(self) -> None:
        await heartbeat_loop(self.store, self.id, self.dead_after, self._check_owned, self.health)

    async def _check_owned(self) -> None:
        """Stop local runs of tasks that are no longer ours (cancelled, or reassigned), and
        re-queue tasks the database says are ours that we do not run (a claim whose reply
        was lost after its COMMIT)."""
        self.recorder.nudge()  # the database answered a heartbeat
        for task_id in [
            t for t, runs in self._live.items() if all(a.code_done.is_set() for a in runs)
        ]:
            del self._live[task_id]
        failed_at = self.recorder.claims.failed_at
        suspect = failed_at is not None and time.monotonic() - failed_at < 2 * self.dead_after
        if not self.running and not self._orphans and not suspect:
            return  # idle and no claim went astray: no query
        # Only runs that began before we asked can be judged: a claim committing while the
        # query is in flight is ours but absent from its answer.
        asked = time.monotonic()
        owned = await self.store.owned_claims(self.id)
        await self._requeue_orphans(owned)
        for key, attempt in list(self.running.items()):
            if key not in owned and not attempt.recording and attempt.started < asked:
                log.warning(
                    "task is no longer ours (cancelled, or reassigned after a missed "
                    "heartbeat); stopping it",
                    task_id=key[0],
                    try_number=attempt.claimed.try_number,
                )
                attempt.cancel("lost")
                try:
                    await kill_if_cancelled(self.store, attempt)
                except Exception as exc:
                    log.warning("could not check for on_kill", error=repr(exc))

    async def _requeue_orphans(self, owned: set[tuple[str, int]]) -> None:
        """Put back on the queue claims the database gives us that we never started.

        A claim committed before ``owned`` was read was sent before that answer came back: if
        its call has answered since, its tasks were started (no await between) or the call
        raised, its reply lost. So a claim is an orphan once it is absent from our slots and
        kept writes in two checks in a row, and every claim call awaiting its answer at the
        first of them has answered. The fenced requeue keeps the try (try_number unchanged).
        """
        open_now = frozenset(self.recorder.claims.open)
        seen, self._orphans = self._orphans, {}
        for key in owned:
            if key in self.running or key in self.recorder.pending:
                continue
            waited_on = seen.get(key)
            if waited_on is None or waited_on & self.recorder.claims.open:
                self._orphans[key] = open_now if waited_on is None else waited_on
                continue
            log.error(
                "the database says this worker runs a task it never started (a claim's reply "
                "was lost); putting it back on the queue",
                task_id=key[0],
            )
            try:
                await self.store.requeue_task(*key)
            except Exception as exc:
                self._orphans[key] = waited_on
                if not outage.failed("re-queueing an orphaned claim", exc):
                    log.warning("could not re-queue the task; retrying", error=repr(exc))

    # -- one slot -----------------------------------------------------------------------------

    async def _run_slot(self, attempt: Attempt, older: list[Attempt]) -> None:
        task = attempt.claimed
        structlog.contextvars.bind_contextvars(
            task_id=task.id, task_name=task.name, try_number=task.try_number, worker_id=self.id
        )
        outcome: Outcome = None
        timed_out = False  # past execution_timeout, its code still running when it returned
        try:
            with attempt.scope:
                if not await self._older_stopped(older):
                    # back on the queue, not before a while: claiming it again at once would
                    # only find the old attempt still running here
                    outcome = TaskReschedule(2 * self.supersede_wait)
                else:
                    try:
                        attempt.db_url = self.store.url
                        if task.trigger_rule is not None:
                            attempt.upstream = await self.store.upstream_results(task.id)
                        await load_xcoms(self.store, attempt)
                        outcome = await run_attempt(attempt)
                        if attempt.thread_running:
                            timed_out = True
                            await self._timed_out_code_stopped(attempt)
                    except Exception as exc:  # nothing a row holds may stop the worker
                        # could not read its upstreams: later
                        if outage.failed("reading a task's inputs", exc):
                            outcome = None
                        else:
                            log.error("could not run the attempt", error=format_error(exc))
                            outcome = Failed(
                                f"deferrun could not run this attempt:\n{format_error(exc)}",
                                False,
                            )
            # A shutdown while timed-out code was still stopping records the timeout (it
            # uses up its try) rather than putting the same try back on the queue.
            if attempt.cancel_reason and not (timed_out and attempt.cancel_reason == "shutdown"):
                outcome = None
            attempt.recording = True
            try:
                write = self._to_write(task, outcome)
                if outcome is not None:
                    write = replace(write, xcoms=xcom_write(attempt))
            except Exception as exc:
                log.error("could not prepare the outcome", error=format_error(exc))
                write = Write(task.id, task.claim_token, task.try_number, "requeue").failure(
                    f"deferrun could not store this attempt's outcome:\n{format_error(exc)}"
                )
            with anyio.CancelScope(shield=True):
                await self.recorder.record(write)
        finally:
            attempt.end_code()
            self.running.pop(attempt.key, None)
            self.tasks_done += 1
            if self._wakeup:
                self._wakeup.set()

    async def _timed_out_code_stopped(self, attempt: Attempt) -> None:
        """Hold the claim until timed-out code really stops, at most ``grace_period`` s.

        Recording the timeout frees the task for its retry, perhaps on another worker; while
        this try's thread is still blocked in a C call (or swallows the interrupt) that retry
        would run beside it: one task running twice at once.
        """
        with anyio.move_on_after(self.grace_period):
            await attempt.code_done.wait()
            return
        log.error(
            "execution_timeout passed and the attempt's code has not stopped; recording the "
            "timeout now, so a retry may start while that code still runs",
            waited=self.grace_period,
        )

    async def _older_stopped(self, older: list[Attempt]) -> bool:
        """Stop older attempts of this task still running here; False if one will not stop."""
        if not older:
            return True
        log.warning(
            "claimed a task whose older attempt still runs here; stopping that one first",
            older_tries=[a.claimed.try_number for a in older],
        )
        for old in older:
            old.cancel("superseded by a newer claim of the same task")
        with anyio.move_on_after(self.supersede_wait):
            for old in older:
                await old.code_done.wait()
            return True
        log.error(
            "an older attempt of this task did not stop; putting this claim back on the queue",
            waited=self.supersede_wait,
        )
        return False

    def _stored_result(self, value: Any) -> str:
        """The result's JSON, refused over ``max_result_bytes``: a result is stored in the task
        row and read by every client that looks at the task; large data belongs elsewhere."""
        limit = self.max_result_bytes
        if isinstance(value, str | bytes) and len(value) > limit:  # no need to encode it all
            size = len(value)
        else:
            text = serialization.dumps(value, "return value")
            size = len(text) if len(text) > limit else len(text.encode())
            if size <= limit:
                return text
        raise SerializationError(
            f"the return value is {size:,} bytes or more, over the limit of {limit:,} bytes "
            "(DEFERRUN_MAX_RESULT_BYTES); store large data elsewhere and return a reference"
        )

    def _to_write(self, task: ClaimedTask, outcome: Outcome) -> Write:
        """The store write for an outcome; results and triggers are serialized here."""
        base = Write(task.id, task.claim_token, task.try_number, "requeue")
        if outcome is None:  # stopped before it finished: fenced, so a no-op unless still ours
            return base
        if isinstance(outcome, Succeeded):
            try:
                result = self._stored_result(outcome.result)
            except Exception as exc:  # msgspec refuses str/int/float subclasses with TypeError
                why = exc if isinstance(exc, SerializationError) else f"{type(exc).__name__}: {exc}"
                outcome = Failed(f"task result cannot be stored: {why}", retry=False)
            else:
                return Write(task.id, task.claim_token, task.try_number, "complete", result=result)
        if isinstance(outcome, TaskDeferred):
            try:
                deferral = prepare_deferral(outcome)
            except BaseException as exc:  # trigger.serialize() is user code: anything goes
                log.error("cannot defer", error=repr(exc))
                plain = isinstance(exc, SerializationError | ValueError | TypeError)
                why = exc if plain else f"{type(exc).__name__}: {exc}"
                outcome = Failed(f"cannot defer: {why}", retry=False)
            else:
                return Write(task.id, task.claim_token, task.try_number, "defer", deferral=deferral)
        if isinstance(outcome, TaskReschedule):
            return Write(
                task.id, task.claim_token, task.try_number, "reschedule", delay=outcome.delay
            )
        if isinstance(outcome, SkipTask):
            return Write(task.id, task.claim_token, task.try_number, "skip", error=_text(outcome))
        assert isinstance(outcome, Failed)
        return base.failure(outcome.error, outcome.retry)


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception as err:  # a user-defined __str__ that raises
        return f"<{type(exc).__name__}: str() raised {err!r}>"
