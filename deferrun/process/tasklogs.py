"""Per-task logs: every log line bound to a task is kept with the task in the database.

A structlog processor (installed by ``configure_logging``) hands each event that carries a
``task_id`` to the active sinks. A sink buffers lines (from the loop and from worker threads)
and writes them in batches, keeping at most ``keep`` lines per task, so ``deferrun logs ID``
shows a task's worker and trigger lines in order from any host that shares the database.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from typing import Any

import anyio
import msgspec
import structlog

from deferrun.process.liveness import outage
from deferrun.store.base import Store

log = structlog.get_logger("deferrun.tasklogs")

_SINKS: list[TaskLogSink] = []
_SINKS_LOCK = threading.Lock()
_encoder = msgspec.json.Encoder(enc_hook=repr)


def tap(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: copy task-bound events to the active sinks (never drops them)."""
    if _SINKS and event_dict.get("task_id"):
        for sink in _SINKS:
            sink.add(event_dict)
    return event_dict


_stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)


def record(event: str, level: str, **fields: Any) -> None:
    """Store one line in ``fields["task_id"]``'s log without going through the log pipeline.

    For a line that a burst emits once per task (the triggerer's "trigger fired"): the full
    structlog pipeline costs ~50 us a line, which 10,000 fires in one loop step would add to
    every later fire's lateness. The stored line is the one the pipeline would store.
    """
    if not _SINKS or not fields.get("task_id"):
        return
    event_dict: dict[str, Any] = {"event": event, **fields, "level": level}
    _stamp(None, level, event_dict)
    event_dict["pid"] = _PID
    for sink in _SINKS:
        sink.add(event_dict)


_PID = os.getpid()


def _encode_line(event_dict: dict[str, Any]) -> str:
    """The event as a JSON line. A log call must never fail the task: text UTF-8 cannot hold
    (a lone surrogate from a bytes decode) is escaped instead of raising into user code."""
    try:
        return _encoder.encode(event_dict).decode()
    except (TypeError, ValueError, msgspec.EncodeError):  # UnicodeEncodeError is a ValueError
        pass
    try:
        return json.dumps(event_dict, default=repr)  # ASCII: surrogates become \udcff escapes
    except (TypeError, ValueError):
        return repr(event_dict)


_KEEP = ("event", "level", "timestamp", "task_id", "trigger_id", "pid", "logger")


def _shortened(event_dict: dict[str, Any], limit: int) -> str:
    """The event as JSON of at most about ``limit`` characters, still one valid JSON object
    (``deferrun logs --json`` is read by programs): long text values are cut and the line
    says ``"truncated": true``; if that is still too long, only the main fields are kept."""
    cut = max(limit // 4, 64)
    short = {
        k: v[:cut] + "...(truncated)" if isinstance(v, str) and len(v) > cut else v
        for k, v in event_dict.items()
    }
    short["truncated"] = True
    line = _encode_line(short)
    if len(line) <= limit + len(short) * 16:
        return line
    kept = {k: short[k] for k in _KEEP if k in short}
    kept["event"] = str(kept.get("event", ""))[:cut]
    kept["truncated"] = True
    return _encode_line(kept)


class TaskLogSink:
    def __init__(
        self,
        store: Store,
        source: str,
        *,
        keep: int = 2000,
        max_line: int = 8192,
        flush_interval: float = 0.25,
    ) -> None:
        self.store = store
        self.source = source
        self.keep = keep
        self.max_line = max_line
        self.flush_interval = flush_interval
        self.dropped = 0
        self._buffer: deque[tuple[str, float, str, str]] = deque(maxlen=100_000)

    def add(self, event_dict: dict[str, Any]) -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1  # the database is far behind; keep the process healthy
        source = "trigger" if event_dict.get("trigger_id") is not None else self.source
        line = _encode_line(event_dict)
        if len(line) > self.max_line:
            line = _shortened(event_dict, self.max_line)
        self._buffer.append((str(event_dict["task_id"]), time.time(), source, line))

    def _drain(self) -> list[tuple[str, float, str, str]]:
        rows = []
        while self._buffer:
            rows.append(self._buffer.popleft())
        return rows

    async def run(self) -> None:
        with _SINKS_LOCK:
            _SINKS.append(self)
        try:
            while True:
                await anyio.sleep(self.flush_interval)
                await self.flush()
        finally:
            with _SINKS_LOCK:
                _SINKS.remove(self)
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await self.flush()

    async def flush(self) -> None:
        rows = self._drain()
        if not rows:
            return
        try:
            await self.store.append_task_logs(rows, self.keep)
        except Exception as exc:
            # Put them back (oldest first) and retry on the next flush.
            self._buffer.extendleft(reversed(rows))
            # an outage is said once for the process (liveness.Outage), not every 250 ms
            if not outage.failed("storing task log lines", exc):
                log.warning(
                    "storing task log lines failed; will retry",
                    error=repr(exc),
                    pending=len(self._buffer),
                )
