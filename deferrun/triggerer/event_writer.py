"""Writes trigger outcomes (events and failures) to the store, in batches, never twice in flight.

``pending`` holds every outcome not yet written: the triggerer consults it so a trigger that
fired is neither released nor started again while its event waits here. A batch that fails
on a connection-level error is retried with backoff (the database will come back). Any other
error means some item in it can never be written: the batch is split item by item and only
the poisoned item's task is failed, so one bad trigger cannot stall everyone else's events.
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import structlog

from deferrun.connections.redaction import format_error
from deferrun.core import serialization
from deferrun.process.liveness import outage
from deferrun.store.base import Store, is_connection_error
from deferrun.triggerer.trigger_run import ENDED, FAILED, Outcome

log = structlog.get_logger("deferrun.triggerer")

BATCH = 2000
MAX_BACKOFF = 5.0
#: store calls remembered for a reconcile's quick check (one batch makes up to 3)
UNITS_KEPT = 64


class EventWriter:
    def __init__(self, store: Store, *, batch_size: int = BATCH) -> None:
        self.store = store
        self.batch_size = batch_size
        self.pending: dict[int, Outcome] = {}
        self._order: deque[int] = deque()
        self._ready = anyio.Event()
        self._closed = False
        self.failing_since: float | None = None  # monotonic; set while writes keep failing
        self.last_error: str | None = None
        self.written = 0
        self.dropped = 0
        #: each store call's ids by a sequence number: the recent ones, and
        #: those whose ids are still pending (their transaction may have committed already);
        #: a reconcile's quick check allows for them (``possibly_stored``)
        self.units: deque[tuple[int, frozenset[int]]] = deque(maxlen=UNITS_KEPT)
        self.unit_seq = 0
        self.open_units: set[int] = set()
        #: called at each failed write (the triggerer counts them for its metrics)
        self.on_failed: Callable[[], None] | None = None

    def __contains__(self, trigger_id: int) -> bool:
        return trigger_id in self.pending

    def put(self, outcome: Outcome) -> bool:
        """Queue ``outcome``; False (and ignored) if one for that trigger is already queued."""
        if outcome.trigger_id in self.pending:
            log.warning(
                "second outcome for a trigger already waiting to be written; ignored",
                trigger_id=outcome.trigger_id,
            )
            return False
        self.pending[outcome.trigger_id] = outcome
        self._order.append(outcome.trigger_id)
        self._ready.set()
        return True

    def close(self) -> None:
        """No more outcomes: ``run`` returns once everything pending is written."""
        self._closed = True
        self._ready.set()

    def failing_for(self) -> float:
        """Seconds the writer has been failing to write pending outcomes (0 when fine)."""
        if self.failing_since is None or not self.pending:
            return 0.0
        return time.monotonic() - self.failing_since

    async def run(self) -> None:
        delay = 0.1
        while True:
            if not self._order:
                if self._closed:
                    return
                await self._ready.wait()
                self._ready = anyio.Event()
                continue
            batch = [self._order.popleft() for _ in range(min(self.batch_size, len(self._order)))]
            try:
                await self._write([self.pending[tid] for tid in batch])
            except Exception as exc:
                if not is_connection_error(exc):
                    log.error(
                        "a batch of trigger outcomes was refused; writing them one by one",
                        error=repr(exc),
                        batch=len(batch),
                    )
                    batch = await self._write_one_by_one(batch)
                if batch:  # the database is unreachable: keep them, back off, retry
                    self._failed(exc, len(self.pending))
                    self._order.extendleft(reversed(batch))
                    await anyio.sleep(delay)
                    delay = min(delay * 2, MAX_BACKOFF)
                    continue
            else:
                self._done(batch)
            delay = 0.1
            self.failing_since = None

    async def _write(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            if o.hooked is not None and not o.stored:
                # alone, so that its on_event_written() hears whether its own event was stored
                # (the store drops one whose task another triggerer resumed meanwhile)
                o.stored = await self._write_batch([o]) > 0
        await self._write_batch([o for o in outcomes if o.hooked is None])

    async def _write_batch(self, outcomes: list[Outcome]) -> int:
        """Store ``outcomes`` in up to three store calls; how many of them took effect."""
        written = 0
        events = [(o.trigger_id, o.payload) for o in outcomes if o.fired]
        ended = [
            (o.trigger_id, o.end_state or "failed", o.payload, o.error)
            for o in outcomes
            if o.method == ENDED
        ]
        failures = [
            (o.trigger_id, o.method, o.payload)
            for o in outcomes
            if not o.fired and o.method != ENDED
        ]
        if events:
            self._unit([e[0] for e in events])
            written += await self.store.fire_triggers(events)
        if ended:
            self._unit([e[0] for e in ended])
            written += await self.store.end_triggers(ended)
        if failures:
            self._unit([f[0] for f in failures])
            written += await self.store.fail_triggers(failures)
        return written

    def _unit(self, ids: list[int]) -> None:
        self.unit_seq += 1
        self.units.append((self.unit_seq, frozenset(ids)))
        self.open_units.add(self.unit_seq)

    def possibly_stored(self, open_before: set[int], seq_before: int) -> list[tuple[int, int]]:
        """(count, id sum) of each store call that may have committed since a moment when
        ``open_before`` were open and ``seq_before`` was the last sequence number; LookupError
        when one of them is no longer kept."""
        known = dict(self.units)
        wanted = [q for q in open_before if q <= seq_before] + list(
            range(seq_before + 1, self.unit_seq + 1)
        )
        if any(q not in known for q in wanted):
            raise LookupError("a store call is no longer known")
        return [(len(known[q]), sum(known[q])) for q in wanted]

    async def _write_one_by_one(self, batch: list[int]) -> list[int]:
        """Write each item alone; returns the ids left over by a connection-level error."""
        for index, tid in enumerate(batch):
            outcome = self.pending[tid]
            try:
                await self._write([outcome])
            except Exception as exc:
                if is_connection_error(exc) or not await self._poisoned(outcome, exc):
                    return batch[index:]
            else:
                self._done([tid])
        return []

    async def _poisoned(self, outcome: Outcome, exc: Exception) -> bool:
        """This outcome can never be written: fail its task instead, or drop it loudly.

        False if the database went away meanwhile: the failure then replaces the outcome in
        ``pending`` and is retried with the rest.
        """
        tid = outcome.trigger_id
        what = "event" if outcome.fired else "failure"
        error = (
            f"the triggerer could not store the {what} of trigger {tid}: {exc!r}; "
            "the database refused it (check the event payload)"
        )
        log.error(
            "trigger outcome refused by the database; failing its task",
            trigger_id=tid,
            error=repr(exc),
        )
        replacement = Outcome(tid, FAILED, serialization.dumps({"error": error[:4096]}), error)
        replacement.hooked = outcome.hooked  # told "not stored" once this is written
        try:
            await self.store.fail_triggers([(tid, FAILED, replacement.payload)])
        except Exception as second:
            if is_connection_error(second):
                self.pending[tid] = replacement
                return False
            self.dropped += 1
            log.error(
                "DROPPED a trigger outcome: neither it nor a failure could be stored; the task "
                "stays deferred until its deadline or an operator acts",
                trigger_id=tid,
                error=repr(second),
            )
        self.pending[tid] = replacement  # so on_event_written() hears "not stored"
        self._done([tid])
        return True

    def _done(self, ids: list[int]) -> None:
        if self.open_units:
            done = set(ids)
            units = dict(self.units)
            for q in list(self.open_units):
                if q not in units or not any(t in self.pending and t not in done for t in units[q]):
                    self.open_units.discard(q)
        for tid in ids:
            outcome = self.pending.pop(tid, None)
            if outcome is not None and outcome.hooked is not None:
                tell_written(outcome.hooked, tid, outcome.fired and outcome.stored)
        self.written += len(ids)

    def _failed(self, exc: Exception, pending: int) -> None:
        if self.on_failed is not None:
            self.on_failed()
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        self.last_error = repr(exc)
        if not outage.failed("storing trigger outcomes", exc):
            log.error("storing trigger outcomes failed; retrying", error=repr(exc), pending=pending)


#: a hook slower than this blocked every other trigger of the process: named in the log
SLOW_HOOK_SECONDS = 0.2


def tell_written(trigger: Any, trigger_id: int, stored: bool) -> None:
    """Call ``trigger.on_event_written(stored)``: trigger code, so nothing it does (raise even
    SystemExit, return a coroutine, block) may stop the writer or pass unnoticed."""
    cls = type(trigger).__qualname__
    began = time.monotonic()
    try:
        result = trigger.on_event_written(stored)
    except BaseException as exc:
        log.error(
            "on_event_written() raised; the outcome stays as stored",
            trigger_id=trigger_id,
            trigger=cls,
            error=format_error(exc),
        )
        return
    finally:
        took = time.monotonic() - began
        if took > SLOW_HOOK_SECONDS:
            log.warning(
                "on_event_written() blocked the triggerer's event loop; it must return at once",
                trigger_id=trigger_id,
                trigger=cls,
                seconds=round(took, 3),
            )
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        log.error(
            "on_event_written() must be a plain def, not async: it returned an awaitable, "
            "which did not run",
            trigger_id=trigger_id,
            trigger=cls,
        )
