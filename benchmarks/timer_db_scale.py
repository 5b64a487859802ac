"""A million time triggers in one real `deferrun triggerer` process, through a database.

    python -m benchmarks.triggerer_scale --mode heap --db postgres --out DIR
        [--sizes 1000000] [--fire-rate 5000] [--window 250000]

One real triggerer starts on a fresh database (PostgreSQL cluster or SQLite file); then N
tasks are stored deferred on distinct ``DateTimeTrigger``s, in two transactions of bulk SQL
(rows as a deferral writes them, as ``benchmarks/fleet.py`` does: loading 1M through workers
takes far longer than this machine allows): first the N - ``--window`` due a day later (they
stay live), then, once the triggerer holds those, the window's, due at ``--fire-rate`` per
second from when that load and its claims should be over at the first load's pace. No
worker runs: a fired task stays ``queued``. Reported: the time to claim all N
(``deferrun_triggers_running``), RSS with all N live and per timer above the idle RSS, then
over the window: fire lateness as stored (each re-queued task's ``updated_at``, stamped by
the statement that stored its event, minus its moment) p50/p99/max, the triggerer's own
lateness histogram (when its timer loop popped them), the rate at which events reached the
database, and the triggerer's CPU.
"""

from __future__ import annotations

import math
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from benchmarks._harness import Process, env_for, free_port, pct, start_pg_cluster, wait_for
from benchmarks.triggerer_scale import gauge, histogram_quantile, scrape

FAR = 86400.0  # the triggers after the window: due a day later (live, never fired here)

_PG_DUE = """(CASE WHEN g <= $2::bigint THEN $3::float8 + (g - 1) / $4::float8
    ELSE $3::float8 + 86400 + g / 1000.0 END)"""
PG_TASKS = f"""INSERT INTO deferrun_tasks (id, name, classpath, kwargs, queue, state,
    try_number, max_tries, retry_delay, next_method, created_at, updated_at)
SELECT 't' || g, 'AtMoment', 'benchmarks.ops.AtMoment', '{{"at":' || {_PG_DUE} || '}}',
    'default', 'deferred', 1, 1, 0, 'resume', extract(epoch from now()),
    extract(epoch from now())
FROM generate_series($5::bigint, $1::bigint) AS g"""
PG_TRIGGERS = f"""INSERT INTO deferrun_triggers (task_id, classpath, kwargs, queue, created_at)
SELECT 't' || g, 'triggers.time.DateTimeTrigger',
    '{{"moment":{{"__deferrun__":"datetime","v":"'
    || to_char(to_timestamp({_PG_DUE}) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US')
    || '","tz":0.0}}}}', 'default', extract(epoch from now())
FROM generate_series($5::bigint, $1::bigint) AS g"""
PG_LINK = """UPDATE deferrun_tasks t SET trigger_id = g.id FROM deferrun_triggers g
WHERE g.task_id = t.id AND t.trigger_id IS NULL"""
#: moment, stored stamp of every task whose event reached the database
PG_FIRED = """SELECT (kwargs::json->>'at')::float8, updated_at FROM deferrun_tasks
WHERE state = 'queued'"""

# SQLite keeps milliseconds in the moment's text (truncated), so the window's moments are
# whole ms (base too), written half a ms up: the text is never before the recorded moment.
_SQ_DUE = """(CASE WHEN x <= :k THEN :base + round((x - 1) * 1000.0 / :rate) / 1000.0
    ELSE :base + 86400 + x / 1000.0 END)"""
_SERIES = "WITH RECURSIVE s(x) AS (SELECT :lo UNION ALL SELECT x + 1 FROM s WHERE x < :n)"
SQ_TASKS = f"""{_SERIES} INSERT INTO deferrun_tasks (id, name, classpath, kwargs, queue, state,
    try_number, max_tries, retry_delay, next_method, created_at, updated_at)
SELECT 't' || x, 'AtMoment', 'benchmarks.ops.AtMoment', '{{"at":' || {_SQ_DUE} || '}}',
    'default', 'deferred', 1, 1, 0, 'resume', :now, :now FROM s"""
SQ_TRIGGERS = f"""{_SERIES} INSERT INTO deferrun_triggers (task_id, classpath, kwargs, queue,
    created_at)
SELECT 't' || x, 'triggers.time.DateTimeTrigger',
    '{{"moment":{{"__deferrun__":"datetime","v":"'
    || strftime('%Y-%m-%dT%H:%M:%f', {_SQ_DUE} + 0.0005, 'unixepoch') || '","tz":0.0}}}}',
    'default', :now FROM s"""
SQ_LINK = """UPDATE deferrun_tasks SET trigger_id = (SELECT g.id FROM deferrun_triggers g
    WHERE g.task_id = deferrun_tasks.id) WHERE trigger_id IS NULL"""
SQ_FIRED = """SELECT json_extract(kwargs, '$.at'), updated_at FROM deferrun_tasks
WHERE state = 'queued'"""


async def _pg_bulk(db: str, n: int, k: int, base: float, rate: float, lo: int) -> None:
    import asyncpg

    conn = await asyncpg.connect(db)
    try:
        async with conn.transaction():
            for sql in (PG_TASKS, PG_TRIGGERS):
                await conn.execute(sql, n, k, base, rate, lo)
            await conn.execute(PG_LINK)
            await conn.execute("NOTIFY deferrun_triggers")
        # statistics for the new rows now, as autovacuum would soon: claims read the
        # unclaimed index only while PostgreSQL knows most rows are unclaimed
        await conn.execute("ANALYZE deferrun_triggers")
    finally:
        await conn.close()


def _pg_bulk_sync(db: str, n: int, k: int, base: float, rate: float, lo: int) -> None:
    anyio.run(_pg_bulk, db, n, k, base, rate, lo)


async def _pg_fired(db: str) -> list[tuple[float, float]]:
    import asyncpg

    conn = await asyncpg.connect(db)
    try:
        return [(r[0], r[1]) for r in await conn.fetch(PG_FIRED)]
    finally:
        await conn.close()


def _sqlite_path(db: str) -> str:
    return db.removeprefix("sqlite:///")


def _sq_bulk(db: str, n: int, k: int, base: float, rate: float, lo: int) -> None:
    conn = sqlite3.connect(_sqlite_path(db), timeout=60)
    try:
        args = {"n": n, "k": k, "base": base, "rate": rate, "now": time.time(), "lo": lo}
        with conn:
            conn.execute(SQ_TASKS, args)
            conn.execute(SQ_TRIGGERS, args)
            conn.execute(SQ_LINK)
    finally:
        conn.close()


def _sq_fired(db: str) -> list[tuple[float, float]]:
    conn = sqlite3.connect(_sqlite_path(db), timeout=60)
    try:
        return [(float(a), float(u)) for a, u in conn.execute(SQ_FIRED)]
    finally:
        conn.close()


def run_timer_db(
    backend: str,
    n: int,
    fire_rate: float,
    window: int,
    workdir: Path,
) -> dict[str, Any]:
    """One full run against a fresh database of ``backend`` (postgres or sqlite)."""
    window = min(window, n)
    cluster = start_pg_cluster() if backend == "postgres" else None
    triggerer: Process | None = None
    try:
        if cluster is not None:
            db = cluster.create_database()
        else:
            db = f"sqlite:///{workdir / 'timers.db'}"
        port = free_port()
        triggerer = Process(
            ["triggerer", "--capacity", str(n + 100), "--metrics-port", str(port),
             "--metrics-host", "127.0.0.1"],
            env_for(db),
            workdir / f"timers-triggerer-{backend}-{n}.log",
        )  # fmt: skip
        wait_for(lambda: gauge(scrape(port), "deferrun_triggers_running") is not None, 60, 0.3)
        time.sleep(2.0)  # registered, first (empty) claim done
        idle_rss = triggerer.rss_mib()
        # Two loads: the triggers due a day later first, then the window's, whose moments
        # start once that load and its claims would be over at the first load's pace.
        bulk = _pg_bulk_sync if cluster is not None else _sq_bulk

        def running() -> float:
            return gauge(scrape(port), "deferrun_triggers_running") or 0

        cpu0 = triggerer.cpu_seconds()
        t0 = time.perf_counter()
        bulk(db, n, window, time.time(), fire_rate, window + 1)
        stored_s = time.perf_counter() - t0
        wait_for(lambda: running() >= n - window, 900, 0.5)
        first_claim_s = time.perf_counter() - t0 - stored_s
        per_trigger = (stored_s + first_claim_s) / max(n - window, 1)
        base = math.ceil((time.time() + 5.0 + 1.5 * per_trigger * window) * 1000) / 1000
        t1 = time.perf_counter()
        bulk(db, window, window, base, fire_rate, 1)
        t2 = time.perf_counter()
        stored_s += t2 - t1
        wait_for(lambda: running() >= n, max(600.0, base - time.time()), 0.2)
        claimed_s = first_claim_s + time.perf_counter() - t2
        claim_cpu = triggerer.cpu_seconds() - cpu0
        loaded_before = time.time() < base
        time.sleep(min(2.0, max(base - time.time() - 1.0, 0.0)))
        rss = triggerer.rss_mib()
        time.sleep(max(base - time.time(), 0.0))
        cpu1 = triggerer.cpu_seconds()
        span = window / fire_rate
        loads: list[float] = []
        while time.time() < base + span:
            time.sleep(min(1.0, max(base + span - time.time(), 0.01)))
            loads.append(_load1())
        fire_cpu = triggerer.cpu_seconds() - cpu1
        wait_for(lambda: _fired_count(cluster, db) >= window, 120, 0.5)
        text = scrape(port)
        rss_after = triggerer.rss_mib()
        fired = anyio.run(_pg_fired, db) if cluster is not None else _sq_fired(db)
        late = [stored - due for due, stored in fired]
        stamps = sorted(stored for _, stored in fired)
        hist = {q: histogram_quantile(text, "deferrun_timer_fire_lateness_seconds", q) for q in
                (0.5, 0.99)}  # fmt: skip
        return {
            "mode": "heap-db",
            "backend": backend,
            "n": n,
            "window": window,
            "fire_rate_target": fire_rate,
            "stored_s": round(stored_s, 1),
            "claim_first_load_s": round(first_claim_s, 1),
            "claim_all_s": round(claimed_s, 1),
            "claim_rate_per_s": round(n / claimed_s) if claimed_s > 0 else None,
            "claim_cpu_s": round(claim_cpu, 1),
            "loaded_before_first_moment": loaded_before,
            "idle_rss_mib": round(idle_rss, 1),
            "rss_mib": round(rss, 1),
            "bytes_per_timer": round((rss - idle_rss) * 2**20 / n),
            "fired_stored": len(fired),
            "stored_rate_per_s": round(len(stamps) / max(stamps[-1] - stamps[0], 1e-9))
            if len(stamps) > 1
            else None,
            "stored_lateness_p50_ms": round(pct(late, 50) * 1000, 1),
            "stored_lateness_p99_ms": round(pct(late, 99) * 1000, 1),
            "stored_lateness_max_ms": round(max(late, default=0.0) * 1000, 1),
            "early": sum(1 for x in late if x < 0),
            "pop_lateness_p50_ms": round((hist[0.5] or 0) * 1000, 2),
            "pop_lateness_p99_ms": round((hist[0.99] or 0) * 1000, 2),
            "fire_cpu_pct": round(100 * fire_cpu / span, 1),
            "rss_after_mib": round(rss_after, 1),
            "stored_lateness_p99_ms_by_second": _by_second(fired, base),
            "load_avg_1m_during": round(max(loads, default=_load1()), 2),
        }
    finally:
        if triggerer is not None:
            triggerer.stop()
        if cluster is not None:
            cluster.destroy()


def _by_second(fired: list[tuple[float, float]], base: float) -> list[float]:
    """p99 of the stored lateness of the moments in each second of the window: where the
    tail is (the start, or spread through it)."""
    seconds: dict[int, list[float]] = {}
    for due, stored in fired:
        seconds.setdefault(int(due - base), []).append(stored - due)
    return [round(pct(seconds[s], 99) * 1000, 1) for s in sorted(seconds)]


def _load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


COUNT_FIRED = "SELECT count(*) FROM deferrun_tasks WHERE state = 'queued'"


async def _pg_count(db: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(db)
    try:
        return int(await conn.fetchval(COUNT_FIRED))
    finally:
        await conn.close()


def _fired_count(cluster: Any, db: str) -> int:
    if cluster is not None:
        return anyio.run(_pg_count, db)
    conn = sqlite3.connect(_sqlite_path(db), timeout=60)
    try:
        return int(conn.execute(COUNT_FIRED).fetchone()[0])
    finally:
        conn.close()


def run_many(
    backends: list[str], sizes: list[int], fire_rate: float, window: int
) -> list[dict[str, Any]]:
    # a SIGTERM ends the run through its finally blocks (the triggerer and the cluster)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = []
    for backend in backends:
        for n in sizes:
            workdir = Path(tempfile.mkdtemp(prefix="deferrun-timers-"))
            row = run_timer_db(backend, n, fire_rate, window, workdir)
            rows.append(row)
            print(f"  {backend} N={n}: {row}", flush=True)
    return rows


HEADERS = [
    "backend",
    "N",
    "claim all s",
    "RSS MiB",
    "B/timer",
    "stored/s",
    "stored lateness p50/p99/max ms",
    "pop p99 ms",
    "CPU %",
]


def rows_for_table(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["backend"],
            r["n"],
            r["claim_all_s"],
            r["rss_mib"],
            r["bytes_per_timer"],
            r["stored_rate_per_s"],
            f"{r['stored_lateness_p50_ms']} / {r['stored_lateness_p99_ms']} / "
            f"{r['stored_lateness_max_ms']}",
            r["pop_lateness_p99_ms"],
            r["fire_cpu_pct"],
        ]
        for r in rows
    ]
