"""Several triggerers sharing one PostgreSQL: claim fairness, database CPU, adoption.

    python -m benchmarks.fleet --out DIR [--triggers 20000] [--triggerers 4]

``--triggerers`` real `deferrun triggerer` processes and two workers share one fresh
PostgreSQL. Once every triggerer is up, ``--triggers`` tasks are stored deferred on time
triggers due far in the future, in one transaction (bulk SQL, rows as a deferral writes
them, then the wake-up a deferral sends), and the triggerers claim them from empty. Reported:
the time until they hold all of them, how many triggers each triggerer holds once all
are claimed (fairness), the PostgreSQL
server's CPU per triggerer while they wait, then one triggerer is SIGKILLed and the time
from the kill until the survivors hold every trigger again (adoption; the dead triggerer
is declared dead after DEFERRUN_DEAD_AFTER, default 10 s, here ``--dead-after``).
Writes DIR/fleet.json.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import psutil

from benchmarks._harness import (
    Process,
    add_out_argument,
    env_for,
    free_port,
    machine,
    prepare_out,
    start_pg_cluster,
    table,
    wait_for,
    write_json,
)
from benchmarks.triggerer_scale import gauge, scrape


def _held(port: int) -> float:
    return gauge(scrape(port), "deferrun_triggers_running") or 0.0


def _pg_cpu(cluster: Any) -> float:
    """CPU seconds of the PostgreSQL server (postmaster and every backend)."""
    pid = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            continue  # a backend that ended meanwhile
    return total


_DUE = "(extract(epoch from now()) + 86400 + g / 1000.0)"  # distinct: no shared runs
BULK_TASKS = f"""INSERT INTO deferrun_tasks (id, name, classpath, kwargs, queue, state,
    try_number, max_tries, retry_delay, next_method, created_at, updated_at)
SELECT 'fleet' || g, 'AtMoment', 'benchmarks.ops.AtMoment', '{{"at":' || {_DUE} || '}}',
    'default', 'deferred', 1, 1, 0, 'resume', extract(epoch from now()),
    extract(epoch from now())
FROM generate_series(1, $1) AS g"""
BULK_TRIGGERS = f"""INSERT INTO deferrun_triggers (task_id, classpath, kwargs, queue, created_at)
SELECT 'fleet' || g, 'triggers.time.DateTimeTrigger',
    '{{"moment":{{"__deferrun__":"datetime","v":"'
    || to_char(to_timestamp({_DUE}) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US')
    || '","tz":0.0}}}}', 'default', extract(epoch from now())
FROM generate_series(1, $1) AS g"""
LINK = """UPDATE deferrun_tasks t SET trigger_id = g.id FROM deferrun_triggers g
WHERE g.task_id = t.id"""


async def _bulk_defer(db: str, n: int) -> None:
    """n tasks deferred on distinct DateTimeTriggers a day away, stored as a deferral stores
    them, in three statements (deferring 200,000 through workers takes minutes here)."""
    import asyncpg

    conn = await asyncpg.connect(db)
    try:
        async with conn.transaction():
            await conn.execute(BULK_TASKS, n)
            await conn.execute(BULK_TRIGGERS, n)
            await conn.execute(LINK)
            await conn.execute("NOTIFY deferrun_triggers")
    finally:
        await conn.close()


def run_fleet(n: int, count: int, dead_after: float, workdir: Path) -> dict[str, Any]:
    cluster = start_pg_cluster()
    procs: list[Process] = []
    try:
        db = cluster.create_database()
        env = env_for(db, DEFERRUN_DEAD_AFTER=str(dead_after))
        ports = [free_port() for _ in range(count)]
        workers = [
            Process(["worker", "--slots", "8"], env, workdir / f"fleet-worker-{i}.log")
            for i in range(2)
        ]
        procs = list(workers)
        triggerers = [
            Process(
                ["triggerer", "--capacity", str(n), "--metrics-port", str(p),
                 "--metrics-host", "127.0.0.1"],
                env,
                workdir / f"fleet-triggerer-{i}.log",
            )
            for i, p in enumerate(ports)
        ]  # fmt: skip
        procs += triggerers
        for p in ports:
            wait_for(lambda p=p: "deferrun_triggers_running" in scrape(p), 60, 0.3)
        time.sleep(3.0)  # every triggerer has claimed (nothing) and heartbeats
        t0 = time.perf_counter()
        anyio.run(_bulk_defer, db, n)
        deferred = time.perf_counter() - t0
        wait_for(lambda: sum(_held(p) for p in ports) >= n, 900, 0.2)
        loaded = time.perf_counter() - t0
        time.sleep(3.0)
        held = [int(_held(p)) for p in ports]
        cpu0, trig0 = _pg_cpu(cluster), [t.cpu_seconds() for t in triggerers]
        window = 20.0
        time.sleep(window)
        pg_cpu = (_pg_cpu(cluster) - cpu0) / window
        trig_cpu = [(t.cpu_seconds() - c) / window for t, c in zip(triggerers, trig0, strict=True)]
        victim = max(range(count), key=lambda i: held[i])
        triggerers[victim].popen.send_signal(signal.SIGKILL)
        killed_at = time.perf_counter()
        survivors = [p for i, p in enumerate(ports) if i != victim]
        wait_for(lambda: sum(_held(p) for p in survivors) >= n, 300, 0.2)
        adopted = time.perf_counter() - killed_at
        after = [int(_held(p)) for p in survivors]
        return {
            "triggers": n,
            "triggerers": count,
            "dead_after_s": dead_after,
            "stored_s": round(deferred, 1),
            "claimed_from_empty_s": round(loaded, 1),
            "held_per_triggerer": held,
            "fairness_max_over_mean": round(max(held) / (sum(held) / count), 3),
            "pg_cpu_pct_waiting": round(pg_cpu * 100, 2),
            "pg_cpu_pct_per_triggerer_waiting": round(pg_cpu * 100 / count, 2),
            "triggerer_cpu_pct_waiting": [round(c * 100, 2) for c in trig_cpu],
            "killed_held": held[victim],
            "adoption_s": round(adopted, 1),
            "adoption_after_dead_s": round(adopted - dead_after, 1),
            "held_after_adoption": after,
        }
    finally:
        for proc in procs:
            proc.stop()
        cluster.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--triggers", type=int, default=20000)
    parser.add_argument("--triggerers", type=int, default=4)
    parser.add_argument("--dead-after", type=float, default=10.0)
    add_out_argument(parser)
    args = parser.parse_args()
    out_dir = prepare_out(args.out)
    workdir = Path(tempfile.mkdtemp(prefix="deferrun-fleet-"))
    row = run_fleet(args.triggers, args.triggerers, args.dead_after, workdir)
    path = write_json(out_dir, "fleet", {"machine": machine(), "run": row})
    print(f"\nfleet: {row['triggerers']} triggerers, {row['triggers']} time triggers\n")
    print(
        table(
            ["measure", "value"],
            [
                ["triggers stored (one transaction)", f"{row['stored_s']} s"],
                ["stored -> all claimed (from empty)", f"{row['claimed_from_empty_s']} s"],
                ["triggers held per triggerer", row["held_per_triggerer"]],
                ["fairness (max / mean)", row["fairness_max_over_mean"]],
                ["PostgreSQL CPU while waiting", f"{row['pg_cpu_pct_waiting']} % of a core"],
                ["triggerer CPU while waiting", f"{row['triggerer_cpu_pct_waiting']} %"],
                ["killed triggerer held", row["killed_held"]],
                [
                    "kill -> all re-armed",
                    f"{row['adoption_s']} s ({row['adoption_after_dead_s']} s after dead_after)",
                ],
            ],
        )
    )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
