"""How fast `deferrun tasks` / Client.list answers over a large task table.

    python -m benchmarks.listing --out DIR [--rows 1000000] [--backends sqlite,postgres]

Fills deferrun_tasks with ``--rows`` finished and waiting tasks straight in SQL (a bulk
INSERT ... SELECT, so the fill takes seconds), then times Client.list's first page (50
rows, newest first), the page after it (keyset, before=the last TaskInfo), the first page of one
state, the state counts (capped per state, and every row with --exact-counts), and the whole
`deferrun tasks` command: in-process (cli.main, opening and closing the store) and as a
subprocess for reference (interpreter start included): median of 5 calls each (3 for the
subprocess, and 3 of a subprocess that only starts and imports what the command imports,
to show how much of it is imports). Writes DIR/listing.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from benchmarks._harness import (
    add_out_argument,
    machine,
    prepare_out,
    start_pg_cluster,
    table,
    write_json,
)
from deferrun.client import AsyncClient
from deferrun.store import open_store

_STATES = "ARRAY['success','failed','success','deferred','queued','success','cancelled']"
PG_FILL = f"""INSERT INTO deferrun_tasks (id, name, classpath, kwargs, queue, state, max_tries,
    retry_delay, created_at, updated_at, retries)
SELECT 'bulk' || g, 'Nop', 'benchmarks.ops.Nop', '{{}}', 'default',
    ({_STATES})[1 + g % 7], 1, 0, 1700000000 + g / 100.0, 1700000000 + g / 100.0, 0
FROM generate_series(1, $1) AS g"""
SQLITE_FILL = """WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < ?)
INSERT INTO deferrun_tasks (id, name, classpath, kwargs, queue, state, max_tries,
    retry_delay, created_at, updated_at, retries)
SELECT 'bulk' || n, 'Nop', 'benchmarks.ops.Nop', '{}', 'default',
    CASE n % 7 WHEN 3 THEN 'deferred' WHEN 4 THEN 'queued' WHEN 6 THEN 'cancelled'
         WHEN 1 THEN 'failed' ELSE 'success' END,
    1, 0, 1700000000 + n / 100.0, 1700000000 + n / 100.0, 0 FROM g"""


async def fill(db: str, rows: int) -> None:
    store = await open_store(db)  # creates the schema
    await store.close()
    if db.startswith("sqlite"):
        import sqlite3

        conn = sqlite3.connect(db.removeprefix("sqlite:///"))
        conn.execute(SQLITE_FILL, (rows,))
        conn.commit()
        conn.execute("ANALYZE")
        conn.close()
    else:
        import asyncpg

        conn = await asyncpg.connect(db)
        await conn.execute(PG_FILL, rows)
        await conn.execute("VACUUM ANALYZE deferrun_tasks")
        await conn.close()


async def measure(db: str) -> dict[str, Any]:
    async with AsyncClient(db) as client:

        async def median_ms(call: Any) -> float:
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                await call()
                times.append((time.perf_counter() - t0) * 1000)
            return round(statistics.median(times), 2)

        first = await client.list(limit=50)
        store = await client._get_store()
        return {
            "first_page_ms": await median_ms(lambda: client.list(limit=50)),
            "next_page_ms": await median_ms(lambda: client.list(limit=50, before=first[-1])),
            "first_page_one_state_ms": await median_ms(lambda: client.list("queued", limit=50)),
            "state_counts_ms": await median_ms(client.counts),
            "capped_state_counts_ms": await median_ms(store.capped_state_counts),
        }


def command_ms(db: str, *extra: str) -> float:
    """The whole `deferrun tasks` in this process: what the CLI runs, store open to close."""
    from deferrun.cli import commands as cli

    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(["tasks", "--db", db, *extra]) == 0
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 1)


def subprocess_ms(db: str, imports_only: bool = False) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    backend = "sqlite" if db.startswith("sqlite") else "postgres"
    argv = ["-m", "deferrun", "tasks", "--db", db]
    if imports_only:
        argv = ["-c", f"import deferrun.cli.commands, deferrun.store.{backend}"]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *argv], env=env, check=True, stdout=subprocess.DEVNULL)
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--backends", default="sqlite,postgres")
    add_out_argument(parser)
    args = parser.parse_args()
    out_dir = prepare_out(args.out)
    workdir = Path(tempfile.mkdtemp(prefix="deferrun-listing-"))
    rows: list[dict[str, Any]] = []
    for backend in args.backends.split(","):
        cluster = None
        try:
            if backend == "postgres":
                cluster = start_pg_cluster()
                db = cluster.create_database()
            else:
                db = f"sqlite:///{workdir / 'listing.db'}"
            t0 = time.perf_counter()
            anyio.run(fill, db, args.rows)
            row = {"backend": backend, "rows": args.rows, "fill_s": round(time.perf_counter() - t0)}
            row.update(anyio.run(measure, db))
            row["tasks_command_ms"] = command_ms(db)
            row["tasks_command_exact_counts_ms"] = command_ms(db, "--exact-counts")
            row["tasks_subprocess_ms"] = subprocess_ms(db)
            row["subprocess_imports_only_ms"] = subprocess_ms(db, imports_only=True)
            rows.append(row)
            print(f"  {row}", flush=True)
        finally:
            if cluster is not None:
                cluster.destroy()
    path = write_json(out_dir, "listing", {"machine": machine(), "runs": rows})
    print("\ntask listing, median of 5 (ms)\n")
    keys = [
        "first_page_ms",
        "next_page_ms",
        "first_page_one_state_ms",
        "state_counts_ms",
        "capped_state_counts_ms",
        "tasks_command_ms",
        "tasks_command_exact_counts_ms",
        "tasks_subprocess_ms",
        "subprocess_imports_only_ms",
    ]
    print(
        table(
            ["backend", "rows", *keys], [[r["backend"], r["rows"], *map(r.get, keys)] for r in rows]
        )
    )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
