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
from deferrun.store.base import is_connection_error

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
        self.event_write_failures = Counter(
            "deferrun_event_write_failures",
            "Failed attempts to store trigger outcomes (each retried until stored)",
            registry=r,
        )
        self.event_write_failing = Gauge(
            "deferrun_event_write_failing_seconds",
            "How long this triggerer has failed to store pending trigger outcomes (0 when fine)",
            registry=r,
        )
        #: registered from the start (empty) so the family is always exported
        self._failing_triggers = _FailingTriggersCollector(dict)
        r.register(self._failing_triggers)
        #: fleet-wide gauges from the database, refreshed by ``serve`` every FLEET_EVERY s
        #: (cheap indexed reads, never one per scrape); set once a store is known
        self.fleet_store: Any = None
        self.oldest_unclaimed_trigger_age = Gauge(
            "deferrun_oldest_unclaimed_trigger_age_seconds",
            "Age of the oldest trigger no live triggerer holds (0: none waits)",
            registry=r,
        )
        self.oldest_trigger_age = Gauge(
            "deferrun_oldest_trigger_age_seconds",
            "Age of the oldest waiting trigger, claimed or not (0: no trigger waits)",
            registry=r,
        )
        self.oldest_queued_task_age = Gauge(
            "deferrun_oldest_queued_task_age_seconds",
            "Age of the oldest queued task (0: none queued)",
            registry=r,
        )
        self.live_processes = Gauge(
            "deferrun_live_processes",
            "Processes whose heartbeat is fresh, by role (from the database)",
            ["role"],
            registry=r,
        )
        self.dead_after = Gauge(
            "deferrun_dead_after_seconds",
            "Heartbeat age after which a process counts as dead (DEFERRUN_DEAD_AFTER)",
            registry=r,
        )

    def watch_shared_polls(self, source: Callable[[], list[tuple[str, int, int]]]) -> None:
        """Export ``deferrun_shared_poll_members{poll}``: tasks each running shared poll
        serves, read from ``source()`` (name, triggers, tasks) at every scrape."""
        if self._shared_polls is None:
            self._shared_polls = _SharedPollCollector(source)
            self.registry.register(self._shared_polls)
        self._shared_polls.source = source

    def watch_failing_triggers(self, source: Callable[[], dict[str, int]]) -> None:
        """Export ``deferrun_failing_triggers{trigger}``: triggers of each class whose polls
        have failed one or more times in a row, read from ``source()`` at every scrape."""
        self._failing_triggers.source = source

    async def refresh_fleet(self) -> None:
        """Read the fleet-wide gauges from ``fleet_store`` (a few indexed reads)."""
        store = self.fleet_store
        if store is None:
            return
        dead_after = float(getattr(store, "dead_after", 10.0))
        state = await store.alert_state(dead_after)
        self.oldest_unclaimed_trigger_age.set(state["oldest_unclaimed_trigger_age"])
        self.oldest_queued_task_age.set(state["oldest_queued_task_age"])
        self.oldest_trigger_age.set(state["oldest_trigger_age"])
        for role in ("triggerer", "worker"):
            self.live_processes.labels(role=role).set(state["live"].get(role, 0))
        self.dead_after.set(dead_after)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _FailingTriggersCollector:
    def __init__(self, source: Callable[[], dict[str, int]]) -> None:
        self.source = source

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(
            "deferrun_failing_triggers",
            "Triggers in this triggerer whose polls fail (one or more in a row), by class",
            labels=["trigger"],
        )
        for classpath, count in sorted(self.source().items()):
            family.add_metric([classpath], count)
        yield family


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
        metrics.fleet_store = self  # the process's store: serve() reads the fleet gauges

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
        await _refresh_fleet_forever(metrics)
    finally:
        with anyio.CancelScope(shield=True):
            await runner.cleanup()


#: seconds between reads of the fleet-wide gauges (alert rules look over minutes)
FLEET_EVERY = 10.0


async def _refresh_fleet_forever(metrics: Metrics) -> None:
    """Keep the fleet gauges fresh while /metrics is served; quiet while the database is
    away (the heartbeat's log already says so)."""
    while True:
        try:
            await metrics.refresh_fleet()
        except Exception as exc:
            if not is_connection_error(exc):
                log.warning("reading the fleet gauges failed; retrying", error=repr(exc))
        await anyio.sleep(FLEET_EVERY)
