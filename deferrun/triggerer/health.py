"""Each trigger's poll health, kept in memory and stored in batches on its trigger row.

``PollingTrigger.run`` and the shared polls report every poll (``basetrigger.report_poll``);
this keeps the consecutive failures, the last error (redacted) and the time of the last
success. Nothing is written per poll: a flush (every ``FLUSH_EVERY`` s) stores what changed
since the last one, in one statement. A healthy trigger is never written; one that recovers
is written once (failures back to 0).
"""

from __future__ import annotations

import time
from collections.abc import Container
from typing import Any

import structlog

from deferrun.connections.redaction import redact_text
from deferrun.core.classpaths import classpath_of
from deferrun.triggerer import shared_polls

log = structlog.get_logger("deferrun.triggerer")

FLUSH_EVERY = 2.0
#: a stored error is cut to this many characters (the row is read by every trigger listing)
MAX_ERROR_CHARS = 2000


class _Failing:
    __slots__ = ("classpath", "error", "failures")

    def __init__(self, classpath: str) -> None:
        self.classpath = classpath
        self.failures = 0
        self.error = ""


class PollHealth:
    """Called as ``(trigger, error or None)`` after each poll (``basetrigger.poll_outcome``)."""

    def __init__(self) -> None:
        self.failing: dict[int, _Failing] = {}
        self.ok_at: dict[int, float] = {}  # last successful poll (epoch s), in memory only
        self.dirty: set[int] = set()

    def __call__(self, trigger: Any, error: BaseException | None) -> None:
        served = shared_polls.served_by(trigger)
        ids = [tid for tid, _ in served] if served else [trigger.trigger_id]
        for tid in ids:
            if tid is not None:
                self._one(tid, trigger, error)

    def _one(self, tid: int, trigger: Any, error: BaseException | None) -> None:
        if error is None:
            self.ok_at[tid] = time.time()
            if self.failing.pop(tid, None) is not None:
                self.dirty.add(tid)  # recovered: stored once
            return
        entry = self.failing.get(tid)
        if entry is None:
            entry = self.failing[tid] = _Failing(classpath_of(type(trigger)))
        entry.failures += 1
        text = str(error) or repr(error)
        entry.error = redact_text(f"{type(error).__name__}: {text}")[:MAX_ERROR_CHARS]
        self.dirty.add(tid)

    def by_class(self) -> dict[str, int]:
        """Failing triggers (one failed poll or more in a row) by trigger class."""
        counts: dict[str, int] = {}
        for entry in self.failing.values():
            counts[entry.classpath] = counts.get(entry.classpath, 0) + 1
        return counts

    def take(self, live: Container[int]) -> list[tuple[int, int, str | None, float | None]]:
        """The rows to store, (trigger_id, failures, last_error, last_ok_at); forgets triggers
        no longer ``live`` here."""
        for tid in [t for t in self.failing if t not in live]:
            del self.failing[tid]
        for tid in [t for t in self.ok_at if t not in live]:
            del self.ok_at[tid]
        rows = []
        for tid in self.dirty:
            if tid not in live:
                continue
            entry = self.failing.get(tid)
            if entry is None:
                rows.append((tid, 0, None, self.ok_at.get(tid)))
            else:
                rows.append((tid, entry.failures, entry.error, self.ok_at.get(tid)))
        self.dirty.clear()
        return rows

    def put_back(self, rows: list[tuple[int, int, str | None, float | None]]) -> None:
        """A flush failed: its rows are written with the next one."""
        self.dirty.update(r[0] for r in rows)
