"""Prometheus metrics and the health endpoint of a worker or triggerer.

Each process owns one registry (no global state, so a standalone process can hold both roles'
metrics). The HTTP side is a small aiohttp app on ``--metrics-port``: ``/metrics`` in the
Prometheus text format, ``/healthz`` 200 while the event loop and the database are healthy
and every extra check a component registered in ``Metrics.health_checks`` passes (the
triggerer's: its events are being stored).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import structlog
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from deferrun.exceptions import ConfigError

log = structlog.get_logger("deferrun.metrics")

HealthCheck = Callable[[], tuple[bool, dict[str, Any]]]

LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Every metric deferrun exports; a role only updates the ones that concern it."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._shared_polls: _SharedPollCollector | None = None
        #: more checks /healthz runs besides loop and database (e.g. the triggerer's writes)
        self.health_checks: list[HealthCheck] = []
        self.triggers_running = Gauge(
            "deferrun_triggers_running", "Triggers running in this triggerer", registry=r
        )
        self.capacity_left = Gauge(
            "deferrun_triggerer_capacity_left", "Triggers this triggerer can still take", registry=r
        )
        self.trigger_events = Counter(
            "deferrun_trigger_events", "Trigger events fired in this process", registry=r
        )
        self.trigger_failures = Counter(
            "deferrun_trigger_failures",
            "Triggers that raised, ended without an event, or could not be loaded",
            registry=r,
        )
        self.trigger_timeouts = Counter(
            "deferrun_trigger_timeouts", "Deferrals that timed out in this triggerer", registry=r
        )
        self.fire_lateness = Histogram(
            "deferrun_timer_fire_lateness_seconds",
            "How long after its moment a time trigger fired (timer heap)",
            buckets=(
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1.0,
                2.5,
                5.0,
                10.0,
                30.0,
            ),
            registry=r,
        )
        self.loop_lag = Histogram(
            "deferrun_loop_lag_seconds",
            "How late the event loop ran a 50 ms tick",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.loop_blocked = Counter(
            "deferrun_loop_blocked",
            "Times the event loop was blocked past the threshold",
            registry=r,
        )
        self.slots_busy = Gauge(
            "deferrun_worker_slots_busy", "Worker slots running a task", registry=r
        )
        self.slots = Gauge("deferrun_worker_slots", "Worker slots configured", registry=r)
        self.tasks = Counter(
            "deferrun_tasks",
            "Task outcomes recorded by this process, by resulting state",
            ["state"],
            registry=r,
        )
        self.store_calls = Counter(
            "deferrun_store_calls",
            "Database calls made by this process, by store method",
            ["method"],
            registry=r,
        )
        self.db_healthy = Gauge(
            "deferrun_database_healthy", "1 while heartbeats reach the database", registry=r
        )

    def watch_shared_polls(self, source: Callable[[], list[tuple[str, int, int]]]) -> None:
        """Export ``deferrun_shared_poll_members{poll}``: tasks each running shared poll
        serves, read from ``source()`` (name, triggers, tasks) at every scrape."""
        if self._shared_polls is None:
            self._shared_polls = _SharedPollCollector(source)
            self.registry.register(self._shared_polls)
        self._shared_polls.source = source

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SharedPollCollector:
    def __init__(self, source: Callable[[], list[tuple[str, int, int]]]) -> None:
        self.source = source

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "deferrun_shared_poll_members",
            "Tasks served by each running shared poll of this triggerer",
            labels=["poll"],
        )
        for name, _, tasks in self.source():
            family.add_metric([name], tasks)
        yield family


class CountingStore:
    """Wraps a store and counts each call per method (deferrun_store_calls_total).

    Each store method is one database round trip or transaction, so this is the process's
    database load, broken down by what it was for.
    """

    def __init__(self, store: Any, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(attr):
            return attr
        counter = self._metrics.store_calls.labels(method=name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            counter.inc()
            return await attr(*args, **kwargs)

        setattr(self, name, counted)  # resolved once per method
        return counted


def loop_and_db_health(
    health: dict[str, float],
    lags: list[float],
    dead_after: float,
    started: float,
    extra: list[HealthCheck] | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Healthy while a heartbeat reached the database recently, the loop is not stalling and
    every ``extra`` check passes.

    ``health['ok_at']`` is the monotonic time of the last successful heartbeat; before the
    first heartbeat the process gets ``dead_after`` seconds of grace.
    """
    now = time.monotonic()
    last_ok = health.get("ok_at", started)
    db_age = now - last_ok
    worst_lag = max(lags[-100:], default=0.0)
    details = {
        "database_ok": db_age < dead_after,
        "database_ok_seconds_ago": round(db_age, 3),
        "loop_worst_recent_lag_seconds": round(worst_lag, 3),
    }
    ok = details["database_ok"] and worst_lag < 5.0
    return combine(ok, details, extra or [])


def combine(
    ok: bool, details: dict[str, Any], checks: list[HealthCheck]
) -> tuple[bool, dict[str, Any]]:
    """AND the ``checks`` into (ok, details); a check that raises counts as failing."""
    for check in checks:
        try:
            check_ok, more = check()
        except Exception as exc:
            log.error("health check raised", check=repr(check), error=repr(exc))
            check_ok, more = False, {"health_check_error": repr(exc)}
        ok = ok and check_ok
        details = {**details, **more}
    return ok, details


async def serve(
    metrics: Metrics,
    host: str,
    port: int,
    check: HealthCheck,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics and /healthz until cancelled (``tg.start`` returns once listening)."""
    metrics.db_healthy.set_function(lambda: 1.0 if check()[1]["database_ok"] else 0.0)

    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health_view(_: web.Request) -> web.Response:
        ok, details = combine(*check(), metrics.health_checks)
        return web.json_response(
            {"status": "ok" if ok else "unhealthy", **details}, status=200 if ok else 503
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", health_view)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port {port}: cannot listen on {host}:{port} "
                f"({exc.strerror or exc}); pick a free port or stop what uses it"
            ) from None
        log.info("metrics and health endpoints listening", url=f"http://{host}:{port}/metrics")
        task_status.started()
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()
