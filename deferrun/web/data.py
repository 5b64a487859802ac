"""What each page shows, as plain JSON-ready dicts: the HTML templates and ``/api/...`` render
the same data. Everything read from stored rows passes :func:`redact` first.
"""

from __future__ import annotations

import re
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import structlog

from deferrun.connections import redaction
from deferrun.connections.redaction import redact_text
from deferrun.core.models import FINISHED_STATES, TaskInfo, TaskState
from deferrun.store import Store

log = structlog.get_logger("deferrun.web")

STATES = [str(s) for s in TaskState]
FINISHED = {str(s) for s in FINISHED_STATES}

_SECRET_KEY = re.compile(
    r"pass|secret|token|api_?key|auth|credential|private|cookie|session|signature", re.I
)


def redact(value: Any) -> Any:
    """``value`` with secret-named keys blanked and secrets in strings replaced by ``***``."""
    if isinstance(value, dict):
        return {
            k: ("***" if _SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def register_env_secrets() -> None:
    """Teach the redactor the secrets of every DEFERRUN_CONN_* this server can see."""
    import os

    for name, uri in os.environ.items():
        if name.startswith("DEFERRUN_CONN_") and "@" in uri:
            userinfo = uri.partition("://")[2].rpartition("@")[0]
            if ":" in userinfo:
                redaction.register_secret(userinfo.split(":", 1)[1])


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = abs(seconds)
    text = (
        f"{s:.1f}s"
        if s < 10
        else f"{s:.0f}s"
        if s < 120
        else f"{s / 60:.0f}m"
        if s < 7200
        else f"{s / 3600:.0f}h"
        if s < 172800
        else f"{s / 86400:.0f}d"
    )
    return text if seconds >= 0 else f"-{text}"


def since(moment: datetime | None) -> float | None:
    return None if moment is None else (datetime.now(UTC) - moment).total_seconds()


class Sampler:
    """Counts tasks in the background so no page request counts a big table.

    Unfinished states (indexed, cheap) every ``interval`` seconds, kept for an hour for the
    overview chart; all states (a full count) every ``full_interval`` seconds.
    """

    def __init__(self, store: Store, interval: float = 5.0, full_interval: float = 60.0) -> None:
        self.store = store
        self.interval = interval
        self.full_interval = full_interval
        self.history: deque[tuple[float, dict[str, int]]] = deque(maxlen=int(3600 / interval) + 1)
        self.full: dict[str, int] = {}
        self.full_at = 0.0
        self.active_at = 0.0

    async def sample(self, full: bool = False) -> None:
        active = await self.store.active_counts()
        now = time.time()
        self.history.append((now, active))
        self.active_at = now
        if full or now - self.full_at >= self.full_interval:
            self.full = await self.store.count_tasks()
            self.full_at = time.time()

    async def run(self) -> None:
        while True:
            await anyio.sleep(self.interval)
            try:
                await self.sample()
            except Exception as exc:
                log.error("counting tasks failed; the overview shows older counts", error=repr(exc))

    def counts(self) -> dict[str, int]:
        merged = {s: self.full.get(s, 0) for s in STATES}
        if self.history:
            latest = self.history[-1][1]
            for s in STATES:
                if s not in FINISHED:
                    merged[s] = latest.get(s, 0)
        return merged


def chart_svg(
    history: list[tuple[float, dict[str, int]]], width: int = 600, height: int = 120
) -> str:
    """Deferred vs running over the last hour as an inline SVG (no script, no assets)."""
    now = time.time()
    points = [(t, c) for t, c in history if t >= now - 3600]
    top = max([max(c.get("deferred", 0), c.get("running", 0)) for _, c in points] + [1])

    def line(state: str) -> str:
        scale = (height - 10) / top
        return " ".join(
            f"{(t - now + 3600) / 3600 * width:.1f},{height - c.get(state, 0) * scale:.1f}"
            for t, c in points
        )

    def dots(state: str, color: str) -> str:
        return "".join(
            f'<circle cx="{x}" cy="{y}" r="2" fill="{color}"/>'
            for x, y in (p.split(",") for p in line(state).split())
        )

    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="deferred and running tasks, last hour">'
        f'<rect width="{width}" height="{height}" fill="#fafafa" stroke="#ddd"/>'
        f'<polyline fill="none" stroke="#6b5bd2" stroke-width="2" points="{line("deferred")}"/>'
        f'<polyline fill="none" stroke="#e07b00" stroke-width="2" points="{line("running")}"/>'
        + dots("deferred", "#6b5bd2")
        + dots("running", "#e07b00")
        + f'<text x="4" y="12" font-size="10">max {top}</text></svg>'
    )


async def overview(store: Store, sampler: Sampler) -> dict[str, Any]:
    if not sampler.history:
        await sampler.sample(full=True)
    processes = await store.process_load()
    for p in processes:
        p["alive"] = p["heartbeat_age"] < getattr(store, "dead_after", 10.0)
    return {
        "counts": sampler.counts(),
        "counts_age": time.time() - sampler.full_at,
        "active_age": time.time() - sampler.active_at,
        "history": [{"at": t, **c} for t, c in sampler.history],
        "processes": processes,
        **await store.oldest_triggers(),
        "alerts": await alerts(store, processes),
    }


async def alerts(store: Store, processes: list[dict[str, Any]]) -> list[dict[str, str]]:
    """What the Prometheus alert rules (deploy/prometheus/alerts.yml) fire on, as the
    overview's red banners: each a condition and what to do about it."""
    dead_after = float(getattr(store, "dead_after", 10.0))
    state = await store.alert_state(dead_after)
    oldest = await store.oldest_triggers()
    failing = await store.failing_triggers(limit=1000)
    out = []
    if state["live"]["triggerer"] == 0 and oldest["oldest"] is not None:
        out.append(
            {
                "id": "no-triggerer",
                "text": "No live triggerer while triggers wait: deferred tasks will not "
                "resume. Start a triggerer (deferrun triggerer, or deferrun standalone).",
            }
        )
    unclaimed = state["oldest_unclaimed_trigger_age"]
    if unclaimed > 2 * dead_after:
        out.append(
            {
                "id": "unclaimed",
                "text": f"A trigger has waited {unclaimed:.0f} s unclaimed (over 2x dead-after, "
                f"{2 * dead_after:g} s): triggerers are full, stuck or serve other queues. "
                "Add triggerer capacity or one for its queue.",
            }
        )
    if failing:
        classes = sorted({f["classpath"] for f in failing})
        out.append(
            {
                "id": "failing-triggers",
                "text": f"{len(failing)}{'+' if len(failing) >= 1000 else ''} trigger(s) fail "
                f"every poll ({', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''}): "
                "see the last error on the Triggers page.",
            }
        )
    workers = [p for p in processes if p["role"] == "worker" and p["alive"]]
    if (
        workers
        and all(p["used"] >= p["capacity"] for p in workers)
        and state["oldest_queued_task_age"] > 60
    ):
        out.append(
            {
                "id": "workers-saturated",
                "text": "Every worker slot is busy and a task has been queued for "
                f"{state['oldest_queued_task_age']:.0f} s: add workers or --slots.",
            }
        )
    return out


def task_row(info: TaskInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "name": info.name,
        "classpath": info.classpath,
        "queue": info.queue,
        "state": str(info.state),
        "try_number": info.try_number,
        "max_tries": info.max_tries,
        "trigger_classpath": info.trigger_classpath,
        "triggerer_id": info.triggerer_id,
        "worker_id": info.worker_id,
        "created_at": info.created_at,
        "updated_at": info.updated_at,
        "finished_at": info.finished_at,
        "age": since(info.created_at),
    }


async def tasks(store: Store, query: dict[str, str], limit: int = 50) -> dict[str, Any]:
    state = query.get("state") or None
    if state is not None and state not in STATES:
        raise ValueError(f"unknown state {state!r}; use one of {', '.join(STATES)}")
    filters = {
        "state": state,
        "name": query.get("name") or None,
        "queue": query.get("queue") or None,
    }
    page, cursor = await store.task_page(**filters, cursor=query.get("page") or None, limit=limit)
    return {"filters": filters, "tasks": [task_row(t) for t in page], "next": cursor}


def _timeline(info: TaskInfo, detail: dict[str, Any]) -> list[dict[str, Any]]:
    events = [
        ("submitted", info.created_at),
        ("first try started", info.started_at),
        (f"try {info.try_number} started", detail["try_started_at"]),
    ]
    if detail["trigger_age"] is not None:
        events.append(
            (
                f"deferred on trigger {info.trigger_id}",
                datetime.fromtimestamp(time.time() - detail["trigger_age"], UTC),
            )
        )
    events.append((f"ended {info.state}", info.finished_at))
    events.append(("last change", info.updated_at))
    seen = [(label, at) for label, at in events if at is not None]
    seen.sort(key=lambda e: e[1])
    return [{"event": label, "at": at} for label, at in seen]


async def task(store: Store, task_id: str) -> dict[str, Any] | None:
    info = await store.get_task(task_id)
    detail = await store.task_detail(task_id)
    if info is None or detail is None:
        return None
    row = task_row(info)
    row.update(
        {
            "error": redact(info.error),
            "result": redact(info.result),
            "next_method": info.next_method,
            "trigger_id": info.trigger_id,
            "defer_deadline": info.defer_deadline,
            "not_before": info.not_before,
            "finished": info.finished,
            "kwargs": redact(detail["kwargs"]),
            "next_kwargs": redact(detail["next_kwargs"]),
            "trigger_kwargs": redact(detail["trigger_kwargs"]),
            "trigger_age": detail["trigger_age"],
            "trigger_timeout_in": detail["trigger_timeout_in"],
            "watch_task_id": detail["watch_task_id"],
            "execution_timeout": detail["execution_timeout"],
            "retry_delay": detail["retry_delay"],
            "trigger_rule": detail["trigger_rule"],
            "upstream": detail["upstream"],
            "downstream": detail["downstream"],
            "timeline": _timeline(info, detail),
        }
    )
    row["trigger_health"] = (
        await store.trigger_health(info.trigger_id)
        if info.trigger_id is not None and not info.finished
        else None
    )
    return row


_PLUMBING = {"event", "level", "timestamp", "pid", "task_id", "trigger_id", "logger"}


def redact_line(line: str) -> tuple[str, str]:
    """A stored log line, redacted, and as ``level event key=value ...`` for people.

    A structured (JSON) line is redacted by key before it is rendered: its values under
    secret-looking keys never reach the text, whatever their quoting."""
    try:
        fields = msgspec.json.decode(line)
    except msgspec.DecodeError:
        fields = None
    if not isinstance(fields, dict) or "event" not in fields:
        text = redact_text(line)
        return text, text
    fields = redact(fields)
    extras = " ".join(f"{k}={v}" for k, v in fields.items() if k not in _PLUMBING)
    message = f"{fields.get('level', '')} {fields['event']} {extras}".strip()
    return msgspec.json.encode(fields, enc_hook=repr).decode(), message


async def logs(store: Store, task_id: str, after: int = 0) -> list[dict[str, Any]]:
    """Log lines after line id ``after``: the stored line, and a readable ``message``."""
    out = []
    for line in await store.task_logs_after(task_id, after=after):
        text, message = redact_line(line["line"])
        out.append({**line, "line": text, "message": message})
    return out


async def triggers(store: Store, classpath: str | None = None) -> dict[str, Any]:
    groups = await store.trigger_groups()
    by_class: dict[str, dict[str, Any]] = {}
    for g in groups:
        entry = by_class.setdefault(
            g["classpath"], {"classpath": g["classpath"], "count": 0, "owners": []}
        )
        entry["count"] += g["count"]
        entry["owners"].append(g)
    listed = []
    if classpath:
        listed = [
            {**t, "kwargs": redact(t["kwargs"])} for t in await store.triggers_of_class(classpath)
        ]
    failing = await store.failing_triggers()
    return {
        "classes": list(by_class.values()),
        "classpath": classpath,
        "triggers": listed,
        "failing": failing,
    }
