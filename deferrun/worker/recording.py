"""Recording an attempt's outcome: one store write fenced on (task_id, claim_token).

A fenced write that already committed before a connection dropped makes its repeat a no-op, so
writes are retried freely. Two kinds of failure are told apart:

- the database is unreachable: retry in the slot for ``retry_for`` seconds, then keep the write
  and retry it in the background (with backoff, at once when a heartbeat gets through) for as
  long as the process lives. On shutdown what is left is given up loudly; the reaper retries
  those tasks once this worker counts as dead.
- the store refuses the write itself (a value it cannot hold): the task fails instead, with an
  error that says so. A live worker never leaves a task ``running``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal

import anyio
import structlog

from deferrun.core.models import ClaimedTask, Deferral
from deferrun.exceptions import StoreGone
from deferrun.process.liveness import outage
from deferrun.process.metrics import Metrics
from deferrun.store.base import Store, is_connection_error
from deferrun.store.xcom import XComWrite

log = structlog.get_logger("deferrun.worker")

#: at most this many slots' outcomes share one transaction
GROUP_MAX = 64

Kind = Literal["complete", "fail", "skip", "reschedule", "defer", "requeue"]


@dataclass(frozen=True)
class Write:
    """The one store write that ends an attempt."""

    task_id: str
    claim_token: int
    try_number: int
    kind: Kind
    result: str | None = None
    error: str = ""
    retry: bool = False
    delay: float = 0.0
    deferral: Deferral | None = None
    #: what the attempt pushed: written in the outcome's transaction, kept with it
    xcoms: XComWrite | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.task_id, self.claim_token)

    def failure(self, error: str, retry: bool = False) -> Write:
        return replace(self, kind="fail", error=error, retry=retry, result=None, deferral=None)

    def without_xcoms(self) -> Write:
        return replace(self, xcoms=None)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _args(w: Write) -> tuple[Any, ...]:
    """The arguments of ``w``'s store write (after task id and claim token)."""
    match w.kind:
        case "complete":
            return (w.result,)
        case "fail":
            return (w.error, w.retry)
        case "skip":
            return (w.error or None,)
        case "reschedule":
            return (w.delay,)
        case "defer":
            return (w.deferral,)
    return ()


def _state(w: Write, result: Any) -> str | None:
    """The task's new state from what ``w``'s write returned (None: fenced off)."""
    if w.kind == "fail":
        return None if result is None else str(result)
    if w.kind == "defer":
        return None if result is None else "deferred"
    ended = {"complete": "success", "skip": "skipped", "reschedule": "up_for_reschedule"}
    return ended.get(w.kind, "queued") if result else None


async def apply(store: Store, w: Write) -> str | None:
    """Perform one write; returns the task's new state, or None if the claim was fenced off."""
    t, token, x = w.task_id, w.claim_token, w.xcoms
    match w.kind:
        case "complete":
            return "success" if await store.complete_task(t, token, w.result, x) else None
        case "fail":
            state = await store.fail_task(t, token, w.error, retry=w.retry, xcoms=x)
            return None if state is None else str(state)
        case "skip":
            reason = w.error or None
            return "skipped" if await store.skip_task(t, token, reason, x) else None
        case "reschedule":
            ok = await store.reschedule_task(t, token, w.delay, x)
            return "up_for_reschedule" if ok else None
        case "defer":
            assert w.deferral is not None
            return "deferred" if await store.defer_task(t, token, w.deferral, x) else None
        case "requeue":
            return "queued" if await store.requeue_task(t, token) else None


class ClaimCalls:
    """Claim calls whose answer is not handled yet, and when one last failed.

    A claim whose COMMIT reached the server but whose reply was lost leaves tasks ``running``
    for this worker that it never started. The worker's ownership check finds those; it must
    not mistake a claim whose answer is still on its way for one, hence this ledger.
    """

    def __init__(self) -> None:
        self._next = 0
        #: numbers of the claim calls now waiting for their answer
        self.open: set[int] = set()
        #: monotonic time the last claim call raised (its claims may have committed)
        self.failed_at: float | None = None

    @contextmanager
    def call(self) -> Iterator[None]:
        number, self._next = self._next, self._next + 1
        self.open.add(number)
        try:
            yield
        except BaseException:
            self.failed_at = time.monotonic()
            raise
        finally:
            self.open.discard(number)


class Recorder:
    """Records outcome writes; keeps those a database outage stops and retries them."""

    def __init__(self, store: Store, metrics: Metrics, retry_for: float) -> None:
        self.store = store
        self.metrics = metrics
        self.retry_for = retry_for
        self.pending: dict[tuple[str, int], Write] = {}
        self.closing = anyio.Event()
        self._nudged = anyio.Event()
        #: (worker_id, queues, free slots) for claiming in the same transaction, or None
        self.claim_args: Callable[[int], tuple[str, Sequence[str], int] | None] | None = None
        self.on_claimed: Callable[[list[ClaimedTask]], None] | None = None
        self.claims = ClaimCalls()
        self._queue: list[tuple[Write, asyncio.Future[tuple[Write, str | None]]]] = []
        self._flushing = False

    def nudge(self) -> None:
        """The database answered: retry kept writes now rather than after the backoff."""
        if self.pending:
            self._nudged.set()

    async def record(self, w: Write) -> None:
        """Record in the caller (a slot) for up to ``retry_for`` s, then keep it for later."""
        delay = 0.2
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                await self._write_grouped(w)
                return
            except Exception as exc:
                if isinstance(exc, StoreGone):  # the process is stopping: nothing to retry
                    self._give_up(w, str(exc))
                    return
                if self.closing.is_set() or time.monotonic() + delay > deadline:
                    self._keep(w, exc)
                    return
                if not outage.failed("recording an outcome", exc):
                    log.warning("recording the outcome failed; retrying", error=repr(exc))
                with anyio.move_on_after(delay):
                    await self.closing.wait()
                delay = min(delay * 2, 5.0)

    def _keep(self, w: Write, exc: Exception) -> None:
        if self.closing.is_set():
            self._give_up(w, repr(exc))
            return
        log.error(
            "the database is unreachable; the outcome is kept and recorded when it returns",
            task_id=w.task_id,
            try_number=w.try_number,
            outcome=w.kind,
            error=repr(exc),
        )
        self.pending[w.key] = w

    async def run(self) -> None:
        """Retry kept writes in the background, with backoff, while the process lives."""
        delay = 1.0
        while True:
            with anyio.move_on_after(delay):
                await self._nudged.wait()
            self._nudged = anyio.Event()
            delay = 1.0
            for key, w in list(self.pending.items()):
                try:
                    await self._write(w)
                except Exception as exc:
                    if not outage.failed("recording a kept outcome", exc):
                        log.warning("still cannot record a kept outcome", error=repr(exc))
                    delay = min(delay * 2, 10.0)
                    break
                self.pending.pop(key, None)
                log.info(
                    "recorded an outcome kept through a database outage",
                    task_id=w.task_id,
                    try_number=w.try_number,
                    outcome=w.kind,
                )

    def give_up(self) -> None:
        """At exit: say loudly which outcomes are lost."""
        self.closing.set()
        for w in self.pending.values():
            self._give_up(w, "the database is still unreachable")
        self.pending.clear()

    def _give_up(self, w: Write, why: str) -> None:
        log.error(
            "giving up on recording an outcome as this worker exits; the task is retried "
            "once this worker counts as dead",
            task_id=w.task_id,
            try_number=w.try_number,
            outcome=w.kind,
            error=why,
        )

    async def _write_grouped(self, w: Write) -> None:
        """``_write`` with group commit: writes that wait together share one transaction.

        The first slot to arrive writes for everyone queued behind it, batch after batch,
        while the others wait for their own answer. Each write keeps its claim-token fence;
        a batch the store refuses is written one by one, so one bad outcome fails alone.
        Raises only when the database is unreachable, like ``_write``.
        """
        future: asyncio.Future[tuple[Write, str | None]] = (
            asyncio.get_running_loop().create_future()
        )
        self._queue.append((w, future))
        if not self._flushing:
            self._flushing = True
            try:
                await anyio.sleep(0)  # slots that finish in this loop turn join the batch
                while self._queue:
                    batch, self._queue = self._queue[:GROUP_MAX], self._queue[GROUP_MAX:]
                    await self._flush(batch)
            finally:
                self._flushing = False
        done, state = await future
        self._count(done, state)

    async def _flush(self, batch: list[tuple[Write, asyncio.Future[Any]]]) -> None:
        claim = self.claim_args(len(batch)) if self.claim_args is not None else None
        if len(batch) > 1 or claim is not None:
            writes = [(w.kind, (w.task_id, w.claim_token, *_args(w)), w.xcoms) for w, _ in batch]
            try:
                with self.claims.call() if claim is not None else _nothing():
                    results, claimed = await self.store.record_outcomes(writes, claim)
            except Exception as exc:
                if is_connection_error(exc) or isinstance(exc, StoreGone):
                    for _, future in batch:
                        future.set_exception(exc)
                    return
                log.info(
                    "a group of outcomes was refused; writing them one by one", error=repr(exc)
                )
            else:
                for (w, future), result in zip(batch, results, strict=True):
                    future.set_result((w, _state(w, result)))
                if claimed and self.on_claimed is not None:
                    self.on_claimed(claimed)
                return
        for w, future in batch:
            try:
                future.set_result(await self._write_one(w))
            except Exception as exc:
                future.set_exception(exc)

    async def _write_one(self, w: Write) -> tuple[Write, str | None]:
        with structlog.contextvars.bound_contextvars(task_id=w.task_id, try_number=w.try_number):
            try:
                return w, await apply(self.store, w)
            except Exception as exc:
                if is_connection_error(exc) or isinstance(exc, StoreGone):
                    raise
                return await self._refused(w, exc)

    async def _write(self, w: Write) -> None:
        """Write ``w``; if the store refuses it, fail the task with an error that says why.

        Raises only when the database is unreachable.
        """
        with structlog.contextvars.bound_contextvars(task_id=w.task_id, try_number=w.try_number):
            try:
                state = await apply(self.store, w)
            except Exception as exc:
                if is_connection_error(exc) or isinstance(exc, StoreGone):
                    raise
                w, state = await self._refused(w, exc)
            self._count(w, state)

    async def _refused(self, w: Write, exc: Exception) -> tuple[Write, str | None]:
        log.error(
            "the store refused this outcome; failing the task", outcome=w.kind, error=repr(exc)
        )
        why = f"{type(exc).__name__}: {exc}"
        fallback = w.failure(f"the outcome of this attempt ({w.kind}) could not be stored: {why}")
        fallback = fallback.without_xcoms()  # the refused value may be one of them
        try:
            return fallback, await apply(self.store, fallback)
        except Exception as again:
            if is_connection_error(again):
                raise
            log.error("the store refused the failure too", error=repr(again))
            last = w.failure("the outcome of this attempt could not be stored; see the worker log")
            return last, await apply(self.store, last)

    def _count(self, w: Write, state: str | None) -> None:
        if state is None:
            log.warning("outcome discarded: the task was cancelled or taken over meanwhile")
            return
        self.metrics.tasks.labels(state=state).inc()
        if w.kind == "fail":
            log.warning("task failed", state=state, error=(w.error.splitlines() or [""])[-1])
        elif w.kind == "defer" and w.deferral is not None:
            log.info("task deferred", trigger=w.deferral.classpath, method=w.deferral.method_name)
        elif w.kind == "reschedule":
            log.debug("task rescheduled", delay=w.delay)
        else:
            message = {"complete": "task succeeded", "skip": "task skipped"}
            log.info(message.get(w.kind, "task re-queued"), reason=w.error or None)
